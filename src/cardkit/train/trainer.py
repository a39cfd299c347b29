"""The epoch loop: objective -> backward -> optimizer step, evaluation every epoch, checkpoints.

A run is reproducible at the granularity of a batch: every epoch draws its data order,
augmentation and attack noise from seeds derived from (run seed, stage, epoch), and a mid-epoch
checkpoint also stores the RNG state, so a killed run resumes to the same weights.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cardkit.config import TrainStageConfig
from cardkit.errors import TrainingDiverged
from cardkit.eval import RobustnessResult
from cardkit.objectives import Objective
from cardkit.train.optim import learning_rate, set_learning_rate

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where a stage is: what a checkpoint must hold besides weights and optimizer state."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in the current epoch (0 at an epoch boundary)
    step: int = 0  # optimizer steps in this stage
    best_score: Optional[float] = None
    best_epoch: Optional[int] = None
    rng: Optional[dict[str, torch.Tensor]] = None  # RNG states, at mid-epoch checkpoints only
    # the current epoch's running loss / correct / sample sums (mid-epoch), so that a resumed
    # epoch reports the same training metrics as an uninterrupted one
    totals: Optional[dict[str, float]] = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_meta(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step,
                "best_score": self.best_score, "best_epoch": self.best_epoch,
                "totals": self.totals if self.batch else None}


def derive_seed(*parts: int) -> int:
    """An independent, well-mixed seed for each (run seed, stage, epoch, purpose)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


CheckpointFn = Callable[[TrainState, Optional[dict], bool], None]
"""save(state, epoch_metrics or None (mid-epoch), is_best)"""


class Trainer:
    def __init__(self, model: nn.Module, objective: Objective, config: TrainStageConfig,
                 loader, optimizer: torch.optim.Optimizer, *, seed: int, stage_id: int,
                 evaluate: Callable[[nn.Module], RobustnessResult], save: CheckpointFn,
                 forward_model: nn.Module | None = None, progress: bool = False,
                 describe: str = "train", on_step: Callable[[int, int], None] | None = None,
                 regularizer: Callable[[], torch.Tensor] | None = None):
        self.model = model
        self.forward_model = forward_model or model  # a compiled wrapper, when compiling
        self.objective = objective
        self.config = config
        self.loader = loader
        self.optimizer = optimizer
        self.seed, self.stage_id = seed, stage_id
        self.evaluate = evaluate
        self.save = save
        self.progress = progress
        self.describe = describe
        self.on_step = on_step  # on_step(steps done, total steps): e.g. a pruning schedule
        self.regularizer = regularizer  # a penalty added to the loss: e.g. ATMC's ADMM term

    def fit(self, state: TrainState) -> TrainState:
        self.saved = state.step > 0  # resumed from a checkpoint of this stage
        for epoch in range(state.epoch, self.config.epochs):
            start = time.perf_counter()
            totals = self._train_epoch(epoch, state)
            row = self._end_epoch(epoch, state, totals, time.perf_counter() - start)
            state.history.append(row)
        return state

    def _train_epoch(self, epoch: int, state: TrainState) -> dict[str, float]:
        """Runs the rest of epoch `epoch`; returns its loss/accuracy sums."""
        self.model.train()
        if state.batch and state.rng is not None:
            set_rng_state(state.rng)
        else:
            torch.manual_seed(derive_seed(self.seed, self.stage_id, epoch, 1))
        state.rng = None
        batches = self.loader.epoch(derive_seed(self.seed, self.stage_id, epoch, 0), start_batch=state.batch)
        totals = dict(state.totals) if state.batch and state.totals else {"loss": 0.0, "correct": 0.0, "samples": 0.0}
        state.totals = totals
        # disable=None hides the bar when stderr is not a terminal (CI logs).
        bar = tqdm(batches, total=len(self.loader), initial=state.batch,
                   disable=None if self.progress else True,
                   desc=f"{self.describe} {epoch + 1}/{self.config.epochs}", leave=False, dynamic_ncols=True)
        for x, y in bar:
            self._step(x, y, epoch, state, totals)
            bar.set_postfix(loss=f"{totals['loss'] / totals['samples']:.3f}",
                            acc=f"{totals['correct'] / totals['samples']:.3f}")
            state.batch += 1
            state.step += 1
            if self.on_step is not None:
                self.on_step(state.step, len(self.loader) * self.config.epochs)
            every = self.config.checkpoint_every
            if every and state.step % every == 0 and state.batch < len(self.loader):
                state.rng = rng_state()
                self._save(state, None, False)
                state.rng = None
        bar.close()
        return totals

    def _step(self, x, y, epoch, state, totals) -> None:
        steps_per_epoch = len(self.loader)
        lr = learning_rate(state.step, steps_per_epoch, self.config.epochs,
                           self.config.optimizer.lr, self.config.schedule)
        set_learning_rate(self.optimizer, lr)
        self.objective.set_progress(state.step / steps_per_epoch)
        out = self.objective(self.forward_model, x, y)
        loss = out["loss"]
        if self.regularizer is not None:
            loss = loss + self.regularizer()
        value = float(loss.detach())
        if not math.isfinite(value):
            kept = ("the last good checkpoint is kept" if self.saved else
                    "no checkpoint of this stage was written yet")
            raise TrainingDiverged(
                f"{self.describe}: loss is {value} at epoch {epoch + 1}, step {state.batch + 1} "
                f"(lr {lr:.3g}); {kept}: lower the learning rate or set grad_clip, then run again")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        n = len(y)
        totals["loss"] += value * n
        totals["correct"] += float((out["logits"].detach().argmax(1) == y).sum())
        totals["samples"] += n

    def _end_epoch(self, epoch, state, totals, seconds) -> dict:
        result = self.evaluate(self.model)
        score = result.robust_accuracy if result.robust_accuracy is not None else result.clean_accuracy
        is_best = state.best_score is None or score > state.best_score
        if is_best:
            state.best_score, state.best_epoch = score, epoch + 1
        state.epoch, state.batch = epoch + 1, 0
        samples = max(totals["samples"], 1)
        row = {"epoch": epoch + 1, "step": state.step,
               "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": totals["loss"] / samples, "train_accuracy": totals["correct"] / samples,
               f"{result.split}_accuracy": result.clean_accuracy,
               f"{result.split}_robust_accuracy": result.robust_accuracy,
               "seconds": seconds}
        log.info("%s epoch %d/%d: loss %.4f, train acc %.4f, %s acc %.4f%s, lr %.3g, %.1f s",
                 self.describe, epoch + 1, self.config.epochs, row["train_loss"], row["train_accuracy"],
                 result.split, result.clean_accuracy,
                 "" if result.robust_accuracy is None else f", {result.split} PGD acc {result.robust_accuracy:.4f}",
                 row["lr"], seconds)
        state.totals = None
        self._save(state, row, is_best)
        return row

    def _save(self, state: TrainState, row: Optional[dict], is_best: bool) -> None:
        self.save(state, row, is_best)
        self.saved = True
