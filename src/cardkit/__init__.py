"""cardkit: compact, accurate and robust deep networks.

The verbs (`fit`, `compress_`, `evaluate`, `certified_accuracy`, `corruption_accuracy`, `size`,
`export`, `load_artifact`) work on any `nn.Module`; see `cardkit.api`. (Their names differ from
the subpackages `cardkit.train`, `cardkit.compress` and `cardkit.certify`, which an import would
otherwise put in their place.) The configs they take are exported
here too. Everything is imported on first use, so `import cardkit` does not import torch.
"""

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(["fit", "compress_", "evaluate", "certified_accuracy", "corruption_accuracy", "size",
                     "export", "Compressed"], "cardkit.api"),
    "load_artifact": "cardkit.compress.artifact",
    **dict.fromkeys(["NaturalConfig", "PGDATConfig", "TradesConfig", "IBPConfig", "CrownIBPConfig",
                     "MixTrainConfig", "GaussianConfig"], "cardkit.objectives"),
    **dict.fromkeys(["AugMixConfig", "NoiseConfig"], "cardkit.objectives.augment"),
    **dict.fromkeys(["MagnitudeConfig", "HydraConfig", "EdgePopupConfig", "BipropConfig", "GMPConfig",
                     "LotteryConfig", "AtmcConfig", "SnipConfig"], "cardkit.prune"),
    "QuantizeConfig": "cardkit.prune.methods",
    **dict.fromkeys(["PGDAttackConfig", "AutoAttackConfig"], "cardkit.attacks"),
    **dict.fromkeys(["OptimizerConfig", "ScheduleConfig"], "cardkit.config"),
    # extending cardkit: each decorator adds an entry to a registry that configs and the CLI read
    "register_model": "cardkit.models",
    "register_dataset": "cardkit.data.registry",
    "register_method": "cardkit.prune",
    "register_objective": "cardkit.objectives",
    "register_attack": "cardkit.attacks",
    "register_corruption": "cardkit.corrupt.registry",
    "Registry": "cardkit.registry",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cardkit' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted([*globals(), *_EXPORTS])
