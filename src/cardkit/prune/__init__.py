"""The pruning engine: masked layers, pruning methods and sparsity accounting."""

from cardkit.prune.masked import (MaskedConv2d, MaskedLayer, MaskedLinear, MaskGroup, add_masks,
                                  kept_count, masked_layers, prunable_layers, thin_layers)
from cardkit.prune.methods import (METHOD_CONFIGS, BipropConfig, EdgePopupConfig, GMPConfig, HydraConfig,
                                   LotteryConfig, prune_round,
                                   MagnitudeConfig, PruneSetup,
                                   method_config, method_names, prune_model, register_method,
                                   restore_masks, to_structured)
from cardkit.prune.report import sparsity_report
from cardkit.prune.atmc import AtmcConfig  # noqa: F401  (registers the atmc method)

__all__ = ["MaskedConv2d", "MaskedLayer", "MaskedLinear", "MaskGroup", "add_masks", "kept_count",
           "masked_layers", "prunable_layers", "METHOD_CONFIGS", "BipropConfig", "EdgePopupConfig", "GMPConfig", "LotteryConfig", "prune_round",
           "HydraConfig", "MagnitudeConfig",
           "PruneSetup", "method_config", "method_names", "prune_model", "register_method",
           "restore_masks", "sparsity_report", "thin_layers", "to_structured"]
