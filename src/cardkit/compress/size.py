"""Honest size accounting: what a compressed model costs to store, layer by layer.

A pruned layer stores its kept values (kept x bits; a binary layer stores signs, 1 bit each, plus
one float32 scale) and their positions, as the cheaper of a bitmap (one bit per weight) and
compressed indices (the gaps between kept positions, each in the fewest bits that hold the largest
gap). Every other parameter and buffer (biases, normalization) is stored as float32. Masks and
scores are training state, not part of the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cardkit.prune.masked import MaskedLayer, prunable_layers

FLOAT_BITS = 32


@dataclass(frozen=True)
class LayerSize:
    layer: str
    weights: int
    kept: int
    value_bits: int  # per kept value
    values: int  # bits
    positions: int  # bits
    position_format: str  # dense | bitmap | indices
    scales: int  # bits

    @property
    def bits(self) -> int:
        return self.values + self.positions + self.scales


@dataclass(frozen=True)
class SizeReport:
    layers: list[LayerSize]
    other_bits: int  # biases, normalization and other buffers, float32
    dense_bits: int  # the same model with every weight a float32 value

    @property
    def bits(self) -> int:
        return sum(layer.bits for layer in self.layers) + self.other_bits

    @property
    def bytes(self) -> int:
        return math.ceil(self.bits / 8)

    @property
    def compression_ratio(self) -> float:
        return self.dense_bits / max(self.bits, 1)

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "dense_bytes": math.ceil(self.dense_bits / 8),
                "compression_ratio": self.compression_ratio, "other_bytes": math.ceil(self.other_bits / 8),
                "layers": [{**asdict(layer), "bytes": math.ceil(layer.bits / 8)} for layer in self.layers]}


def model_size(model: nn.Module) -> SizeReport:
    layers = [_layer_size(name, module) for name, module in prunable_layers(model)]
    counted = {f"{layer.layer}.weight" for layer in layers}
    other = sum(p.numel() for name, p in model.named_parameters()
                if name not in counted and not name.endswith(".scores"))
    other += sum(t.numel() for name, t in model.named_buffers()
                 if not name.endswith(".mask") and t.is_floating_point())
    dense = sum(layer.weights for layer in layers)
    return SizeReport(layers, FLOAT_BITS * other, FLOAT_BITS * (dense + other))


def _layer_size(name: str, module: nn.Module) -> LayerSize:
    kept_flags = (module.mask if isinstance(module, MaskedLayer) else module.weight != 0).detach().flatten().bool()
    n, kept = kept_flags.numel(), int(kept_flags.sum())
    binary = isinstance(module, MaskedLayer) and module.binary
    value_bits = 1 if binary else FLOAT_BITS
    positions, form = position_bits(kept_flags)
    return LayerSize(name, n, kept, value_bits, kept * value_bits, positions, form,
                     FLOAT_BITS if binary else 0)


def position_bits(kept: torch.Tensor) -> tuple[int, str]:
    """Bits to store which of the flattened weights are kept, and the cheaper format."""
    n, count = kept.numel(), int(kept.sum())
    if count == n:
        return 0, "dense"
    if count == 0:
        return 0, "indices"
    index = torch.nonzero(kept).flatten()
    gaps = torch.diff(index, prepend=index.new_zeros(1))
    indices = count * max(1, int(gaps.max()).bit_length())
    return (n, "bitmap") if n <= indices else (indices, "indices")
