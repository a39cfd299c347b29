"""The pruning engine: masked layers, pruning methods and sparsity accounting."""

from cardkit.prune.masked import (MaskedConv2d, MaskedLayer, MaskedLinear, MaskGroup, add_masks,
                                  kept_count, masked_layers, prunable_layers, thin_layers)
from cardkit.prune.methods import (METHOD_CONFIGS, BipropConfig, EdgePopupConfig, GMPConfig, HydraConfig,
                                   LotteryConfig, MagnitudeConfig, PruneContext, PruneMethodConfig,
                                   PruneSetup, PruneStage, SparsityConfig, method_config, method_names,
                                   prune_model, prune_round, register_method, restore_masks, restore_method,
                                   to_structured)
from cardkit.prune.report import sparsity_report
# Importing the method modules registers them (after the built-ins above, in this order).
from cardkit.prune.atmc import AtmcConfig  # noqa: F401
from cardkit.prune.snip import SnipConfig  # noqa: F401

__all__ = ["MaskedConv2d", "MaskedLayer", "MaskedLinear", "MaskGroup", "add_masks", "kept_count",
           "masked_layers", "prunable_layers", "METHOD_CONFIGS", "BipropConfig", "EdgePopupConfig",
           "GMPConfig", "HydraConfig", "LotteryConfig", "MagnitudeConfig", "PruneContext",
           "PruneMethodConfig", "PruneSetup", "PruneStage", "SparsityConfig", "method_config",
           "method_names", "prune_model", "prune_round", "register_method", "restore_masks",
           "restore_method", "sparsity_report", "thin_layers", "to_structured", "AtmcConfig", "SnipConfig"]
