"""Attacks: pure functions of (model, x, y, threat) that restore the model's mode on exit."""

from cardkit.attacks.pgd import Threat, cw_loss, default_step_size, dlr_loss, pgd
from cardkit.attacks.registry import ATTACK_CONFIGS, ATTACKS, attack_config, attack_stages, register_attack
# Importing the modules registers their attacks, in this order (the YAML tags' order).
from cardkit.attacks.builtin import PGDAttackConfig
from cardkit.attacks.autoattack import AutoAttackConfig

__all__ = ["Threat", "pgd", "default_step_size", "cw_loss", "dlr_loss", "ATTACKS", "ATTACK_CONFIGS",
           "attack_config", "attack_stages", "register_attack", "PGDAttackConfig", "AutoAttackConfig"]
