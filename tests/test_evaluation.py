"""Robust accuracy under attack sequences: exact on a linear classifier, whose smallest adversarial
perturbation is known in closed form; RobustBench's per-point bookkeeping; resume; sanity checks."""

import copy
import logging
from typing import Literal

import pytest
import torch
from torch import nn

from cardkit.attacks import AutoAttackConfig, PGDAttackConfig, Threat
from cardkit.attacks.registry import AttackSettings, AttackStage, register_attack
from cardkit.eval import RobustnessResult, evaluate_robustness
from cardkit.models.normalize import Normalize

CLASSES, SHAPE = 10, (1, 5, 5)  # 25 inputs (Square's L2 version needs 5 x 5 images)


class Linear(nn.Module):
    def __init__(self, weight, bias, scale=1.0):
        super().__init__()
        self.normalize = Normalize([0.0], [1.0])
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)
        self.scale = scale

    def forward(self, x):
        return self.scale * self.fc(x.flatten(1))


def linear_problem(n=300, seed=0):
    """A 10-class linear model and points in [0.35, 0.65]^25 labelled by it (all correct)."""
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(CLASSES, 25, generator=g), torch.randn(CLASSES, generator=g) * 0.1
    x = 0.35 + 0.3 * torch.rand(n, *SHAPE, generator=g)
    model = Linear(weight, bias).eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def smallest_perturbation(model, x, y, norm):
    """Distance from each point to the nearest half-space {s_j >= s_y}: |s_y - s_j| / ||w_y - w_j||_dual.
    The points lie 0.35 inside the box, so for eps < 0.35 the box never binds."""
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    s = x.flatten(1) @ w.T + b
    gap = s.gather(1, y[:, None]) - s  # n x classes, >= 0
    dw = w[y][:, None, :] - w[None, :, :]  # n x classes x inputs
    dual = {"linf": lambda d: d.abs().sum(2), "l2": lambda d: d.norm(dim=2),
            "l1": lambda d: d.abs().amax(2)}[norm](dw)
    distance = gap / dual
    distance[torch.arange(len(y)), y] = float("inf")
    return distance.min(1).values


@pytest.mark.parametrize("norm,eps", [("linf", 0.02), ("l2", 0.12)])
@pytest.mark.parametrize("attacks", [
    [AutoAttackConfig()],
    # Untargeted cross-entropy alone misses points nearest to a boundary that the loss does not
    # point at; the targeted margin attack finds them.
    [PGDAttackConfig(steps=50), PGDAttackConfig(steps=50, targeted=9, loss="cw"),
     AutoAttackConfig(version="custom", attacks=["apgd-ce", "square"])],
], ids=["autoattack", "pgd+custom"])
def test_exactly_the_vulnerable_points_fall_on_a_linear_model(norm, eps, attacks):
    model, x, y = linear_problem()
    distance = smallest_perturbation(model, x, y, norm)
    vulnerable, safe = distance < eps * 0.98, distance > eps * 1.02
    assert 0.2 < vulnerable.float().mean() < 0.8, "the problem should have both kinds of points"
    result = evaluate_robustness(model, x, y, Threat(norm, eps), attacks, batch_size=128)
    assert result.clean_accuracy == 1.0
    # Every vulnerable point is found, no safe one is; the few within 2% of eps may go either way.
    robust = round(result.robust_accuracy * len(y))
    assert int(safe.sum()) <= robust <= int((~vulnerable).sum())
    assert result.samples == len(y) and result.norm == norm and result.eps == eps
    accuracies = [s.robust_accuracy for s in result.stages]
    assert accuracies == sorted(accuracies, reverse=True), "a later stage never resurrects a point"


@pytest.mark.slow
def test_autoattack_under_l1_finds_exactly_the_vulnerable_points():
    model, x, y = linear_problem(n=60)
    distance = smallest_perturbation(model, x, y, "l1")  # one coordinate moves: the box never binds
    eps = float(distance.median())
    assert eps < 0.3
    result = evaluate_robustness(model, x, y, Threat("l1", eps), [AutoAttackConfig()], batch_size=128)
    robust = round(result.robust_accuracy * len(y))
    assert int((distance > eps * 1.02).sum()) <= robust <= int((distance >= eps * 0.98).sum())
    with pytest.raises(Exception, match="pgd attacks linf and l2 balls; for l1 use autoattack"):
        evaluate_robustness(model, x, y, Threat("l1", eps), [PGDAttackConfig()])


