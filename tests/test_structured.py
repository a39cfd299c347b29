"""Structured (whole-channel) pruning: masks, the masked model and the rebuilt smaller model."""

import copy

import pytest
import torch
from torch import nn

from cardkit.errors import CardkitError
from cardkit.models import create_model, model_from_arch
from cardkit.prune.masked import add_masks
from cardkit.prune.structured import apply_channel_masks, channel_masks, channel_scores, rebuild

SHAPES = [(1, 8), (1, 28), (3, 32)]
SEQUENTIAL = {"cnn_small": {}, "cnn_large": {}, "vgg16_bn": {"width": 4}}
RESIDUAL = {"resnet18": {"width": 4}, "preact_resnet18": {"width": 4},
            "wrn": {"depth": 10, "width": 1, "dropout": 0.3}}


def build(name, channels=1, size=8, seed=0, **kw):
    """A seeded model in eval mode whose BatchNorms have random statistics and affine parameters."""
    torch.manual_seed(seed)
    options = {**SEQUENTIAL, **RESIDUAL}.get(name, {})
    net = create_model(name, num_classes=10, in_channels=channels, input_size=size, **{**options, **kw})
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


def inputs(channels, size, n=3):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(1))


def masked_copy(net, masks):
    masked = copy.deepcopy(net)
    apply_channel_masks(masked, masks)
    return masked


def params(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("name", ["cnn_small", "cnn_large", "vgg16_bn"])
def test_layer_scope_keeps_exactly_round_per_layer(name, sparsity):
    net = build(name)
    masks = channel_masks(net, sparsity)
    modules = dict(net.named_modules())
    for layer, mask in masks.items():
        channels = modules[layer].weight.shape[0]
        assert mask.dtype == torch.bool and mask.shape == (channels,)
        assert int(mask.sum()) == max(1, int(round((1 - sparsity) * channels)))


@pytest.mark.parametrize("name,classifier", [("cnn_small", "fc2"), ("cnn_large", "fc3"),
                                             ("vgg16_bn", "fc"), ("resnet18", "fc")])
def test_classifier_is_never_pruned(name, classifier):
    net = build(name)
    masks = channel_masks(net, 0.9)
    assert classifier not in masks and "normalize" not in masks
    assert rebuild(net, masks).get_submodule(classifier).out_features == 10


def test_layer_scope_keeps_the_largest_weight_filters():
    net = build("cnn_small")
    with torch.no_grad():
        net.conv1.weight.copy_(torch.arange(16.0).view(16, 1, 1, 1).expand_as(net.conv1.weight))
    assert channel_scores(net)["conv1"].argsort().tolist() == list(range(16))
    assert channel_masks(net, 0.75)["conv1"].nonzero().flatten().tolist() == [12, 13, 14, 15]


def test_scores_source_uses_the_scores_tensor():
    net = build("cnn_small")
    add_masks(net)
    with torch.no_grad():
        net.conv1.scores.copy_(torch.arange(16.0).flip(0).view(16, 1, 1, 1).expand_as(net.conv1.scores))
    expected = net.conv1.scores.abs().sum((1, 2, 3))
    torch.testing.assert_close(channel_scores(net, source="scores")["conv1"], expected)
    assert channel_masks(net, 0.75, source="scores")["conv1"].nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_scores_source_needs_masked_layers():
    with pytest.raises(CardkitError, match="conv1.*add_masks"):
        channel_scores(build("cnn_small"), source="scores")


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.999])
def test_global_scope_threshold_keeps_at_least_one_per_layer(sparsity):
    net = build("cnn_large")
    masks = channel_masks(net, sparsity, scope="global")
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert all(m.any() for m in masks.values())
    assert round((1 - sparsity) * total) <= kept <= max(1, round((1 - sparsity) * total)) + len(masks)


def test_global_scope_normalises_each_layer():
    net = build("cnn_small")
    with torch.no_grad():
        net.fc1.weight.mul_(1000)  # a uniform scale of one layer must not change its share
    masks = channel_masks(net, 0.5, scope="global")
    torch.testing.assert_close(masks, channel_masks(build("cnn_small"), 0.5, scope="global"))


