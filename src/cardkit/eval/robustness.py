"""Robust accuracy under a sequence of attacks, with RobustBench's bookkeeping: one robust flag per
point, carried from attack stage to attack stage, so that each stage attacks only the points that
every earlier stage failed on, and the accuracy after each stage is reported (cumulative, as
AutoAttack prints it).

The evaluation can stop and resume: after every batch it hands its state (the flags, where it is,
the times so far) to `save`, and `evaluate_robustness(..., resume=state)` continues from it with
the same final numbers. Writing the state is the caller's business (the engine writes files).

Under torchrun the batches go round-robin to the ranks and the flags are reduced after each stage,
so the numbers equal one process's exactly: attack noise is seeded per stage and batch, not per
process. A sharded evaluation hands its state to `save` (on rank 0) after each stage only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from cardkit.attacks import Threat
from cardkit.attacks.registry import attack_stages, describe
from cardkit.config_base import Section
from cardkit.distributed import all_and, is_main, owns, world
from cardkit.eval.checks import post_checks, pre_checks

log = logging.getLogger(__name__)
TOLERANCE = 1e-5  # an adversarial point may exceed the ball by float rounding, no more


@dataclass(frozen=True)
class StageResult:
    attack: str  # the stage, e.g. "pgd-50", "apgd-ce", "square"
    robust_accuracy: float  # robust to this stage and every earlier one
    seconds: float


@dataclass(frozen=True)
class RobustnessResult:
    split: str
    samples: int
    clean_accuracy: float
    robust_accuracy: Optional[float]  # after the last stage; None when no attack ran
    norm: str
    eps: float
    attack: str  # the attacks and their budgets, e.g. "pgd-50 + autoattack standard, linf eps 0.3"
    stages: tuple[StageResult, ...] = ()
    settings: tuple[dict, ...] = ()  # each attack's config, as run
    checks: dict[str, Any] = field(default_factory=dict)  # sanity flags; see eval/checks.py
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RobustnessResult":
        """Read a saved result (also one written before per-stage results existed)."""
        data = dict(data)
        stages = tuple(StageResult(**s) for s in data.pop("stages", ()))
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "checks" not in known and "zero_gradient_samples" in data:
            known["checks"] = {"zero_gradient_samples": data["zero_gradient_samples"]}
        if "steps" in data and data.get("robust_accuracy") is not None:  # one PGD attack, as first recorded
            stages = (StageResult(data["attack"], data["robust_accuracy"], data.get("seconds", 0.0)),)
            known["attack"] = f"{data['attack']} x{data['restarts']}, {data['norm']} eps {data['eps']:.4g}"
        known["settings"] = tuple(known.get("settings", ()))
        return cls(**{**known, "stages": stages})


def evaluate_robustness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat,
                        attacks: Sequence[Section] = (), *, split: str = "test", batch_size: int = 500,
                        seed: int = 0, checks: bool = True, resume: Optional[dict] = None,
                        save: Optional[Callable[[dict], None]] = None) -> RobustnessResult:
    """Clean accuracy of `model` on (x, y), then the attacks in order on the surviving points.

    `x` holds images in [0, 1] (float, or uint8 in 0-255) on any device; batches move to the
    model's device. The model runs in eval mode and its mode is restored afterwards.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    # Attacks are seeded per stage and batch (a resumed run draws the same noise); the caller's
    # random stream is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            return _evaluate(model, x, y, threat, attacks, split, batch_size, seed, checks, resume, save,
                             device, start)
        finally:
            model.train(was_training)


def _evaluate(model, x, y, threat, attacks, split, batch_size, seed, checks, resume, save, device,
              start) -> RobustnessResult:
    run = _Run(model, x, y, device, batch_size)
    attack = threat.eps > 0 and len(attacks) > 0
    stages = [s for a in attacks for s in attack_stages(a, model, threat, seed)] if attack else []
    state = resume or {"stage": 0, "batch": 0, "clean": None, "robust": None, "start": None,
                       "results": [], "stage_seconds": 0.0, "seconds": 0.0, "checks": {}}
    if state["robust"] is None:
        state["robust"] = run.correct()
        state["clean"] = int(state["robust"].sum()) / len(y)
        state["checks"] = pre_checks(model, run, threat, state["robust"]) if checks and attack else {}
    level = logging.INFO if checks else logging.DEBUG  # a full evaluation, not a per-epoch one
    for index in range(state["stage"], len(stages)):
        _run_stage(run, stages[index], index, threat, state, seed, save, start, level)
    flags = {**state["checks"], **(post_checks(model, run, threat, state) if checks and attack else {})}
    results = tuple(StageResult(**r) for r in state["results"])
    return RobustnessResult(
        split=split, samples=len(y), clean_accuracy=state["clean"],
        robust_accuracy=results[-1].robust_accuracy if results else None, norm=threat.norm,
        eps=threat.eps, attack=_describe(attacks, threat) if attack else "none", stages=results,
        settings=tuple(a.model_dump(mode="json") for a in attacks) if attack else (), checks=flags,
        seconds=state["seconds"] + time.perf_counter() - start)


