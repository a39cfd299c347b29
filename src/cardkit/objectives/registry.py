"""The objective registry: handler table keyed by config type."""

from __future__ import annotations

import torch
from torch import nn

from cardkit.attacks import Threat
from cardkit.config_base import HandlerTable, Section


class Objective:
    """A training loss. Subclasses implement `__call__`; those with schedules (an eps ramp-up) also
    `set_progress`, which the trainer calls before every step with the fractional epoch."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def set_progress(self, epoch: float) -> None:
        pass


OBJECTIVES = HandlerTable("objective")
OBJECTIVE_CONFIGS = OBJECTIVES.configs
"""Config classes in registration order; config.py builds its tagged union from them."""
register_objective = OBJECTIVES.register
"""Decorator: `handler(config, threat) -> objective` becomes the handler of a config class."""


def build_objective(config: Section, threat: Threat) -> Objective:
    """The objective for a validated config; `threat` supplies eps and norm the config leaves unset."""
    return OBJECTIVES.handler(config)(config, threat)


SCHEDULE_FIELDS = ("eps_warmup_epochs", "warmup_epochs", "ramp_epochs")
"""Fields that ramp an objective in from the start of a stage (eps, kappa, beta schedules)."""


def settled(config: Section) -> Section:
    """The objective as it stands once its ramps are over: what a later stage inherits, since a
    pretrained model needs no second ramp-up from eps 0."""
    fields = type(config).model_fields
    return config.model_copy(update={f: 0.0 for f in SCHEDULE_FIELDS if f in fields}, deep=True)
