"""The attack registry: an evaluation runs a list of attacks, each a config class (its `name` is the
YAML tag) plus a handler that attacks one batch of points that are still robust.

A handler is `handler(config, model, threat, seed) -> stages`, where `stages` lists the attack's
stages in order (AutoAttack standard has four: APGD-CE, APGD-T, FAB-T, Square), each a
`(label, run)` with `run(x, y) -> adversarial x` for one batch. The evaluation keeps one robust flag
per point and records the accuracy after every stage, so each stage attacks only the survivors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from pydantic import Field
from torch import nn

from cardkit.attacks.pgd import Threat
from cardkit.config_base import HandlerTable, Section
from cardkit.numbers import Number

Norm = Literal["linf", "l2", "l1"]


class AttackSettings(Section):
    """What every attack accepts: its own eps and norm (default: the run's threat)."""

    eps: Optional[Number] = Field(None, ge=0)
    norm: Optional[Norm] = None

    @property
    def label(self) -> str:
        """The attack as reported; attacks with settings that matter name them too."""
        return self.name

    def threat(self, run_threat: Threat) -> Threat:
        return Threat(self.norm or run_threat.norm, run_threat.eps if self.eps is None else self.eps)


@dataclass(frozen=True)
class AttackStage:
    label: str  # as reported, e.g. "pgd-50" or "apgd-ce"
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # one batch of robust points -> x_adv


ATTACKS = HandlerTable("attack")
ATTACK_CONFIGS = ATTACKS.configs
"""Config classes in registration order; config.py builds its tagged union from them."""
register_attack = ATTACKS.register
"""Decorator: `handler(config, model, threat, seed) -> list[AttackStage]` becomes the handler."""
attack_config = ATTACKS.config


def attack_stages(config: Section, model: nn.Module, threat: Threat, seed: int) -> list[AttackStage]:
    """The stages of a validated attack config on `model`; `threat` is the run's (the config may
    override eps and norm)."""
    return ATTACKS.handler(config)(config, model, config.threat(threat), seed)


def describe(config: Section, threat: Threat) -> str:
    """One line naming an attack and its budget, e.g. 'autoattack standard, linf eps 0.3'."""
    threat = config.threat(threat)
    return f"{config.label}, {threat.norm} eps {threat.eps:.4g}"