def test_autoattack_standard_reports_its_four_stages_and_budget():
    model, x, y = linear_problem(n=100)
    result = evaluate_robustness(model, x, y, Threat("linf", 0.02), [PGDAttackConfig(steps=10), AutoAttackConfig()])
    assert [s.attack for s in result.stages] == ["pgd-10", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert result.attack == "pgd-10 + autoattack standard, linf eps 0.02"
    assert result.robust_accuracy == result.stages[-1].robust_accuracy
    again = RobustnessResult.from_dict(result.to_dict())
    assert again == result


class ReturnsConfig(AttackSettings):
    """Test attacks: return the clean points, or points far outside the ball."""

    name: Literal["test_returns"] = "test_returns"
    what: Literal["clean", "outside"] = "clean"

    @property
    def label(self):
        return f"returns-{self.what}"


@register_attack(ReturnsConfig)
def _returns(config, model, threat, seed):
    def run(x, y):
        return x.clone() if config.what == "clean" else torch.zeros_like(x)  # black images: fooled, but far away

    return [AttackStage(config.label, run)]


def test_points_outside_the_ball_never_count_and_flags_never_come_back(caplog):
    model, x, y = linear_problem(n=200)
    with caplog.at_level(logging.WARNING, logger="cardkit"):
        result = evaluate_robustness(model, x, y, Threat("linf", 0.02),
                                     [PGDAttackConfig(steps=20), ReturnsConfig(what="clean"),
                                      ReturnsConfig(what="outside")], checks=False)
    pgd_accuracy = result.stages[0].robust_accuracy
    assert pgd_accuracy < 1.0
    assert [s.robust_accuracy for s in result.stages] == [pgd_accuracy] * 3
    assert any("outside the linf ball" in r.message for r in caplog.records)


def test_a_killed_evaluation_resumes_to_the_same_numbers():
    model, x, y = linear_problem(n=300)
    attacks = [PGDAttackConfig(steps=10), AutoAttackConfig(version="custom", attacks=["apgd-ce", "apgd-t"])]
    threat = Threat("linf", 0.02)
    whole = evaluate_robustness(model, x, y, threat, attacks, batch_size=64)
    saved = []

    class Killed(Exception):
        pass

    def save(state):
        saved.append(copy.deepcopy(state))
        if (state["stage"], state["batch"]) == (1, 1):  # in the second stage, after its first batch
            raise Killed

    with pytest.raises(Killed):
        evaluate_robustness(model, x, y, threat, attacks, batch_size=64, save=save)
    assert [(s["stage"], s["batch"]) for s in saved] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1)]
    resumed = evaluate_robustness(model, x, y, threat, attacks, batch_size=64, resume=saved[-1])
    strip = lambda r: [(s.attack, s.robust_accuracy) for s in r.stages]  # noqa: E731
    assert strip(resumed) == strip(whole) and resumed.clean_accuracy == whole.clean_accuracy
    assert resumed.checks == whole.checks


def test_gradient_masking_and_probability_outputs_are_flagged(caplog):
    model, x, y = linear_problem(n=100)
    saturated = Linear(model.fc.weight, model.fc.bias, scale=1e4).eval()  # softmax saturates: CE gradient 0
    with caplog.at_level(logging.WARNING, logger="cardkit"):
        result = evaluate_robustness(saturated, x, y, Threat("linf", 0.02), [PGDAttackConfig(steps=10)])
    assert result.checks["zero_gradient_samples"] > 50
    assert any("exactly zero loss gradient" in r.message for r in caplog.records)
    # The survivors of a masked model stay correct even where any image is allowed.
    assert result.checks["unbounded_accuracy"] > 0.05

    probabilities = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    result = evaluate_robustness(probabilities, x, y, Threat("linf", 0.02), [PGDAttackConfig(steps=5)])
    assert result.checks["probability_outputs"] and not result.checks["randomized"]

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x + 0.01 * torch.randn_like(x))

    result = evaluate_robustness(Noisy().eval(), x, y, Threat("linf", 0.02), [PGDAttackConfig(steps=5)])
    assert result.checks["randomized"]
    clean = evaluate_robustness(model, x, y, Threat("linf", 0.02), [PGDAttackConfig(steps=10)])
    assert clean.checks == {"randomized": False, "probability_outputs": False, "zero_gradient_samples": 0,
                            "robust_above_clean": False, "black_box_gain": 0.0,
                            "unbounded_accuracy": clean.checks["unbounded_accuracy"]}
    assert clean.checks["unbounded_accuracy"] == 0.0


def test_the_callers_random_stream_and_mode_are_left_alone():
    model, x, y = linear_problem(n=50)
    model.train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluate_robustness(model, x, y, Threat("linf", 0.02), [PGDAttackConfig(steps=3)])
    assert torch.equal(torch.rand(3), expected) and model.training


def test_stages_after_every_point_fell_run_on_nothing():
    model, x, y = linear_problem(n=40)
    result = evaluate_robustness(model, x, y, Threat("linf", 0.5), [PGDAttackConfig(steps=10),
                                 AutoAttackConfig(version="custom", attacks=["apgd-ce", "square"])])
    assert [(s.attack, s.robust_accuracy) for s in result.stages] == [("pgd-10", 0.0), ("apgd-ce", 0.0),
                                                                       ("square", 0.0)]
