import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cardkit.attacks import Threat, pgd


def tiny_net(seed=0, in_features=3 * 6 * 6, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, classes))


def batch(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 6, 6, generator=g)
    # Push some pixels to the box edges so projection onto [0,1] matters.
    x[:, 0] = (x[:, 0] > 0.5).float()
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("linf", 8 / 255), ("l2", 0.5), ("l2", 2.0)])
@pytest.mark.parametrize("random_start", [True, False])
@pytest.mark.parametrize("restarts", [1, 3])
def test_pgd_stays_in_ball_and_box(norm, eps, random_start, restarts):
    model, (x, y) = tiny_net(), batch()
    x_adv = pgd(model, x, y, Threat(norm, eps), steps=7, restarts=restarts, random_start=random_start)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


def test_pgd_increases_loss_and_random_start_moves():
    model, (x, y) = tiny_net(), batch()
    threat = Threat("linf", 0.1)
    clean_loss = F.cross_entropy(model(x), y)
    adv_loss = F.cross_entropy(model(pgd(model, x, y, threat, steps=10)), y)
    assert adv_loss > clean_loss + 0.05
    # One step of size ~0 leaves only the random start: it must have moved the input.
    start_only = pgd(model, x, y, threat, steps=1, step_size=1e-12)
    assert (start_only - x).abs().amax() > 0.05
    no_start = pgd(model, x, y, threat, steps=1, step_size=1e-12, random_start=False)
    assert (no_start - x).abs().amax() < 1e-6


def test_restarts_only_help_and_keep_worst_case():
    model, (x, y) = tiny_net(), batch(n=64)
    threat = Threat("linf", 0.05)
    torch.manual_seed(3)
    one = (model(pgd(model, x, y, threat, steps=3, restarts=1)).argmax(1) != y).sum()
    torch.manual_seed(3)
    many = (model(pgd(model, x, y, threat, steps=3, restarts=5)).argmax(1) != y).sum()
    assert many >= one


def test_pgd_restores_mode_and_leaves_parameter_grads_alone():
    model, (x, y) = tiny_net(), batch()
    model.train()
    pgd(model, x, y, Threat("l2", 1.0), steps=2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_zero_eps_returns_input():
    model, (x, y) = tiny_net(), batch()
    assert torch.equal(pgd(model, x, y, Threat("linf", 0.0), steps=5), x)


def test_threat_rejects_bad_values():
    with pytest.raises(ValueError):
        Threat("l1", 0.1)
    with pytest.raises(ValueError):
        Threat("linf", -0.1)
    with pytest.raises(ValueError):
        pgd(tiny_net(), *batch(), Threat("linf", 0.1), steps=0)


def test_evaluation_flags_zero_gradients(caplog):
    from cardkit.eval import evaluate_robustness

    class Saturated(nn.Module):
        """Predicts the label with a huge margin: softmax saturates and the gradient vanishes."""

        def forward(self, x):
            return torch.nn.functional.one_hot((x[:, 0, 0, 0] > 0.5).long(), 4).float() * 1e4 + 0 * x.sum()

    x = torch.zeros(8, 3, 6, 6)
    x[:4, 0, 0, 0] = 1
    y = x[:, 0, 0, 0].long()
    result = evaluate_robustness(Saturated(), [(x, y)], Threat("linf", 0.01), steps=3)
    assert result.zero_gradient_samples == 8 and result.robust_accuracy == 1.0
    assert "zero loss gradient" in caplog.text
    trained = evaluate_robustness(tiny_net(), [batch()], Threat("linf", 0.01), steps=3)
    assert trained.zero_gradient_samples == 0


def test_pgd_at_eps_ramp_up_grows_linearly():
    from cardkit.objectives import PGDATConfig, build_objective

    model, (x, y) = tiny_net(), batch()
    objective = build_objective(PGDATConfig(eps=0.2, steps=3, eps_warmup_epochs=2), Threat("linf", 0.1))
    for epoch, expected in [(0.0, 0.0), (0.5, 0.05), (1.0, 0.1), (2.0, 0.2), (5.0, 0.2)]:
        objective.set_progress(epoch)
        delta = (objective(model, x, y)["x_adv"] - x).abs().amax()
        assert delta <= expected + 1e-6
        assert delta >= 0.9 * expected
