"""Exact values of attacks/pgd.py helpers: label decoding and the DLR loss's refusals."""

import pytest
import torch

from cardkit.attacks.pgd import _labels, dlr_loss


def test_labels_of_one_hot_rows_are_their_argmax():
    assert _labels(torch.tensor([2, 0])).tolist() == [2, 0]
    assert _labels(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])).tolist() == [2, 0]


def test_dlr_loss_by_hand_and_its_class_count_messages():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    # untargeted, y = 0: -(3 - 2) / (3 - 1) = -0.5; targeted at 3: -(3 - 0) / (3 - (1 + 0) / 2) = -1.2
    assert dlr_loss(logits, torch.tensor([0])).item() == pytest.approx(-0.5)
    assert dlr_loss(logits, torch.tensor([0]), torch.tensor([3])).item() == pytest.approx(-1.2)
    with pytest.raises(ValueError, match=r"^the DLR loss needs at least 3 classes, the model has 2: "):
        dlr_loss(torch.zeros(1, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"^the targeted DLR loss needs at least 4 classes, the model has 3: "
                                         r"use loss='cw' or 'ce'$"):
        dlr_loss(torch.zeros(1, 3), torch.tensor([0]), torch.tensor([1]))


# --- registry: an attack's own eps and norm; AutoAttack's Square guard for small l2 images ------

from torch import nn  # noqa: E402

from cardkit.attacks import Threat  # noqa: E402
from cardkit.attacks.autoattack import AutoAttackConfig  # noqa: E402
from cardkit.attacks.registry import attack_stages, describe  # noqa: E402
from cardkit.config import PGDAttackConfig  # noqa: E402
from cardkit.errors import CardkitError  # noqa: E402


def test_an_attack_with_its_own_eps_or_norm_uses_them_and_the_run_threat_for_the_rest():
    run = Threat("linf", 0.3)
    assert PGDAttackConfig().threat(run) == Threat("linf", 0.3)
    assert PGDAttackConfig(eps=0.05, norm="l2").threat(run) == Threat("l2", 0.05)
    assert PGDAttackConfig(eps=0).threat(run) == Threat("linf", 0.0)  # eps 0 is a budget, not "unset"
    assert PGDAttackConfig(norm="l2").threat(run) == Threat("l2", 0.3)
    assert describe(PGDAttackConfig(steps=7, eps=0.05, norm="l2"), run) == "pgd-7, l2 eps 0.05"


class _Flat(nn.Module):
    def __init__(self, side: int):
        super().__init__()
        self.fc = nn.Linear(side * side, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("attack, norm, side, refused", [
    ("square", "l2", 4, True), ("square", "l2", 5, False),  # the smallest size Square's l2 search accepts
    ("square", "linf", 4, False), ("apgd-ce", "l2", 4, False)])
def test_square_under_l2_refuses_images_under_5_pixels_and_only_it(attack, norm, side, refused):
    torch.manual_seed(0)
    model = _Flat(side).eval()
    x = torch.rand(4, 1, side, side)
    y = model(x).argmax(1).detach()
    (stage,) = attack_stages(AutoAttackConfig(version="custom", attacks=[attack]), model,
                             Threat(norm, 3.0 if norm == "l2" else 0.5), seed=0)
    if refused:
        with pytest.raises(CardkitError, match=r"^AutoAttack's Square attack needs images of at least 5 x 5 "
                                               r"pixels under l2, these are \(4, 4\); use version: custom "
                                               r"without square$"):
            stage.run(x, y)
    else:
        assert stage.run(x, y).shape == x.shape
