"""Per-channel input normalization as the first layer of every model."""

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Compute ``(x - mean) / std`` per channel.

    Kept as a plain affine module with ``(1, C, 1, 1)`` buffers so that bound
    propagation and attacks can treat model inputs as raw ``[0, 1]`` images.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
