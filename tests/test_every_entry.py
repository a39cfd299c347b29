"""Checks parametrized over the registries themselves: a new objective, attack, bound method,
corruption or pruning method is tested here as soon as it is registered."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cardkit
from cardkit.attacks import ATTACKS, Threat
from cardkit.certify.verify import BOUNDS
from cardkit.compress import model_size
from cardkit.corrupt import corrupt
from cardkit.corrupt.registry import corruption_names
from cardkit.eval import evaluate_robustness
from cardkit.models import create_model
from cardkit.objectives import OBJECTIVES, build_objective
from cardkit.prune import sparsity_report
from cardkit.prune.methods import METHODS


def shipped(table) -> list:
    """The entries cardkit registers (test modules register doubles of their own)."""
    return [cls for cls in table.configs if cls.__module__.startswith("cardkit.")]


OBJECTIVE_CLASSES, ATTACK_CLASSES = shipped(OBJECTIVES), shipped(ATTACKS)
name_of = lambda cls: cls.model_fields["name"].default  # noqa: E731

# Objectives whose loss at eps 0 is not plain cross-entropy, and why.
NOT_CE_AT_EPS_0 = {"gaussian": "trains on noisy inputs whatever the threat's eps",
                   "mixtrain": "adds bound_weight x the bound loss of a random part of the batch"}


def small_net(seed=0):
    torch.manual_seed(seed)
    return create_model("cnn_small", num_classes=10, in_channels=1, input_size=8, width=0.5).eval()


def batch(n=12, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


@pytest.mark.parametrize("config_cls", OBJECTIVE_CLASSES, ids=[name_of(c) for c in OBJECTIVE_CLASSES])
def test_every_objective_at_eps_0_is_cross_entropy_and_trains_every_weight(config_cls):
    """At eps 0 the adversarial point is the clean point and every certified bound is exact, so each
    robust objective's loss is the clean cross-entropy (whatever its weights between the terms)."""
    model, (x, y) = small_net(), batch()
    model.train()
    out = build_objective(config_cls(), Threat("linf", 0.0))(model, x, y)
    model.eval()
    reference = F.cross_entropy(model(x), y)
    if config_cls().name not in NOT_CE_AT_EPS_0:
        assert torch.allclose(out["loss"], reference, rtol=1e-5, atol=1e-6), (out["loss"], reference)
    elif config_cls().name == "mixtrain":  # CE of the batch + CE of a part of it
        assert out["loss"] > reference + 1e-3
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", [name_of(c) for c in ATTACK_CLASSES])
def test_every_attack_fools_no_point_in_a_tiny_ball_and_most_in_a_large_one(name):
    model, (x, y) = small_net(), batch(n=20)
    y = model(x).argmax(1)  # every point starts correct
    config = ATTACKS.config(name)
    logits = model(x).detach()
    assert (logits.topk(2).values.diff(dim=1).abs() > 1e-4).all()  # no point within 1e-7 of a boundary
    tiny = evaluate_robustness(model, x, y, Threat("linf", 1e-7), [config], checks=False)
    assert tiny.clean_accuracy == 1.0 and tiny.robust_accuracy == 1.0
    large = evaluate_robustness(model, x, y, Threat("linf", 0.5), [config], checks=False)
    assert large.robust_accuracy < 0.5


@pytest.mark.parametrize("name", BOUNDS.names())
def test_every_bound_method_is_exact_at_eps_0_and_below_every_sampled_margin(name):
    model, (x, y) = small_net(), batch()
    bound = BOUNDS.lookup(name)
    with torch.no_grad():
        logits = model(x)
        margins = logits.gather(1, y[:, None]) - logits
        exact = margins[torch.arange(10)[None] != y[:, None]].view(len(y), 9)
        assert torch.allclose(bound(model, x, y, 0.0), exact, atol=1e-5)
        lower = bound(model, x, y, 0.05)
        for _ in range(20):
            noisy = (x + torch.empty_like(x).uniform_(-0.05, 0.05)).clamp(0, 1)
            out = model(noisy)
            sampled = (out.gather(1, y[:, None]) - out)[torch.arange(10)[None] != y[:, None]].view(len(y), 9)
            assert (lower <= sampled + 1e-5).all()


@pytest.mark.parametrize("name", corruption_names())
def test_every_corruption_is_seeded_and_changes_the_image_more_at_severity_5_than_1(name):
    rng = np.random.default_rng(0)
    images = rng.integers(40, 216, (4, 32, 32, 3), dtype=np.uint8)
    mild, strong = corrupt(images, name, 1, seed=3), corrupt(images, name, 5, seed=3)
    assert np.array_equal(mild, corrupt(images, name, 1, seed=3))
    change = lambda out: np.abs(out.astype(int) - images).mean()  # noqa: E731
    assert 0 < change(mild) < change(strong) or name in ("frost", "elastic_transform")


METHOD_CLASSES = shipped(METHODS)


@pytest.mark.parametrize("config_cls", METHOD_CLASSES, ids=[name_of(c) for c in METHOD_CLASSES])
def test_every_method_prunes_to_its_budget_and_its_file_gives_the_same_outputs(config_cls, tmp_path):
    """Through the public API with one epoch of training where the method trains, then the .card
    round trip: bitwise outputs, and the file at least the accounted bytes and at most 4 KiB more."""
    model = small_net()
    x, y = batch(n=64, seed=2)
    extra = {"rewind": "lr"} if name_of(config_cls) == "lottery" else {}
    compressed = cardkit.compress_(model, config_cls(sparsity=0.8, **extra), data=(x, y), epochs=1,
                                   optimizer=cardkit.OptimizerConfig(lr=0.01)).model.eval()
    prunable = sum(m.weight.numel() for m in compressed.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    kept = sparsity_report(compressed)["kept_weights"]
    assert kept == pytest.approx(0.2 * prunable, abs=0.01 * prunable), (kept, prunable)
    written = cardkit.export(compressed, tmp_path / "m.card")
    loaded = cardkit.load_artifact(tmp_path / "m.card")
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed(x))
    accounted = model_size(compressed).bytes
    assert accounted <= written <= accounted + 4096