@pytest.mark.parametrize("bad", [dict(sparsity=1.5), dict(sparsity=-0.1), dict(sparsity=0.5, scope="net"),
                                 dict(sparsity=0.5, source="grad")])
def test_invalid_arguments_raise(bad):
    with pytest.raises(CardkitError):
        channel_masks(build("cnn_small"), **bad)


def test_apply_channel_masks_zeroes_the_removed_channels_after_bn():
    net = build("vgg16_bn", 3, 32)
    masks = channel_masks(net, 0.5)
    apply_channel_masks(net, masks)
    first = net.normalize, net.features[0], net.features[1]
    out = nn.Sequential(*first)(inputs(3, 32))
    drop = ~masks["features.0"]
    assert out[:, drop].abs().max() == 0 and out[:, ~drop].abs().sum() > 0


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("name", [*SEQUENTIAL, *RESIDUAL])
def test_rebuilt_model_equals_masked_model(name, channels, size):
    net = build(name, channels, size)
    masks = channel_masks(net, 0.6)
    smaller = rebuild(net, masks)
    x = inputs(channels, size)
    with torch.no_grad():
        expected, got = masked_copy(net, masks)(x), smaller(x)
    assert expected.abs().max() > 1e-3  # the comparison is not between two zero outputs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert params(smaller) == expected_params(net, masks)
    assert smaller.arch["structured"] == {k: int(m.sum()) for k, m in masks.items()}
    assert "structured" not in net.arch and params(net) > params(smaller)


@pytest.mark.parametrize("name", ["vgg16_bn", "wrn"])
def test_global_scope_masks_rebuild_too(name):
    net = build(name, 3, 32)
    masks = channel_masks(net, 0.8, scope="global")
    x = inputs(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuild(net, masks)(x), masked_copy(net, masks)(x), atol=1e-5, rtol=1e-5)


