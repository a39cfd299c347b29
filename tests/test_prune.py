"""The masking mechanism and the pruning methods on tiny seeded models."""

import pytest
import torch
import torch.nn.functional as F

from cardkit.attacks import Threat
from cardkit.models import create_model
from cardkit.objectives import PGDATConfig, build_objective
import cardkit.prune.masked as masked_module
from cardkit.prune import (BipropConfig, EdgePopupConfig, GMPConfig, HydraConfig, LotteryConfig,
                           MagnitudeConfig, MaskGroup, kept_count, masked_layers, method_config,
                           prune_model, restore_masks, sparsity_report)
from cardkit.errors import CardkitError
from cardkit.prune.atmc import AtmcConfig
from cardkit.prune.masked import binary_scale


def model(name="cnn_small", seed=0):
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_channels=1, input_size=8)


def data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("method", [MagnitudeConfig, HydraConfig])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 0.999])
def test_layer_scope_keeps_exactly_round_of_each_layer(method, sparsity):
    net = model()
    prune_model(net, method(sparsity=sparsity))
    for layer in masked_layers(net):
        kept = int(layer.mask.sum())
        assert kept == kept_count(layer.weight.numel(), sparsity) == round((1 - sparsity) * layer.weight.numel())
        assert set(layer.mask.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("sparsity", [0.3, 0.9, 0.99])
def test_global_scope_keeps_exactly_round_in_total_and_ranks_across_layers(sparsity):
    net = model("cnn_large")
    prune_model(net, MagnitudeConfig(sparsity=sparsity, scope="global"))
    layers = masked_layers(net)
    total = sum(l.weight.numel() for l in layers)
    assert sum(int(l.mask.sum()) for l in layers) == round((1 - sparsity) * total)
    smallest_kept = min(l.weight.abs()[l.mask.bool()].min() for l in layers if l.mask.any())
    largest_pruned = max(l.weight.abs()[~l.mask.bool()].max() for l in layers if (~l.mask.bool()).any())
    assert smallest_kept >= largest_pruned
    report = sparsity_report(net)
    assert report["sparsity"] == pytest.approx(1 - round((1 - sparsity) * total) / total)


def test_magnitude_keeps_the_largest_weights_and_zeroes_the_rest():
    net = model()
    dense = {n: p.detach().clone() for n, p in net.named_parameters()}
    prune_model(net, MagnitudeConfig(sparsity=0.8))
    for name, layer in [(n, m) for n, m in net.named_modules() if m in masked_layers(net)]:
        original = dense[f"{name}.weight"]
        kept = layer.mask.bool()
        assert torch.equal(layer.weight[kept], original[kept])
        assert (layer.weight[~kept] == 0).all()
        assert original.abs()[kept].min() >= original.abs()[~kept].max()


def test_hydra_initial_mask_is_lwm_and_scores_are_scaled_magnitudes():
    lwm, hydra = model(), model()
    prune_model(lwm, MagnitudeConfig(sparsity=0.9))
    prune_model(hydra, HydraConfig(sparsity=0.9))
    for a, b in zip(masked_layers(lwm), masked_layers(hydra)):
        assert torch.equal(a.mask, b.mask)
        w = b.weight.detach()
        expected = (6.0 / w[0].numel()) ** 0.5 * w / w.abs().max()
        assert torch.allclose(b.scores, expected)


def test_scores_get_gradients_and_frozen_weights_do_not():
    net = model()
    prune_model(net, HydraConfig(sparsity=0.9))
    x, y = data()
    F.cross_entropy(net(x), y).backward()
    for layer in masked_layers(net):
        assert layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0
        assert layer.weight.grad is None and not layer.weight.requires_grad
        assert layer.bias.grad is None
    for train_norm in (False, True):
        resnet = create_model("resnet18", 10, 1, 8)
        prune_model(resnet, HydraConfig(sparsity=0.5, train_norm=train_norm))
        norms = [p for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
        assert norms and all(p.requires_grad == train_norm for p in norms)


def test_straight_through_gradient_equals_the_masks_gradient(monkeypatch):
    net = model()
    prune_model(net, HydraConfig(sparsity=0.5))
    layer = masked_layers(net)[-1]
    captured = {}
    original = type(layer).effective_weight

    def capture(self):
        weight = original(self)
        if self is layer:
            weight.retain_grad()
            captured["weight"] = weight
        return weight

    monkeypatch.setattr(type(layer), "effective_weight", capture)
    x, y = data()
    F.cross_entropy(net(x), y).backward()
    # effective = weight x mask(|scores|): the mask passes its gradient straight to |scores|.
    expected = captured["weight"].grad * layer.weight * layer.scores.detach().sign()
    assert torch.allclose(layer.scores.grad, expected, atol=1e-7)
    pruned = layer.mask == 0
    assert pruned.any() and layer.scores.grad[pruned].abs().sum() > 0, "pruned scores must learn too"


def test_masks_are_computed_once_per_optimizer_step_not_per_forward(monkeypatch):
    net = model()
    setup = prune_model(net, HydraConfig(sparsity=0.9))
    calls = {"n": 0}
    original = MaskGroup.recompute

    def counting(self):
        calls["n"] += 1
        return original(self)

    monkeypatch.setattr(MaskGroup, "recompute", counting)
    objective = build_objective(PGDATConfig(steps=10), Threat("linf", 0.1))
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x, y = data()
    for step in range(3):
        loss = objective(net, x, y)["loss"]  # 11 forwards
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # The first step uses the masks computed at set-up; steps 2 and 3 recompute once each, at their
    # first forward after the score update; the other 10 forwards of each step reuse them.
    assert calls["n"] == 2
    masks_before = [l.mask.clone() for l in setup.group.layers]
    setup.group.freeze()
    net(x)
    assert calls["n"] == 3  # freeze picks up the last update; frozen masks are never recomputed
    net(x)
    assert calls["n"] == 3
    assert all(int(l.mask.sum()) == int(m.sum()) for l, m in zip(setup.group.layers, masks_before))


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_pruned_weights_stay_exactly_zero_through_finetuning(weight_decay):
    net = model()
    setup = prune_model(net, HydraConfig(sparsity=0.9))
    x, y = data()
    # Train the scores a little so the mask moves away from LWM's, then fine-tune under it.
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1.0)
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    finetuned = model()
    group = restore_masks(finetuned, HydraConfig(sparsity=0.9))
    finetuned.load_state_dict(net.state_dict())
    group.enforce()
    optimizer = torch.optim.SGD(finetuned.parameters(), lr=0.1, momentum=0.9, weight_decay=weight_decay)
    optimizer.register_step_post_hook(lambda *_: group.enforce())
    for _ in range(10):
        optimizer.zero_grad()
        F.cross_entropy(finetuned(x), y).backward()
        optimizer.step()
    for layer in group.layers:
        assert (layer.weight[layer.mask == 0] == 0).all()
        assert (layer.weight[layer.mask == 1] != 0).all()
        assert not layer.scores.requires_grad
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(group.layers, setup.group.layers))


