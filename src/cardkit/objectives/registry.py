"""The objective registry: handler table keyed by config type."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cardkit.attacks import Threat
from cardkit.config_base import Section


class Objective:
    """A training loss. Subclasses implement `__call__`; those with schedules (an eps ramp-up) also
    `set_progress`, which the trainer calls before every step with the fractional epoch."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def set_progress(self, epoch: float) -> None:
        pass


Handler = Callable[[Section, Threat], Objective]
_HANDLERS: dict[type[Section], Handler] = {}
OBJECTIVE_CONFIGS: list[type[Section]] = []
"""Config classes in registration order; config.py builds its tagged union from them."""


def register_objective(config_cls: type[Section]):
    """Decorator: `handler(config, threat) -> objective` becomes the handler of `config_cls`."""

    def decorate(handler: Handler) -> Handler:
        _HANDLERS[config_cls] = handler
        OBJECTIVE_CONFIGS.append(config_cls)
        return handler

    return decorate


def build_objective(config: Section, threat: Threat) -> Objective:
    """The objective for a validated config; `threat` supplies eps and norm the config leaves unset."""
    return _HANDLERS[type(config)](config, threat)
