"""Projected gradient descent (Madry et al. 2018) under Linf or L2 threat models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Threat:
    """Where the adversary may move an input: an `norm`-ball of radius `eps` intersected with [0,1]."""

    norm: Literal["linf", "l2"]
    eps: float

    def __post_init__(self):
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"threat norm must be 'linf' or 'l2', got {self.norm!r}")
        if self.eps < 0:
            raise ValueError(f"threat eps must be >= 0, got {self.eps}")


def default_step_size(eps: float, steps: int) -> float:
    """Madry et al.'s rule: 2.5 eps / steps, so PGD can cross the ball and come back."""
    return 2.5 * eps / steps


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *, steps: int,
        step_size: float | None = None, restarts: int = 1, random_start: bool = True,
        loss_fn: LossFn | None = None) -> torch.Tensor:
    """Return adversarial inputs inside the threat's ball and [0,1].

    With several restarts, a restart runs only on the samples that all earlier restarts failed to
    misclassify, and each sample keeps the first adversarial input that fools the model (else the
    last restart's). `loss_fn(logits, y)` must return per-sample losses to maximise (default:
    cross-entropy); `y` may be any target that `loss_fn` understands.
    """
    if steps < 1:
        raise ValueError(f"PGD needs steps >= 1, got {steps}")
    if threat.eps == 0:
        return x.detach().clone()
    step_size = default_step_size(threat.eps, steps) if step_size is None else step_size
    loss_fn = loss_fn or _cross_entropy
    best = x.detach().clone()
    todo = torch.arange(len(x), device=x.device)
    for restart in range(restarts):
        adv = _pgd_once(model, x[todo], y[todo], threat, steps, step_size, random_start, loss_fn)
        best[todo] = adv
        if restart + 1 == restarts:
            break
        with torch.no_grad():
            fooled = model(adv).argmax(1) != _labels(y[todo])
        todo = todo[~fooled]
        if len(todo) == 0:
            break
    return best


def _labels(y: torch.Tensor) -> torch.Tensor:
    return y if y.dim() == 1 else y.argmax(1)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _pgd_once(model, x, y, threat, steps, step_size, random_start, loss_fn):
    x = x.detach()
    if threat.norm == "linf":
        # The ball and the box intersect in a box: precompute it, so each step is a few in-place ops.
        lower, upper = (x - threat.eps).clamp_(min=0), (x + threat.eps).clamp_(max=1)
        project = lambda adv: torch.maximum(adv, lower, out=adv).clamp_(max=upper)  # noqa: E731
    else:
        project = lambda adv: x + _project(x, adv - x, threat)  # noqa: E731
    adv = project(x + _random_delta(x, threat)) if random_start else x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        # Summed loss: each sample's gradient is independent of the batch size.
        loss = loss_fn(model(adv), y).sum()
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = project(adv.detach().add_(_ascent_direction(grad, threat), alpha=step_size))
    return adv.detach()


def _random_delta(x: torch.Tensor, threat: Threat) -> torch.Tensor:
    if threat.norm == "linf":
        return (torch.rand_like(x) * 2 - 1) * threat.eps
    # Uniform in the L2 ball: a uniform direction and radius eps * u^(1/d).
    direction = torch.randn_like(x)
    direction = direction / _norms(direction).clamp_min(1e-12)
    dims = x[0].numel()
    radius = threat.eps * torch.rand(len(x), device=x.device, dtype=x.dtype) ** (1.0 / dims)
    return direction * radius.view(-1, *[1] * (x.dim() - 1))


def _ascent_direction(grad: torch.Tensor, threat: Threat) -> torch.Tensor:
    if threat.norm == "linf":
        return grad.sign()
    return grad / _norms(grad).clamp_min(1e-12)


def _project(x: torch.Tensor, delta: torch.Tensor, threat: Threat) -> torch.Tensor:
    """Project an L2 delta onto the eps-ball, then so that x + delta stays in [0,1].

    Clipping to [0,1] only shrinks each coordinate of delta, so the result stays in the ball.
    """
    scale = (threat.eps / _norms(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta * scale).clamp(0, 1) - x


def _norms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norms, shaped to broadcast against t."""
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))
