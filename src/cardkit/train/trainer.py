"""The epoch loop: objective -> backward -> optimizer step, evaluation every epoch, checkpoints.

A run is reproducible at the granularity of a batch: every epoch draws its data order,
augmentation and attack noise from seeds derived from (run seed, stage, epoch), and a mid-epoch
checkpoint also stores the RNG state, so a killed run resumes to the same weights.

Under torchrun the step runs data-parallel: every rank computes the objective (attacks included) on
its shard of the global batch inside one DistributedDataParallel forward, and the gradients are
averaged over the ranks in the backward pass, so the ranks keep identical weights.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from cardkit.config import TrainStageConfig
from cardkit.distributed import all_sum, gather_objects, world
from cardkit.errors import CardkitError, TrainingDiverged
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
    world_size: int = 1  # the data-parallel processes that trained it
    scaler: Optional[dict[str, Any]] = None  # fp16's loss scale, so a resumed run scales the same

    def to_meta(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step,
                "best_score": self.best_score, "best_epoch": self.best_epoch,
                "totals": self.totals if self.batch else None, "world_size": self.world_size,
                "scaler": self.scaler}


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


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _ObjectiveStep(nn.Module):
    """The whole objective (attacks and bounds included) as one module's forward, so that
    DistributedDataParallel sees one forward and one backward per step however many passes the
    objective makes through the model."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.objective(self.model, x, y)


def batchnorm_classes(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def restore_batchnorm(model: nn.Module, classes: dict[str, type]) -> None:
    """Swap SyncBatchNorm layers back to their classes before conversion, in place, with their
    parameters and statistics (bounds, export and one-process evaluation know those classes)."""
    for name, cls in classes.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, child_name)
        if isinstance(child, nn.SyncBatchNorm):
            plain = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            plain.load_state_dict(child.state_dict())
            device = next(itertools.chain(child.parameters(), child.buffers())).device
            setattr(parent, child_name, plain.to(device).train(child.training))


CheckpointFn = Callable[[TrainState, Optional[dict], bool], None]
"""save(state, epoch_metrics or None (mid-epoch), is_best)"""


class Trainer:
    def __init__(self, model: nn.Module, objective: Objective, config: TrainStageConfig,
                 loader, optimizer: torch.optim.Optimizer, *, seed: int, stage_id: int,
                 evaluate: Callable[[nn.Module], RobustnessResult], save: CheckpointFn,
                 forward_model: nn.Module | None = None, progress: bool = False,
                 describe: str = "train", on_step: Callable[[int, int], None] | None = None,
                 regularizer: Callable[[], torch.Tensor] | None = None, precision: str = "fp32",
                 sync_bn: bool = False):
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
        self.world = world()
        # data-parallel when the loader gives this rank its shard of each global batch
        parallel = self.world.size > 1 and getattr(loader, "shard", None) is not None
        self.sync_bn = sync_bn and parallel
        self.objective_step = self._parallel_step() if parallel else None
        device = next(model.parameters()).device
        self.dtype = PRECISIONS[precision]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def _parallel_step(self) -> DistributedDataParallel:
        device = next(self.model.parameters()).device
        step = _ObjectiveStep(self.forward_model, self.objective)
        if self.sync_bn:  # statistics of the global batch; swapped back after the stage
            self.batchnorm = batchnorm_classes(self.model)
            step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
        # channels_last weights with a size-1 dimension (1x1 kernels, one input channel) have strides
        # that differ from their gradients' only along it: the same memory, not a slower layout
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return DistributedDataParallel(step, device_ids=[device] if device.type == "cuda" else None)

    def fit(self, state: TrainState) -> TrainState:
        self.saved = state.step > 0  # resumed from a checkpoint of this stage
        state.world_size = self.world.size
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        for epoch in range(state.epoch, self.config.epochs):
            start = time.perf_counter()
            totals = self._train_epoch(epoch, state)
            row = self._end_epoch(epoch, state, totals, time.perf_counter() - start)
            state.history.append(row)
        if self.sync_bn:
            restore_batchnorm(self.model, self.batchnorm)
        return state

    def _train_epoch(self, epoch: int, state: TrainState) -> dict[str, float]:
        """Runs the rest of epoch `epoch`; returns its loss/accuracy sums."""
        self.model.train()
        if state.batch and state.rng is not None:
            set_rng_state(state.rng)
        else:
            # each rank draws its own attack noise (one process keeps the seeds it always had)
            ranked = (self.world.rank,) if self.objective_step is not None else ()
            torch.manual_seed(derive_seed(self.seed, self.stage_id, epoch, 1, *ranked))
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
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            out = self.objective(self.forward_model, x, y) if self.objective_step is None else self.objective_step(x, y)
        loss = out["loss"]
        penalty = self.regularizer() if self.regularizer is not None else 0.0
        value, correct, n = self._batch_totals((loss + penalty).detach(), out["logits"], y)
        if self.objective_step is not None:
            # DDP averages the ranks' gradients; weighing each shard by its size makes the average
            # the global batch's mean even when the shards differ in size
            loss = loss * (len(y) * self.world.size / self.loader.global_size(state.batch))
        loss = loss + penalty
        if not math.isfinite(value):
            kept = ("the last good checkpoint is kept" if self.saved else
                    "no checkpoint of this stage was written yet")
            raise TrainingDiverged(
                f"{self.describe}: loss is {value} at epoch {epoch + 1}, step {state.batch + 1} "
                f"(lr {lr:.3g}); {kept}: lower the learning rate or set grad_clip, then run again")
        self.optimizer.zero_grad(set_to_none=True)
        self._backward_and_step(loss)
        totals["loss"] += value * n
        totals["correct"] += correct
        totals["samples"] += n

    def _batch_totals(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float, int]:
        """The batch's mean loss, correct count and size over all ranks (one small all-reduce, done
        before the backward pass, so a diverged loss stops every rank at the same step)."""
        loss = loss.float()
        correct = (logits.detach().argmax(1) == y).sum()
        if self.objective_step is None:
            return float(loss), float(correct), len(y)
        sums = all_sum(torch.stack([loss * len(y), correct.double().to(loss.dtype),
                                    torch.tensor(float(len(y)), device=loss.device)]).double())
        return float(sums[0] / sums[2]), float(sums[1]), int(sums[2])

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
            if self.config.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.optimizer.step()
            return
        self.scaler.scale(loss).backward()  # fp16: scaled against underflow, steps skipped on inf
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _end_epoch(self, epoch, state, totals, seconds) -> dict:
        if self.objective_step is not None:
            self._check_ranks_agree(epoch)
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

    def _check_ranks_agree(self, epoch: int) -> None:
        """DDP keeps the ranks' weights equal only if every step outside the averaged gradient (a
        projection, a mask update, a codebook) is the same on every rank; a checksum per epoch
        tells, before a diverged rank's weights can be mistaken for the model's."""
        state = self.model.state_dict()
        checksum = torch.stack([t.detach().double().sum() for t in state.values() if t.is_floating_point()]).sum()
        sums = gather_objects(float(checksum))
        if len(set(sums)) > 1:
            raise CardkitError(f"{self.describe}: the processes' weights differ after epoch {epoch + 1} "
                               f"(checksums {', '.join(f'{v:.9g}' for v in sums)}): a step outside the averaged "
                               f"gradient is not the same on every rank; run it in one process")

    def _save(self, state: TrainState, row: Optional[dict], is_best: bool) -> None:
        state.scaler = self.scaler.state_dict() if self.scaler is not None else None
        self.save(state, row, is_best)
        self.saved = True
