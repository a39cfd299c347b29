"""Sanity checks of a robustness evaluation (Carlini et al. 2019; AutoAttack's own flags): signs
that an attack result overstates robustness. Each is logged as a warning and returned as a flag
for metrics.json."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cardkit.attacks import Threat, pgd

log = logging.getLogger(__name__)
CHECK_POINTS = 200  # points each check looks at: enough to see the effect, cheap next to the attacks
UNBOUNDED_MAX_ACCURACY = 0.05  # at an eps that covers the whole box, a sound attack leaves ~0
SQUARE_GAIN = 0.002  # accuracy Square may remove after the gradient stages before it is a red flag


def pre_checks(model: nn.Module, run, threat: Threat, robust: torch.Tensor) -> dict[str, Any]:
    """Before the attacks: randomness, probability outputs, zero input gradients."""
    x, y = run.batch(torch.arange(min(CHECK_POINTS, len(run.y))))
    with torch.no_grad():
        first, second = model(x), model(x)
    flags = {"randomized": bool((first - second).abs().max() > 1e-5 * (1 + first.abs().max())),
             "probability_outputs": bool(first.min() >= 0 and first.max() <= 1
                                         and torch.allclose(first.sum(1), torch.ones(len(first)).to(first), atol=1e-4)),
             "zero_gradient_samples": _zero_gradients(model, run, robust)}
    if flags["randomized"]:
        log.warning("the model's outputs change between two passes over the same inputs (dropout in eval "
                    "mode, noise): a randomized model needs autoattack version rand (EOT)")
    if flags["probability_outputs"]:
        log.warning("the model outputs probabilities, not logits: the attacks' losses saturate and "
                    "robust accuracy is overstated; evaluate the model before its softmax")
    if flags["zero_gradient_samples"]:
        log.warning("%d correctly classified inputs have an exactly zero loss gradient: the model may mask "
                    "gradients, and gradient attacks may overstate its robustness",
                    flags["zero_gradient_samples"])
    return flags


def post_checks(model: nn.Module, run, threat: Threat, state: dict) -> dict[str, Any]:
    """After the attacks: Square finding what gradients missed; the survivors at an eps so large
    that none should survive."""
    results = state["results"]
    flags: dict[str, Any] = {"robust_above_clean": bool(results and results[-1]["robust_accuracy"] > state["clean"])}
    square = [i for i, r in enumerate(results) if r["attack"] == "square" and i > 0]
    gain = results[square[0] - 1]["robust_accuracy"] - results[square[0]]["robust_accuracy"] if square else 0.0
    flags["black_box_gain"] = gain
    if gain > SQUARE_GAIN:
        log.warning("Square (a black-box attack) fooled %.2f%% of the points that the gradient attacks "
                    "missed: gradients are unreliable on this model (masking?)", 100 * gain)
    flags["unbounded_accuracy"] = _unbounded_accuracy(model, run, state["robust"])
    if flags["unbounded_accuracy"] > UNBOUNDED_MAX_ACCURACY:
        log.warning("at Linf eps 1 (any image reachable) PGD leaves %.1f%% of the surviving points correct; "
                    "a sound attack leaves about 0: the model may mask gradients", 100 * flags["unbounded_accuracy"])
    if flags["robust_above_clean"]:
        log.warning("robust accuracy is above clean accuracy: the evaluation is broken")
    return flags


def _zero_gradients(model: nn.Module, run, robust: torch.Tensor) -> int:
    """How many correctly classified inputs get an exactly zero cross-entropy input gradient."""
    count = 0
    for index in robust.nonzero().flatten()[:5 * CHECK_POINTS].split(run.batch_size):
        x, y = run.batch(index)
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
        count += int((grad.flatten(1).abs().amax(1) == 0).sum())
    return count


def _unbounded_accuracy(model: nn.Module, run, candidates: torch.Tensor) -> float:
    """PGD accuracy at Linf eps 1, where every image of the box is allowed, on a few of the points
    that survived the attacks (0 when none did)."""
    index = candidates.nonzero().flatten()[:CHECK_POINTS]
    if len(index) == 0:
        return 0.0
    x, y = run.batch(index)
    torch.manual_seed(0)
    # From x itself: a random start anywhere in the box would be misclassified by chance alone.
    x_adv = pgd(model, x, y, Threat("linf", 1.0), steps=20, random_start=False)
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())
