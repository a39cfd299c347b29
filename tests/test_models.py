import json

import pytest
import torch
from torch import nn

from cardkit.errors import CardkitError
from cardkit.models import Normalize, create_model, list_models, register_model
from cardkit.models.resnet import PreActBlock
from cardkit.models.registry import MODELS

SHAPES = [(1, 8), (1, 28), (3, 32)]
NUM_CLASSES = 3


def build(name, in_channels=3, size=32, **kwargs):
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, in_channels=in_channels, input_size=size, **kwargs)


def rebuild(arch):
    common = {k: v for k, v in arch.items() if k not in ("name", "kwargs")}
    return create_model(arch["name"], **common, **arch["kwargs"])


@pytest.mark.parametrize("in_channels,size", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_forward_backward_is_finite(name, in_channels, size, train):
    model = build(name, in_channels, size).train(train)
    x = torch.rand(2, in_channels, size, size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert torch.isfinite(x.grad).all()
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname


@pytest.mark.parametrize("name", list_models())
def test_model_starts_with_normalize_and_uses_distinct_relus(name):
    model = build(name)
    assert isinstance(model.normalize, Normalize)
    assert next(iter(model.children())) is model.normalize
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and len({id(m) for m in relus}) == len(relus)
    assert not any(m.inplace for m in relus)


@pytest.mark.parametrize("name", list_models())
def test_arch_round_trip_rebuilds_identical_model(name):
    model = build(name, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3]).eval()
    arch = json.loads(json.dumps(model.arch))
    assert arch["name"] == name and arch["mean"] == pytest.approx([0.4, 0.5, 0.6])
    twin = rebuild(arch).eval()
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    twin.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))


def test_create_model_accepts_arch_unpacked():
    model = create_model("wrn", num_classes=NUM_CLASSES, depth=10, width=1)
    twin = create_model(**model.arch)
    assert twin.arch == model.arch
    assert model.arch["kwargs"] == {"depth": 10, "width": 1, "dropout": 0.0}


def test_normalize_maps_mean_to_zero():
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]
    model = build("cnn_small", mean=mean, std=std)
    assert model.normalize.mean.shape == (1, 3, 1, 1) and model.normalize.std.shape == (1, 3, 1, 1)
    x = torch.tensor(mean).view(1, 3, 1, 1).expand(2, 3, 5, 5)
    assert torch.allclose(model.normalize(x), torch.zeros_like(x))


def test_default_normalize_is_identity():
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(build("cnn_small").normalize(x), x)


@pytest.mark.parametrize("name", ["cnn_small", "resnet18"])
def test_normalization_inside_model_equals_normalized_input(name):
    mean, std = [0.3, 0.4, 0.5], [0.2, 0.25, 0.5]
    normalized = build(name, mean=mean, std=std).eval()
    plain = build(name).eval()
    weights = {k: v for k, v in normalized.state_dict().items() if not k.startswith("normalize.")}
    plain.load_state_dict(weights, strict=False)
    x = torch.rand(2, 3, 32, 32)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(normalized(x), plain(manual), atol=1e-5)


def test_single_mean_std_value_is_broadcast_to_channels():
    model = build("cnn_small", mean=[0.5], std=[0.5])
    assert model.arch["mean"] == [0.5] * 3 and model.arch["std"] == [0.5] * 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mean": [0.5, 0.5]}, "in_channels=3"),
        ({"std": [1.0, 0.0, 1.0]}, "positive"),
        ({"mean": 0.5}, "list of numbers"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_common_arguments_are_rejected(kwargs, match):
    with pytest.raises(CardkitError, match=match):
        create_model("cnn_small", **kwargs)


def test_unknown_name_suggests_close_names():
    with pytest.raises(CardkitError) as info:
        create_model("resnt18")
    message = str(info.value)
    assert "unknown model 'resnt18'" in message
    assert "did you mean 'resnet18' or 'preact_resnet18'?" in message
    assert message.endswith("valid: " + ", ".join(MODELS.names()))
    assert sorted(MODELS.names()) == list_models()


def test_unknown_keyword_names_it_and_the_accepted_ones():
    with pytest.raises(CardkitError, match="unknown keyword 'deep'; accepted: depth, width, dropout"):
        create_model("wrn", deep=28)


@pytest.mark.parametrize("depth", [27, 4, 0])
def test_bad_wrn_depth_explains_6n_plus_4(depth):
    with pytest.raises(CardkitError, match=r"6n\+4|integer >= 1"):
        create_model("wrn", depth=depth)


def test_too_small_input_is_rejected():
    with pytest.raises(CardkitError, match="input_size >= 4"):
        create_model("cnn_small", input_size=2)


def test_register_model_rejects_duplicates_and_bad_signatures():
    with pytest.raises(CardkitError, match="already registered"):
        register_model(_named("cnn_small"))
    with pytest.raises(CardkitError, match="lacks parameters"):
        register_model(lambda num_classes: None)


def _named(name):
    def factory(num_classes, in_channels, input_size, mean, std):
        raise AssertionError("never built")

    factory.__name__ = name
    return factory


def count(model, layer_type):
    return sum(isinstance(m, layer_type) for m in model.modules())


def test_cnn_layer_counts():
    small, large = build("cnn_small"), build("cnn_large")
    assert (count(small, nn.Conv2d), count(small, nn.Linear)) == (2, 2)
    assert (count(large, nn.Conv2d), count(large, nn.Linear)) == (4, 3)


def test_cnn_small_parameter_count_matches_formula():
    model = create_model("cnn_small", num_classes=10, in_channels=3, input_size=32)
    conv1 = 3 * 16 * 4 * 4 + 16
    conv2 = 16 * 32 * 4 * 4 + 32
    fc1 = 32 * 8 * 8 * 100 + 100
    fc2 = 100 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == conv1 + conv2 + fc1 + fc2


def test_wrn_variants_match_their_names():
    wrn_28_4 = build("wrn_28_4")
    assert count(wrn_28_4, PreActBlock) == 12 and wrn_28_4.fc.in_features == 64 * 4
    assert count(build("wrn", depth=16, width=2), PreActBlock) == 6
