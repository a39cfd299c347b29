"""cardkit's own PGD as an evaluation attack: cross-entropy, DLR or CW margin, optionally targeted."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, NonNegativeInt, PositiveInt

from cardkit.attacks.pgd import Threat, pgd
from cardkit.attacks.registry import AttackSettings, AttackStage, register_attack
from cardkit.errors import CardkitError
from cardkit.numbers import Number


class PGDAttackConfig(AttackSettings):
    """PGD with `restarts` random starts, keeping each point's best iterate; the step size is
    2.5 eps / steps unless set, so that the attack can cross the ball."""

    name: Literal["pgd"] = "pgd"
    steps: PositiveInt = 50
    restarts: PositiveInt = 1
    step_size: Optional[Number] = Field(None, gt=0)
    loss: Literal["ce", "dlr", "cw"] = "ce"
    targeted: NonNegativeInt = 0  # > 0: once per each of the n highest-scoring wrong classes
    random_start: bool = True

    @property
    def label(self) -> str:
        loss = "" if self.loss == "ce" else f"-{self.loss}"
        target = f"-t{self.targeted}" if self.targeted else ""
        restarts = f" x{self.restarts}" if self.restarts > 1 else ""
        return f"pgd{loss}{target}-{self.steps}{restarts}"


@register_attack(PGDAttackConfig)
def pgd_attack(config: PGDAttackConfig, model, threat: Threat, seed: int) -> list[AttackStage]:
    if threat.norm == "l1":
        raise CardkitError("pgd attacks linf and l2 balls; for l1 use autoattack (its APGD handles l1)")

    def run(x, y):
        return pgd(model, x, y, threat, steps=config.steps, step_size=config.step_size,
                   restarts=config.restarts, random_start=config.random_start, loss=config.loss,
                   targeted=config.targeted, best=True)

    return [AttackStage(config.label, run)]
