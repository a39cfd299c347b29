"""AutoAttack (Croce & Hein 2020) through the authors' own implementation, the `pyautoattack`
package: cardkit only splits it into its stages, so that every stage attacks the points that are
still robust, is reported on its own and can resume, as RobustBench does."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Literal, Optional

from pydantic import NonNegativeInt, model_validator

from cardkit.attacks.pgd import Threat
from cardkit.attacks.registry import AttackSettings, AttackStage, register_attack
from cardkit.errors import CardkitError

SubAttack = Literal["apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square"]
NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
CHECKS_LOGGER = "auto-attack"  # where pyautoattack logs its checks (randomness, probabilities, ...)


class AutoAttackConfig(AttackSettings):
    """`version`: standard (APGD-CE, APGD-T, FAB-T, Square), plus, rand (for randomized models)
    or custom with `attacks` listing the stages."""

    name: Literal["autoattack"] = "autoattack"
    version: Literal["standard", "plus", "rand", "custom"] = "standard"
    attacks: Optional[list[SubAttack]] = None
    seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _attacks_for_custom(self):
        if self.version == "custom" and not self.attacks:
            raise ValueError("version custom needs attacks, e.g. [apgd-ce, apgd-t, fab-t, square]")
        if self.version != "custom" and self.attacks is not None:
            raise ValueError(f"attacks is set by version {self.version}; use version: custom to choose them")
        return self

    @property
    def label(self) -> str:
        return "autoattack " + (self.version if self.version != "custom" else "+".join(self.attacks))


@register_attack(AutoAttackConfig)
def autoattack(config: AutoAttackConfig, model, threat: Threat, seed: int) -> list[AttackStage]:
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise CardkitError("autoattack needs the pyautoattack package (the official AutoAttack): "
                           "pip install pyautoattack") from None
    device = next(model.parameters()).device
    runner = AutoAttack(model, eps=threat.eps, norm=NORMS[threat.norm], version=config.version,
                        attacks=config.attacks if config.version == "custom" else None,
                        seed=config.seed + seed, device=device)
    runner.verbose = False
    return [AttackStage(name, _stage(runner, name)) for name in list(runner.attacks_to_run)]


def _stage(runner, name: str):
    def run(x, y):
        if name == "square" and runner.norm == "L2" and min(x.shape[-2:]) < 5:
            raise CardkitError(f"AutoAttack's Square attack needs images of at least 5 x 5 pixels under l2, "
                               f"these are {tuple(x.shape[-2:])}; use version: custom without square")
        runner.attacks_to_run = [name]
        with _quiet():
            x_adv, _ = runner.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv

    return run


@contextmanager
def _quiet() -> Iterator[None]:
    """pyautoattack's own checks warn on every call; cardkit runs them once (see eval/checks.py)."""
    logger = logging.getLogger(CHECKS_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
