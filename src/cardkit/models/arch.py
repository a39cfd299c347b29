"""From an architecture record (`model.arch`) back to a model: the one way checkpoints, compressed
files and reports rebuild the models they describe."""

from __future__ import annotations

from torch import nn

from cardkit.errors import CardkitError
from cardkit.models.bounded import base_arch
from cardkit.models.channels import keep_channels
from cardkit.models.registry import create_model

REQUIRED = ("name", "num_classes", "in_channels", "input_size", "mean", "std")


def model_from_arch(arch: dict) -> nn.Module:
    """The model `arch` describes, with fresh weights (a state dict fills them): a registry model,
    made smaller when structured pruning removed channels (arch["structured"]: kept channels per
    layer, of the full-size model the rest of the record describes)."""
    if not isinstance(arch, dict) or not isinstance(arch.get("structured", {}), dict):
        raise CardkitError(f"arch={arch!r} is invalid; pass the `arch` dict of a cardkit model (model.arch)")
    missing = [key for key in REQUIRED if key not in arch]
    if missing:
        raise CardkitError(f"arch lacks {', '.join(missing)}; pass the `arch` dict of a cardkit model "
                           f"(model.arch)")
    model = create_model(**base_arch(arch))
    if "structured" in arch:
        keep_channels(model, arch["structured"])
    return model