def expected_params(net, masks):
    """Each Conv2d / Linear keeps out' x in' weights, where a removed channel takes away one row
    of its layer, the BN pair after it, and its inputs (one slice for a conv, h*w columns for a
    Linear) from the next Conv2d / Linear in module order."""
    modules = dict(net.named_modules())
    names = list(modules)
    out = {n: m.weight.shape[0] for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))}
    fan_in = {n: m.weight[0].numel() for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for name, mask in masks.items():
        kept, after = int(mask.sum()), names[names.index(name) + 1:]
        nxt = next(n for n in after if isinstance(modules[n], (nn.Conv2d, nn.Linear)))
        for n in after[:after.index(nxt)]:
            if isinstance(modules[n], nn.BatchNorm2d):
                out[n] = kept
        fan_in[nxt] = fan_in[nxt] * kept // out[name]
        out[name] = kept
    total = params(net) - sum(p.numel() for n, m in modules.items() if n in out for p in m.parameters(recurse=False))
    for n, m in modules.items():
        if isinstance(m, nn.BatchNorm2d):
            total += 2 * out[n]
        elif n in fan_in:
            total += out[n] * (fan_in[n] + (m.bias is not None))
    return total


def test_cnn_small_rebuilt_parameter_count_by_hand():
    net = build("cnn_small", 1, 8)
    smaller = rebuild(net, channel_masks(net, 0.5))  # keeps 8, 16 and 50 of 16, 32 and 100
    shapes = [tuple(p.shape) for p in smaller.parameters()]
    assert shapes == [(8, 1, 4, 4), (8,), (16, 8, 4, 4), (16,), (50, 64), (50,), (10, 50), (10,)]
    assert params(smaller) == 136 + 2064 + 3250 + 510


def test_rebuild_of_masked_layers_bakes_their_masks():
    net = build("cnn_large", 3, 32)
    add_masks(net)
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "mask"):
                m.mask.bernoulli_(0.5)
                m.scores.requires_grad_(True)  # an unfrozen layer: the forward uses weight x mask
    masks = channel_masks(net, 0.5, source="scores")
    smaller = rebuild(net, masks)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in smaller.modules() if hasattr(m, "weight"))
    x = inputs(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(smaller(x), masked_copy(net, masks)(x), atol=1e-5, rtol=1e-5)


def test_rebuild_leaves_the_model_unchanged():
    net = build("vgg16_bn")
    before = copy.deepcopy(net.state_dict())
    rebuild(net, channel_masks(net, 0.5))
    torch.testing.assert_close(net.state_dict(), before)


@pytest.mark.parametrize("name,layer,kind", [("resnet18", "layer1.0.conv2", "Conv2d"),
                                             ("resnet18", "conv1", "Conv2d"),
                                             ("preact_resnet18", "layer2.0.shortcut", "Conv2d"),
                                             ("cnn_small", "fc2", "Linear"),
                                             ("cnn_small", "relu1", "ReLU")])
def test_layer_that_cannot_lose_channels_raises_naming_it(name, layer, kind):
    net = build(name)
    mask = torch.tensor([True, False])  # the layer is rejected before its mask is looked at
    for fn in (rebuild, apply_channel_masks):
        with pytest.raises(CardkitError, match=rf"'{layer}' \({kind}\).*supported"):
            fn(net, {layer: mask})


def test_residual_nets_only_offer_the_inner_block_convs():
    for name in RESIDUAL:
        assert all(layer.endswith(".conv1") and layer.startswith("layer") for layer in channel_masks(build(name), 0.5))


def test_unhandled_module_blocks_the_layer_before_it():
    net = build("cnn_small")
    net.relu1 = nn.Sigmoid()  # sigmoid(0) = 0.5: a zeroed channel would still output something
    assert "conv1" not in channel_masks(net, 0.5)
    with pytest.raises(CardkitError, match=r"'conv1' \(Conv2d\).*'relu1' \(Sigmoid\)"):
        rebuild(net, {"conv1": torch.ones(16, dtype=torch.bool)})


@pytest.mark.parametrize("bad", [torch.ones(5, dtype=torch.bool), torch.ones(16),
                                 torch.zeros(16, dtype=torch.bool)])
def test_invalid_mask_raises(bad):
    with pytest.raises(CardkitError, match="conv1"):
        rebuild(build("cnn_small"), {"conv1": bad})


def test_unknown_layer_name_raises():
    with pytest.raises(CardkitError, match="'conv9' is not in the model"):
        rebuild(build("cnn_small"), {"conv9": torch.ones(3, dtype=torch.bool)})


@pytest.mark.parametrize("name", ["cnn_large", "vgg16_bn", "resnet18"])
def test_state_dict_round_trip_into_a_fresh_rebuilt_model(name):
    net = build(name, 3, 32)
    smaller = rebuild(net, channel_masks(net, 0.7))
    fresh = model_from_arch(smaller.arch).eval()
    fresh.load_state_dict(smaller.state_dict())
    x = inputs(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), smaller(x))
    assert fresh.arch == smaller.arch


def test_rebuilding_a_rebuilt_model_merges_the_record():
    net = build("cnn_small")
    once = rebuild(net, channel_masks(net, 0.5))
    twice = rebuild(once, {"conv1": torch.arange(8) < 2})
    assert twice.arch["structured"] == {"conv1": 2, "conv2": 16, "fc1": 50}
    assert model_from_arch(twice.arch).conv1.out_channels == 2


def test_model_from_arch_rebuilds_plain_and_structured_records_and_refuses_broken_ones():
    net = build("cnn_small", width=2)
    again = model_from_arch(net.arch).eval()
    again.load_state_dict(net.state_dict())
    x = inputs(1, 8)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))
    smaller = model_from_arch({**net.arch, "structured": {"conv1": 3}})
    assert smaller.conv1.out_channels == 3 and smaller.conv2.in_channels == 3
    assert smaller.arch["structured"] == {"conv1": 3}
    for arch, expected in [([1], "arch=\\[1\\] is invalid"), ({"name": "cnn_small"}, "arch lacks num_classes"),
                           ({**net.arch, "structured": {"conv1": 0}}, r"structured\['conv1'\]=0 is invalid"),
                           ({**net.arch, "structured": {"fc2": 5}}, "'fc2' .*model output")]:
        with pytest.raises(CardkitError, match=expected):
            model_from_arch(arch)
