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
