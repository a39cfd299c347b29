"""Training objectives: `(model, x, y) -> {"loss", "logits", ...}`.

An objective never loads data, never touches the optimizer and never knows which compression is
running. Each one is a config class (its `name` is the YAML tag) plus a handler registered for it.
"""

from cardkit.objectives.registry import (OBJECTIVE_CONFIGS, OBJECTIVES, Objective, build_objective,
                                         register_objective, settled)
# Importing the modules registers their objectives, in this order (the YAML tags' order).
from cardkit.objectives.standard import NaturalConfig, PGDATConfig, TradesConfig
from cardkit.objectives.certified import CrownIBPConfig, GaussianConfig, IBPConfig, MixTrainConfig

__all__ = ["OBJECTIVES", "OBJECTIVE_CONFIGS", "Objective", "build_objective", "register_objective",
           "settled",
           "NaturalConfig", "PGDATConfig", "TradesConfig", "IBPConfig",
           "CrownIBPConfig", "MixTrainConfig", "GaussianConfig"]
