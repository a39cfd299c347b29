"""What a compressed model stores: every weight tensor as kept positions plus encoded values.

A layer describes its weights as `StoredTensor`s: a masked or plain layer has one (its weight), an
ATMC layer three (its factors U, V and sparse part C). Each holds exactly the tensor its forward
uses, so size accounting and the compressed file are computed from the same numbers the model
computes with, and a loaded file reproduces the outputs exactly. Layers with their own storage
define `stored_tensors(prefix)`; `factorized_weight` composes an ATMC layer's weight, the same
way in training and when a file is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from cardkit.compress.quantize import Quantized
from cardkit.models.layers import prunable_layers

Scheme = Literal["float", "uniform", "binary", "kmeans"]


@dataclass(frozen=True)
class StoredTensor:
    name: str  # the state-dict-style name, e.g. "features.0.weight" or "features.0.u"
    values: torch.Tensor  # exactly what the forward uses (float32), zero where not kept
    kept: torch.Tensor  # bool, values' shape: the positions that are stored
    scheme: Scheme = "float"
    quantized: Optional[Quantized] = None  # codes and codebook: values == codebook[codes] where kept
    per_channel: bool = False  # the codebook (or scale) has one row per output channel (dim 0)


def binary_codes(values: torch.Tensor, kept: torch.Tensor) -> Optional[Quantized]:
    """Signs and one scale when the kept values are exactly +-alpha (biprop), else None."""
    alpha = values[kept].abs().amax() if kept.any() else values.new_zeros(())
    codebook = torch.stack([-alpha, alpha]).reshape(1, 2)
    codes = (values > 0).long()
    if not torch.equal(torch.where(kept, codebook[0][codes], 0), torch.where(kept, values, 0)):
        return None
    return Quantized(values, codes, codebook, 1)


def stored_tensors(model: nn.Module) -> list[StoredTensor]:
    """Every Conv2d / Linear weight of the model, in module order."""
    tensors = []
    for name, module in prunable_layers(model):
        own = getattr(module, "stored_tensors", None)
        if own is not None:
            tensors += own(name)
        else:
            weight = module.weight.detach().float()
            tensors.append(StoredTensor(f"{name}.weight", weight, weight != 0))
    return tensors


def stored_names(model: nn.Module) -> set[str]:
    """The state-dict entries that `stored_tensors` (and training state) account for: parameters
    and buffers of the prunable layers that are not bias."""
    names = set()
    for name, module in prunable_layers(model):
        for key, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if key != "bias":
                names.add(f"{name}.{key}")
    return names


def factorized_weight(u: torch.Tensor, v: torch.Tensor, c: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """ATMC's W = U V + C with U (out, rank), V (rank, fan_in) and C (out, fan_in), in the layer's
    weight shape. The single place this product is computed, so a loaded file matches bitwise."""
    return torch.addmm(c, u, v).view(shape)
