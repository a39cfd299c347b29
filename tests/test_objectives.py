import pytest
import torch
import torch.nn.functional as F

from cardkit.attacks import Threat
from cardkit.config import validate_config
from cardkit.objectives import NaturalConfig, PGDATConfig, TradesConfig, build_objective
from test_attacks import batch, tiny_net


@pytest.mark.parametrize("config", [NaturalConfig(), PGDATConfig(steps=3), TradesConfig(steps=3),
                                    PGDATConfig(steps=3, norm="l2", eps=0.5)])
def test_objectives_return_a_differentiable_loss_and_logits(config):
    model, (x, y) = tiny_net(), batch()
    out = build_objective(config, Threat("linf", 0.1))(model, x, y)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert out["logits"].shape == (len(x), 4)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_adversarial_losses_exceed_the_natural_loss():
    model, (x, y) = tiny_net(), batch(n=64)
    threat = Threat("linf", 0.1)
    natural = build_objective(NaturalConfig(), threat)(model, x, y)["loss"]
    adversarial = build_objective(PGDATConfig(steps=5), threat)(model, x, y)["loss"]
    assert adversarial > natural
    trades = build_objective(TradesConfig(steps=5, beta=6.0), threat)(model, x, y)
    assert trades["loss"] >= natural and trades["robust_loss"] > 0
    # beta = 0 leaves plain cross-entropy on the clean inputs.
    plain = build_objective(TradesConfig(steps=2, beta=0.0), threat)(model, x, y)
    assert plain["loss"].item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)


def test_objective_eps_and_norm_default_to_the_threat_and_can_be_overridden():
    model, (x, y) = tiny_net(), batch()
    inherited = build_objective(PGDATConfig(steps=2), Threat("linf", 0.05))(model, x, y)["x_adv"]
    assert (inherited - x).abs().amax() <= 0.05 + 1e-6
    own = build_objective(PGDATConfig(steps=2, eps=0.5, norm="l2"), Threat("linf", 0.05))(model, x, y)["x_adv"]
    assert ((own - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    assert (own - x).abs().amax() > 0.05


def test_config_builds_the_objective_by_name():
    config = validate_config({"pretrain": {"objective": {"name": "trades", "beta": 1.5, "eps": "4/255"}}})
    assert isinstance(config.pretrain.objective, TradesConfig)
    assert config.pretrain.objective.threat(Threat("l2", 1.0)) == Threat("l2", 4 / 255)


@pytest.mark.parametrize("name", ["ibp", "crown_ibp", "mixtrain"])
def test_certified_objectives_bound_the_natural_loss_and_train_the_weights(name):
    from cardkit.objectives import OBJECTIVES

    model, (x, y) = tiny_net(), batch()
    threat = Threat("linf", 0.05)
    natural = build_objective(NaturalConfig(), threat)(model, x, y)["loss"].item()
    config = OBJECTIVES.config(name, **({} if name == "mixtrain" else {"kappa": 0.0}))
    objective = build_objective(config, threat)
    out = objective(model, x, y)
    # Worst-case margins are below the true ones, so the bound loss exceeds the clean loss.
    assert out["robust_loss"].item() >= natural - 1e-6
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bound_objectives_ramp_eps_kappa_and_beta():
    from cardkit.objectives import CrownIBPConfig

    model, (x, y) = tiny_net(), batch()
    objective = build_objective(CrownIBPConfig(warmup_epochs=1, ramp_epochs=2, kappa=0.5), Threat("linf", 0.1))
    natural = F.cross_entropy(model(x), y).item()
    objective.set_progress(0.5)  # still warming up: eps 0, the natural loss only
    assert objective(model, x, y)["loss"].item() == pytest.approx(natural, rel=1e-5)
    objective.set_progress(2.0)  # half-way: eps 0.05, kappa 0.75
    half = objective(model, x, y)
    assert half["loss"].item() == pytest.approx(0.75 * natural + 0.25 * half["robust_loss"].item(), rel=1e-5)
    objective.set_progress(10.0)
    assert objective.progress == 1.0


def test_pgd_at_mixes_clean_and_adversarial_terms():
    import torch.nn.functional as F
    from cardkit.attacks import Threat
    from cardkit.objectives import build_objective
    from cardkit.objectives.standard import PGDATConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    config = PGDATConfig(clean_weight=0.5, adversarial_weight=0.25, random_start=False)
    out = build_objective(config, Threat("linf", 0.1))(model, x, y)
    expected = 0.5 * F.cross_entropy(model(x), y) + 0.25 * F.cross_entropy(model(out["x_adv"]), y)
    assert torch.allclose(out["loss"], expected)
