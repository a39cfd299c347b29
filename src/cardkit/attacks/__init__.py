"""Attacks: pure functions of (model, x, y, threat) that restore the model's mode on exit."""

from cardkit.attacks.pgd import Threat, pgd, default_step_size

__all__ = ["Threat", "pgd", "default_step_size"]
