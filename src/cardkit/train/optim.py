"""Optimizers and per-step learning-rate schedules with linear warm-up."""

from __future__ import annotations

import math

import torch
from cardkit.config import OptimizerConfig, ScheduleConfig


def build_optimizer(params, config: OptimizerConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, betas=tuple(config.betas),
                            weight_decay=config.weight_decay)


def learning_rate(step: int, steps_per_epoch: int, epochs: int, base_lr: float,
                  schedule: ScheduleConfig) -> float:
    """The learning rate for optimizer step `step` (0-based).

    A pure function of the step, so a resumed run needs nothing but the step count.
    """
    total = steps_per_epoch * epochs
    warmup = min(round(schedule.warmup_epochs * steps_per_epoch), total)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule.name == "constant":
        return base_lr
    if schedule.name == "step":
        epoch = step // steps_per_epoch
        return base_lr * schedule.gamma ** sum(epoch >= m for m in schedule.milestones)
    progress = (step - warmup) / max(total - warmup, 1)
    return schedule.min_lr + (base_lr - schedule.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

