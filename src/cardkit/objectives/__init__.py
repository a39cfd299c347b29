"""Training objectives: `(model, x, y) -> {"loss", "logits", ...}`.

An objective never loads data, never touches the optimizer and never knows which compression is
running. Each one is a config class (its `name` is the YAML tag) plus a handler registered for it.
"""

from cardkit.objectives.registry import (OBJECTIVE_CONFIGS, Objective, build_objective,
                                         register_objective)
from cardkit.objectives import standard  # noqa: F401  (registers natural, pgd_at, trades)
from cardkit.objectives.standard import NaturalConfig, PGDATConfig, TradesConfig

__all__ = ["OBJECTIVE_CONFIGS", "Objective", "build_objective", "register_objective",
           "NaturalConfig", "PGDATConfig", "TradesConfig"]
