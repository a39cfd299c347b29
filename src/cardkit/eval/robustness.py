"""Clean and PGD-robust accuracy, with RobustBench-style bookkeeping: only points that are still
classified correctly are attacked, so a misclassified point never costs an attack."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cardkit.attacks import Threat, default_step_size, pgd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RobustnessResult:
    split: str
    samples: int
    clean_accuracy: float
    robust_accuracy: Optional[float]  # None when no attack was run (eps = 0 or steps = 0)
    norm: str
    eps: float
    attack: str
    steps: int
    restarts: int
    step_size: Optional[float]
    zero_gradient_samples: int  # correctly classified inputs whose loss gradient is exactly zero
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_robustness(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                        threat: Threat, *, steps: int = 20, restarts: int = 1,
                        step_size: float | None = None, split: str = "test") -> RobustnessResult:
    """Clean accuracy, and PGD accuracy under `threat` when eps > 0 and steps > 0.

    The model is evaluated in eval mode and its mode is restored afterwards.
    """
    attack = threat.eps > 0 and steps > 0
    step_size = (step_size or default_step_size(threat.eps, steps)) if attack else None
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    clean = robust = total = zero_grad = 0
    try:
        for x, y in batches:
            with torch.no_grad():
                correct = model(x).argmax(1) == y
            clean += int(correct.sum())
            total += len(y)
            if attack and correct.any():
                zero_grad += _zero_gradients(model, x[correct], y[correct])
                x_adv = pgd(model, x[correct], y[correct], threat, steps=steps,
                            step_size=step_size, restarts=restarts)
                with torch.no_grad():
                    robust += int((model(x_adv).argmax(1) == y[correct]).sum())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluation got no samples")
    if zero_grad:
        log.warning("%d of %d attacked inputs have an exactly zero loss gradient: the model may mask "
                    "gradients, and PGD accuracy may overstate its robustness", zero_grad, clean)
    return RobustnessResult(
        split=split, samples=total, clean_accuracy=clean / total,
        robust_accuracy=robust / total if attack else None, norm=threat.norm, eps=threat.eps,
        attack=f"pgd-{steps}" if attack else "none", steps=steps if attack else 0,
        restarts=restarts if attack else 0, step_size=step_size, zero_gradient_samples=zero_grad,
        seconds=time.perf_counter() - start)


def _zero_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """How many inputs get an exactly zero input gradient (saturated softmax, masked gradients)."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return int((grad.flatten(1).abs().amax(1) == 0).sum())
