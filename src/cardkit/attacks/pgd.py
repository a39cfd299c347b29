"""Projected gradient descent (Madry et al. 2018) under Linf or L2 threat models.

Losses: cross-entropy, the CW margin (Carlini & Wagner 2017) and the DLR loss (Croce & Hein 2020),
untargeted or targeted at the highest-scoring wrong classes of the clean input. With `best=True`
each sample keeps the best iterate of every step instead of the last one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES = ("ce", "dlr", "cw")


@dataclass(frozen=True)
class Threat:
    """Where the adversary may move an input: an `norm`-ball of radius `eps` intersected with [0,1]."""

    norm: Literal["linf", "l2", "l1"]  # PGD attacks linf and l2; AutoAttack all three
    eps: float

    def __post_init__(self):
        if self.norm not in ("linf", "l2", "l1"):
            raise ValueError(f"threat norm must be 'linf', 'l2' or 'l1', got {self.norm!r}")
        if self.eps < 0:
            raise ValueError(f"threat eps must be >= 0, got {self.eps}")


def default_step_size(eps: float, steps: int) -> float:
    """Madry et al.'s rule: 2.5 eps / steps, so PGD can cross the ball and come back."""
    return 2.5 * eps / steps


def cw_loss(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample CW margin to maximise: max_{j != y} z_j - z_y, positive exactly when the input is
    misclassified. Targeted: z_t - max_{j != t} z_j, positive exactly when t is predicted."""
    if target is None:
        return _max_other(logits, y) - logits.gather(1, y[:, None])[:, 0]
    return logits.gather(1, target[:, None])[:, 0] - _max_other(logits, target)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample difference-of-logits-ratio loss to maximise (Croce & Hein 2020), with z sorted
    in decreasing order as z_pi1 >= z_pi2 >= ...:

    untargeted: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12), needs 3 or more classes;
    targeted:   -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), needs 4 or more classes.

    It is invariant to shifting and scaling the logits, so a saturated softmax does not hide it.
    """
    need = 3 if target is None else 4
    if logits.shape[1] < need:
        raise ValueError(f"the {'targeted ' if target is not None else ''}DLR loss needs at least "
                         f"{need} classes, the model has {logits.shape[1]}: use loss='cw' or 'ce'")
    logits = logits.float()  # the 1e-12 guard vanishes in half precision
    top, index = logits.topk(need, dim=1)
    z_y = logits.gather(1, y[:, None])[:, 0]
    if target is None:
        max_other = torch.where(index[:, 0] == y, top[:, 1], top[:, 0])
        return -(z_y - max_other) / (top[:, 0] - top[:, 2] + 1e-12)
    z_t = logits.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *, steps: int,
        step_size: float | None = None, restarts: int = 1, random_start: bool = True,
        loss_fn: LossFn | None = None, loss: str = "ce", targeted: int = 0,
        best: bool = False) -> torch.Tensor:
    """Return adversarial inputs inside the threat's ball and [0,1].

    The step size defaults to 2.5 eps / steps (sign steps for Linf, unit-norm steps for L2).
    `loss` is the objective: "ce" (cross-entropy), "cw" (the margin max_{j != y} z_j - z_y) or
    "dlr" (see `dlr_loss`); `loss_fn(logits, y)` replaces it with any per-sample loss to maximise,
    where `y` may be any target that `loss_fn` understands (soft labels too).

    `targeted=n > 0` runs the attack once per target among the n highest-scoring wrong classes of
    the clean logits (fewer when the model has fewer), in that order, each run only on the samples
    that earlier runs did not misclassify: it minimises the cross-entropy to the target ("ce") or
    maximises the targeted margin ("cw": z_t - max_{j != t} z_j; "dlr": the targeted DLR loss).
    Success is always misclassification (prediction != y), whichever class it lands on.

    `restarts` repeats each run from a new random start, only on the samples not yet misclassified.

    `best=True` (for evaluation) keeps, per sample, the best of all iterates of all runs, the final
    one included: an iterate that is misclassified (the one with the largest margin
    max_{j != y} z_j - z_y if several are), else the one with the highest loss of its run (across
    runs: the highest margin). It costs one forward pass per run more than the k gradient passes.
    `best=False` (adversarial training) returns each sample's last iterate of the first run that
    misclassifies it, else of the last run.

    The model is run in the mode it is in (pgd never switches train/eval) and its parameter
    gradients are left untouched.
    """
    if threat.norm not in ("linf", "l2"):
        raise ValueError(f"PGD attacks linf and l2 balls, got {threat.norm!r} (AutoAttack handles l1)")
    if steps < 1:
        raise ValueError(f"PGD needs steps >= 1, got {steps}")
    if restarts < 1:
        raise ValueError(f"PGD needs restarts >= 1, got {restarts}")
    if loss not in LOSSES:
        raise ValueError(f"PGD loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
    if isinstance(targeted, bool) or not isinstance(targeted, int) or targeted < 0:
        raise ValueError(f"targeted must be an integer >= 0 (0: untargeted, n: the n highest-scoring "
                         f"wrong classes), got {targeted!r}")
    if loss_fn is not None and (loss != "ce" or targeted):
        raise ValueError("loss_fn replaces the built-in losses: give either loss_fn or loss/targeted")
    if (targeted or best) and (y.dim() != 1 or y.is_floating_point()):
        raise ValueError("targeted and best-iterate PGD need integer class labels y of shape (batch,)")
    if threat.eps == 0:
        return x.detach().clone()
    step_size = default_step_size(threat.eps, steps) if step_size is None else step_size

    targets = None
    if targeted:
        with torch.no_grad():
            clean = model(x.detach())
        n = min(targeted, clean.shape[1] - 1)
        targets = clean.scatter(1, y[:, None], float("-inf")).topk(n, dim=1).indices
    # One entry per run: the column of `targets` it aims at (None: untargeted).
    runs = [None] * restarts if targets is None else [i for i in range(targets.shape[1])
                                                      for _ in range(restarts)]

    result = x.detach().clone()
    kept_margin = torch.full((len(x),), float("-inf"), device=x.device) if best else None
    todo = torch.arange(len(x), device=x.device)
    for number, target_index in enumerate(runs):
        target = None if target_index is None else targets[todo, target_index]
        objective = _objective(loss_fn, loss, y[todo], target)
        last = number + 1 == len(runs)
        if best:
            adv, fooled, margin = _pgd_best(model, x[todo], y[todo], threat, steps, step_size,
                                            random_start, objective)
            better = margin > kept_margin[todo]
            result[todo[better]] = adv[better]
            kept_margin[todo[better]] = margin[better]
        else:
            adv = _pgd_once(model, x[todo], threat, steps, step_size, random_start, objective)
            result[todo] = adv
            if last:
                break
            with torch.no_grad():
                fooled = model(adv).argmax(1) != _labels(y[todo])
        todo = todo[~fooled]
        if len(todo) == 0:
            break
    return result


def _labels(y: torch.Tensor) -> torch.Tensor:
    return y if y.dim() == 1 else y.argmax(1)


def _max_other(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j per sample."""
    return logits.scatter(1, y[:, None], float("-inf")).amax(1)


def _objective(loss_fn, loss, y, target) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-sample objective to maximise, as a function of the logits."""
    if loss_fn is not None:
        return lambda logits: loss_fn(logits, y)
    if loss == "ce":
        if target is None:
            return lambda logits: F.cross_entropy(logits, y, reduction="none")
        return lambda logits: -F.cross_entropy(logits, target, reduction="none")
    chosen = cw_loss if loss == "cw" else dlr_loss
    return lambda logits: chosen(logits, y, target)


def _start(x, threat, random_start):
    """The projection onto the ball and the box, and the first iterate."""
    if threat.norm == "linf":
        # The ball and the box intersect in a box: precompute it, so each step is a few in-place ops.
        lower, upper = (x - threat.eps).clamp_(min=0), (x + threat.eps).clamp_(max=1)
        project = lambda adv: torch.maximum(adv, lower, out=adv).clamp_(max=upper)  # noqa: E731
    else:
        project = lambda adv: x + _project(x, adv - x, threat)  # noqa: E731
    return project, (project(x + _random_delta(x, threat)) if random_start else x.clone())


@torch.enable_grad()  # input gradients even when the caller runs under torch.no_grad()
def _pgd_once(model, x, threat, steps, step_size, random_start, objective):
    """The last iterate."""
    x = x.detach()
    project, adv = _start(x, threat, random_start)
    for _ in range(steps):
        adv.requires_grad_(True)
        # Summed loss: each sample's gradient is independent of the batch size.
        (grad,) = torch.autograd.grad(objective(model(adv)).sum(), adv)
        with torch.no_grad():
            adv = project(adv.detach().add_(_ascent_direction(grad, threat), alpha=step_size))
    return adv.detach()


@torch.enable_grad()
def _pgd_best(model, x, y, threat, steps, step_size, random_start, objective):
    """The best iterate of steps + 1 (the final one is scored by one more forward pass), whether
    it is misclassified, and its margin max_{j != y} z_j - z_y."""
    x = x.detach()
    project, adv = _start(x, threat, random_start)
    kept = adv.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    margin = torch.full((len(x),), float("-inf"), device=x.device)
    score = torch.full((len(x),), float("-inf"), device=x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)

    def keep(adv, logits, value):
        nonlocal kept, fooled, margin, score
        m = cw_loss(logits.float(), y)
        now = m > 0
        better = torch.where(now, ~fooled | (m > margin), ~fooled & (value > score))
        kept = torch.where(better.view(shape), adv, kept)
        fooled, margin = fooled | now, torch.where(better, m, margin)
        score = torch.where(better, value.float(), score)

    for _ in range(steps):
        adv.requires_grad_(True)
        logits = model(adv)
        value = objective(logits)
        (grad,) = torch.autograd.grad(value.sum(), adv)
        with torch.no_grad():
            # Score this iterate before the step overwrites it in place.
            keep(adv.detach(), logits.detach(), value.detach())
            adv = project(adv.detach().add_(_ascent_direction(grad, threat), alpha=step_size))
    with torch.no_grad():
        logits = model(adv)
        keep(adv, logits, objective(logits))
    return kept, fooled, margin


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