def test_method_lookup_suggests_close_names_and_checks_sparsity():
    assert isinstance(method_config("hydra", sparsity=0.5), HydraConfig)
    with pytest.raises(CardkitError, match="did you mean 'hydra'"):
        method_config("hydr", sparsity=0.5)
    with pytest.raises(Exception, match="less than 1"):
        MagnitudeConfig(sparsity=1.0)
    with pytest.raises(Exception, match="greater than or equal to 0"):
        MagnitudeConfig(sparsity=-0.1)


@pytest.mark.parametrize("sparsity", [0.5, 0.95])
def test_biprop_layers_take_exactly_minus_alpha_zero_plus_alpha(sparsity):
    net = model()
    setup = prune_model(net, method_config("biprop", sparsity=sparsity))
    x, y = data()
    F.cross_entropy(net(x), y).backward()
    for layer in setup.group.layers:
        effective = layer.effective_weight().detach()
        kept = layer.mask.bool()
        alpha = binary_scale(layer.weight, layer.mask)
        assert torch.allclose(alpha, layer.weight.detach().abs()[kept].mean())
        assert set(effective.unique().tolist()) == {-alpha.item(), 0.0, alpha.item()}
        assert (effective[~kept] == 0).all()
        assert layer.scores.grad is not None and layer.weight.grad is None


def test_edge_popup_freezes_random_signed_constant_weights():
    net = model()
    pretrained = [l.weight.detach().clone() for _, l in __import__("cardkit.prune", fromlist=["x"]).prunable_layers(net)]
    setup = prune_model(net, method_config("edge_popup", sparsity=0.7))
    for layer, before in zip(setup.group.layers, pretrained):
        std = (2.0 / layer.weight[0].numel()) ** 0.5
        assert torch.allclose(layer.weight.abs(), torch.full_like(layer.weight, std))
        assert not torch.equal(layer.weight, before)
        assert not layer.weight.requires_grad and layer.scores.requires_grad