def _describe(attacks: Sequence[Section], threat: Threat) -> str:
    labels = [describe(a, threat) for a in attacks]
    budgets = {label.rsplit(", ", 1)[1] for label in labels}
    if len(budgets) == 1:  # the same ball for all: name it once
        return " + ".join(label.rsplit(", ", 1)[0] for label in labels) + ", " + budgets.pop()
    return " + ".join(labels)


class _Run:
    """The points and the model: batches by index, predictions, the ball check."""

    def __init__(self, model, x, y, device, batch_size):
        self.model, self.x, self.y, self.device, self.batch_size = model, x, y, device, batch_size

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(self.x.device)
        x = self.x[index].to(self.device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        return x, self.y[index].to(self.device)

    @torch.no_grad()
    def correct(self) -> torch.Tensor:
        flags = torch.ones(len(self.y), dtype=torch.bool)  # another rank's points: its flags decide
        for number, index in enumerate(torch.arange(len(self.y)).split(self.batch_size)):
            if owns(number):
                x, y = self.batch(index)
                flags[index] = (self.model(x).argmax(1) == y).cpu()
        return all_and(flags)


def _run_stage(run: _Run, stage, index: int, threat: Threat, state: dict, seed: int,
               save: Optional[Callable[[dict], None]], start: float, level: int) -> None:
    if state["batch"] == 0 or state["start"] is None:
        state["start"] = state["robust"].clone()
        state["stage_seconds"] = 0.0
    survivors = state["start"].nonzero().flatten()
    batches = survivors.split(run.batch_size) if len(survivors) else ()  # split() of nothing is one empty batch
    sharded = world().size > 1
    for number in range(state["batch"], len(batches)):
        if not owns(number):
            continue
        began = time.perf_counter()
        points = batches[number]
        x, y = run.batch(points)
        torch.manual_seed(seed * 1_000_003 + index * 10_007 + number)
        x_adv = stage.run(x, y).detach()
        with torch.no_grad():
            fooled = (run.model(x_adv).argmax(1) != y) & _inside(x_adv, x, threat, stage.label)
        state["robust"][points[fooled.cpu()]] = False
        state["stage_seconds"] += time.perf_counter() - began
        state["batch"] = number + 1
        if save is not None and number + 1 < len(batches) and not sharded:
            save(_with_time(state, start))
    state["robust"] = all_and(state["robust"])
    robust = int(state["robust"].sum()) / len(state["robust"])
    state["results"].append({"attack": stage.label, "robust_accuracy": robust,
                             "seconds": state["stage_seconds"]})
    log.log(level, "robust accuracy after %s: %.4f (%.1f s)", stage.label, state["results"][-1]["robust_accuracy"],
            state["stage_seconds"])
    state.update(stage=index + 1, batch=0, start=None, stage_seconds=0.0)
    if save is not None and is_main():
        save(_with_time(state, start))


def _with_time(state: dict, start: float) -> dict:
    return {**state, "seconds": state["seconds"] + time.perf_counter() - start}


def _inside(x_adv: torch.Tensor, x: torch.Tensor, threat: Threat, label: str) -> torch.Tensor:
    """Which adversarial points lie in the threat's ball and in [0, 1]; the others never count."""
    delta = (x_adv - x).flatten(1)
    size = {"linf": lambda d: d.abs().amax(1), "l2": lambda d: d.norm(dim=1),
            "l1": lambda d: d.abs().sum(1)}[threat.norm](delta)
    inside = (size <= threat.eps * (1 + TOLERANCE) + TOLERANCE) & (x_adv.flatten(1).amin(1) >= -TOLERANCE) \
        & (x_adv.flatten(1).amax(1) <= 1 + TOLERANCE)
    if not inside.all():
        log.warning("%s returned %d points outside the %s ball of radius %g or [0, 1]; they count as "
                    "robust", label, int((~inside).sum()), threat.norm, threat.eps)
    return inside
