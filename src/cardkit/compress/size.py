"""Honest size accounting: what a compressed model costs to store, tensor by tensor.

Every weight tensor (see `stored.py`) costs its kept values (kept x bits: 32 for float, the
quantizer's bits, 1 for binary signs), its positions (the cheaper of a bitmap and gap-coded
indices; nothing when dense) and its table (scales, alphas or a k-means codebook, float32).
Every other parameter and buffer (biases, normalization) is a float32 value. Masks, scores,
codebook copies and optimizer state are training state, not part of the model. The numbers are
those of the encoded streams the compressed file writes (`encode.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cardkit.compress.encode import FLOAT_BITS, EncodedTensor, encode_tensor
from cardkit.compress.stored import stored_names, stored_tensors
from cardkit.models.arch import model_from_arch
from cardkit.models.bounded import base_arch
from cardkit.models.layers import prunable_layers


@dataclass(frozen=True)
class TensorSize:
    name: str
    weights: int
    kept: int
    scheme: str
    value_bits: int  # per kept value
    values: int  # bits
    positions: int  # bits
    position_format: str  # dense | bitmap | gaps
    tables: int  # bits of scales or codebooks

    @property
    def bits(self) -> int:
        return self.values + self.positions + self.tables

    @classmethod
    def of(cls, encoded: EncodedTensor) -> "TensorSize":
        return cls(encoded.name, encoded.weights, encoded.kept, encoded.scheme, encoded.value_bits,
                   encoded.value_stream_bits, encoded.positions.bits, encoded.positions.format,
                   encoded.table_bits)

    def to_dict(self) -> dict:
        return {"name": self.name, "weights": self.weights, "kept": self.kept, "scheme": self.scheme,
                "value_bits": self.value_bits, "values_bytes": self.values / 8,
                "positions_bytes": self.positions / 8, "position_format": self.position_format,
                "tables_bytes": self.tables / 8, "bytes": math.ceil(self.bits / 8)}


@dataclass(frozen=True)
class SizeReport:
    tensors: list[TensorSize]
    other_bits: int  # biases, normalization and other buffers, float32
    dense_bits: int  # the dense model: every weight and every other parameter a float32 value

    @property
    def bits(self) -> int:
        return sum(t.bits for t in self.tensors) + self.other_bits

    @property
    def bytes(self) -> int:
        return math.ceil(self.bits / 8)

    @property
    def compression_ratio(self) -> float:
        return self.dense_bits / max(self.bits, 1)

    def part_bytes(self, part: str) -> float:
        return sum(getattr(t, part) for t in self.tensors) / 8

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "dense_bytes": math.ceil(self.dense_bits / 8),
                "compression_ratio": self.compression_ratio, "values_bytes": self.part_bytes("values"),
                "positions_bytes": self.part_bytes("positions"), "tables_bytes": self.part_bytes("tables"),
                "other_bytes": self.other_bits / 8, "tensors": [t.to_dict() for t in self.tensors]}


def model_size(model: nn.Module) -> SizeReport:
    return size_of(encode_model(model)[0], model)


def encode_model(model: nn.Module) -> tuple[list[EncodedTensor], dict[str, torch.Tensor]]:
    """The encoded weight tensors and the other tensors stored as float32, by state-dict name."""
    return [encode_tensor(t) for t in stored_tensors(model)], other_tensors(model)


def size_of(encoded: list[EncodedTensor], model: nn.Module) -> SizeReport:
    other = sum(t.numel() for t in other_tensors(model).values())
    return SizeReport([TensorSize.of(e) for e in encoded], FLOAT_BITS * other, dense_bits(model))


def other_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Floating-point parameters and buffers outside the stored weights (biases, normalization)."""
    skip = stored_names(model)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: t for name, t in state.items() if name not in skip and t.is_floating_point()}


def dense_bits(model: nn.Module) -> int:
    """The dense fp32 model: every Conv2d / Linear weight and every other tensor a float32 value
    (of the full architecture, for a model rebuilt smaller by structured pruning)."""
    if "structured" in getattr(model, "arch", {}):
        model = model_from_arch(base_arch(model.arch))
    weights = sum(module.weight.numel() for _, module in prunable_layers(model))
    return FLOAT_BITS * (weights + sum(t.numel() for t in other_tensors(model).values()))