def test_gmp_schedule_end_points_and_cubic_shape():
    from cardkit.prune.methods import GMPConfig, gmp_sparsity

    config = GMPConfig(sparsity=0.9, initial_sparsity=0.1, start_step=10, end_step=110, frequency=10)
    assert gmp_sparsity(0, config, 200) == gmp_sparsity(10, config, 200) == pytest.approx(0.1)
    assert gmp_sparsity(110, config, 200) == gmp_sparsity(200, config, 200) == pytest.approx(0.9)
    values = [gmp_sparsity(t, config, 200) for t in range(0, 201)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert len(set(values[10:111])) == 11  # held between updates, every 10 steps
    # Cubic: half-way through, 1 - (1/2)^3 of the way to the final sparsity.
    assert gmp_sparsity(60, config, 200) == pytest.approx(0.9 + (0.1 - 0.9) * 0.125)
    assert GMPConfig(sparsity=0.5).end_step is None
    assert gmp_sparsity(50, GMPConfig(sparsity=0.5, frequency=1), 50) == pytest.approx(0.5)


def test_gmp_reaches_its_exact_sparsity_while_weights_train():
    net = model()
    setup = prune_model(net, method_config("gmp", sparsity=0.8, frequency=2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    x, y = data()
    for step in range(1, 11):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        setup.after_step(step, 10)
        for layer in setup.group.layers:
            assert (layer.weight[layer.mask == 0] == 0).all()
    for layer in setup.group.layers:
        assert int(layer.mask.sum()) == round(0.2 * layer.weight.numel())
    with pytest.raises(CardkitError, match="end_step"):
        prune_model(model(), method_config("gmp", sparsity=0.8, end_step=50)).after_step(1, 10)


def test_kmeans_codebooks_follow_optimizer_steps_but_not_reloads():
    net = model()
    group = prune_model(net, method_config("magnitude", sparsity=0.5,
                                           quantize={"bits": 3, "scheme": "kmeans"})).group
    layer = group.layers[0]
    fitted = layer.codebook.clone()
    with torch.no_grad():
        layer.weight.mul_(1.5)  # as if an optimizer step had moved the weights
    group.enforce()  # after loading a checkpoint: the saved codebook is the model's
    assert torch.equal(layer.codebook, fitted)
    group.enforce(refit=True)  # after an optimizer step: the codebook follows the weights
    assert not torch.equal(layer.codebook, fitted) and layer.codebook[0] == 0
    q = layer.quantized()
    assert torch.equal(q.values, torch.where(layer.mask != 0, layer.codebook[q.codes], 0))


@pytest.mark.parametrize("config", [
    MagnitudeConfig(sparsity=0.8), MagnitudeConfig(sparsity=0.5, quantize={"bits": 4, "per_channel": True}),
    HydraConfig(sparsity=0.9, quantize={"bits": 3, "scheme": "kmeans"}), EdgePopupConfig(sparsity=0.6),
    BipropConfig(sparsity=0.5), GMPConfig(sparsity=0.8), LotteryConfig(sparsity=0.9),
    AtmcConfig(size_ratio=0.1, bits=4)], ids=lambda config: config.label)
def test_a_restored_model_computes_what_the_pruned_one_does_without_rerunning_the_start(config, monkeypatch):
    """restore_masks builds the method's layers and the loaded state gives their values: it draws
    no random numbers (edge-popup's, biprop's weights), fits no codebook and factorizes nothing."""
    pruned = model().eval()
    prune_model(pruned, config)
    restored = model(seed=1).eval()  # other weights: everything must come from the state
    calls = {"kmeans": 0}

    def kmeans(*args, **kwargs):
        calls["kmeans"] += 1
        return quantize_kmeans(*args, **kwargs)

    quantize_kmeans = masked_module.quantize_kmeans
    monkeypatch.setattr(masked_module, "quantize_kmeans", kmeans)
    monkeypatch.setattr("cardkit.prune.atmc.quantize_kmeans", kmeans)
    monkeypatch.setattr(torch.linalg, "svd", None)
    random_state = torch.get_rng_state()
    group = restore_masks(restored, config)
    restored.load_state_dict(pruned.state_dict())
    group.enforce()  # as after loading a checkpoint: score-trained weights get their masks baked in
    assert calls["kmeans"] == 0 and torch.equal(torch.get_rng_state(), random_state)
    x, _ = data()
    with torch.no_grad():
        assert torch.equal(restored(x), pruned(x))
