"""Weight quantizers for quantization-aware training: uniform, binary and k-means codebooks.

Each quantizer is a pure function of a weight tensor and an optional mask (None keeps every
weight). It returns the dequantized weight, exactly zero where the mask is zero, together with the
integer code of every weight and the float32 codebook the codes index, so that a compressed file
can store codes plus codebook. Quantization itself has no gradient: `straight_through` passes the
upstream gradient to the float weight unchanged (the straight-through estimator).

- uniform: symmetric levels k x scale, k in -(2^(b-1)-1) .. 2^(b-1)-1, scale = max |w| / (2^(b-1)-1)
  over the kept weights of the layer or of each output channel (dim 0). Zero is a level, so a
  pruned weight stays pruned. With one bit the only level would be zero, so bits=1 is binary.
- binary (biprop): alpha x sign(w), alpha = mean |w| over the kept weights of the layer or channel.
  A binary code has no zero: a kept weight that is exactly zero becomes +alpha.
- k-means (ATMC): a per-layer codebook of 2^b centres, centre 0 fixed at zero, the others fitted
  to the kept weights by Lloyd's algorithm in one dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Annotated, Literal

from pydantic import BeforeValidator

import torch

from cardkit.errors import CardkitError

MAX_BITS = 8


@dataclass(frozen=True)
class Quantized:
    values: torch.Tensor  # dequantized weight: input's shape and dtype, exactly 0 where mask == 0
    codes: torch.Tensor  # int64 index into the codebook (of its channel), one per weight
    codebook: torch.Tensor  # float32: values == codebook[codes] (per channel: its row); shapes below
    bits: int


@dataclass(frozen=True)
class QuantSpec:
    """How a layer's weight is quantized while it trains and when it is stored."""

    scheme: Literal["uniform", "kmeans"]
    bits: int
    per_channel: bool = False  # uniform only: one scale per output channel

    def __call__(self, weight: torch.Tensor, mask: torch.Tensor | None,
                 codebook: torch.Tensor | None = None) -> Quantized:
        """Uniform levels from the weight itself; k-means: the nearest centre of `codebook`
        (fitted separately, so that the result is a function of the layer's state)."""
        if self.scheme == "uniform":
            return quantize_uniform(weight, mask, bits=self.bits, per_channel=self.per_channel)
        return quantize_kmeans(weight, mask, bits=self.bits, iterations=0, init=codebook)


def check_bits(bits) -> int:
    """The bit width as an int, or a CardkitError if it is not an integer from 1 to 8."""
    if isinstance(bits, bool) or not isinstance(bits, Integral) or not 1 <= bits <= MAX_BITS:
        raise CardkitError(f"quantization bits must be an integer from 1 to {MAX_BITS}, got {bits!r}")
    return int(bits)


def _config_bits(bits) -> int:
    try:
        return check_bits(bits)
    except CardkitError as err:  # pydantic reports ValueErrors with the key's location
        raise ValueError(str(err)) from None


Bits = Annotated[int, BeforeValidator(_config_bits)]
"""A config field of quantization bits (1 to 8) with check_bits' error message."""


def quantize_uniform(weight: torch.Tensor, mask: torch.Tensor | None = None, *, bits: int,
                     per_channel: bool = False) -> Quantized:
    """Symmetric uniform levels. Codebook (levels,) per layer or (out_channels, levels) per
    channel, levels = 2^b - 1; bits=1 is `quantize_binary` (codebook (out_channels or 1, 2))."""
    if check_bits(bits) == 1:
        return quantize_binary(weight, mask, per_channel=per_channel)
    w, kept = _prepare(weight, mask)
    top = 2 ** (bits - 1) - 1
    rows = _rows(w, per_channel)
    absmax = torch.where(_rows(kept, per_channel), rows.abs(), 0).amax(dim=1, keepdim=True)
    scale = absmax / top
    # A channel with no nonzero kept weight has scale 0: every code is the zero level, no 0/0.
    steps = (rows / torch.where(scale > 0, scale, 1)).round().clamp(-top, top)
    # Code `top` is the zero level: removed weights get it, so values == codebook[codes] everywhere.
    codes = torch.where(kept, (steps.long() + top).view_as(w), top)
    codebook = uniform_codebook(scale.flatten(), bits)
    codebook = codebook if per_channel else codebook[0]
    return _result(weight, codes, codebook, kept, bits)


def uniform_codebook(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The levels k x scale, k = -(2^(b-1)-1) .. 2^(b-1)-1, one row per scale: a stored file
    keeps only the scales and rebuilds the codebook bitwise through this function."""
    top = 2 ** (bits - 1) - 1
    levels = torch.arange(-top, top + 1, device=scale.device, dtype=torch.float32)
    return levels * scale.float().reshape(-1, 1)


def quantize_binary(weight: torch.Tensor, mask: torch.Tensor | None = None, *,
                    per_channel: bool = False) -> Quantized:
    """alpha x sign(w) on the kept weights. Codebook (out_channels or 1, 2) = [-alpha, +alpha];
    code 1 is +alpha."""
    w, kept = _prepare(weight, mask)
    rows, kept_rows = _rows(w, per_channel), _rows(kept, per_channel)
    alpha = (rows.abs() * kept_rows).sum(dim=1) / kept_rows.sum(dim=1).clamp_min(1)
    codebook = torch.stack([-alpha, alpha], dim=1)
    codes = (w >= 0).long()
    return _result(weight, codes, codebook, kept, 1)


def quantize_kmeans(weight: torch.Tensor, mask: torch.Tensor | None = None, *, bits: int,
                    iterations: int = 20, init: torch.Tensor | None = None) -> Quantized:
    """A per-layer codebook (2^b,) with codebook[0] == 0, the other centres fitted by Lloyd's algorithm.

    The free centres start evenly spaced over [min, max] of the kept weights, or at `init` (a
    previous codebook, warm start). An empty cluster keeps its centre. Deterministic, CPU or CUDA.
    """
    size = 2 ** check_bits(bits)
    w, kept = _prepare(weight, mask)
    kept_values = w[kept]
    # Lloyd's steps read the clusters as runs of the sorted values
    values = kept_values.sort().values if iterations else kept_values
    centres = _initial_centres(values, size) if init is None else _warm_start(init, size, w.device)
    for _ in range(iterations):
        updated = _lloyd_step(values, centres)
        if torch.equal(updated, centres):
            break
        centres = updated
    codes = torch.zeros_like(w, dtype=torch.long)  # pruned weights: code 0, the zero centre
    codes[kept] = _nearest(kept_values, centres)  # only the kept ones are searched (a few % when sparse)
    return _result(weight, codes, centres, kept, bits)


def straight_through(weight: torch.Tensor, quantized_values: torch.Tensor) -> torch.Tensor:
    """Forward: `quantized_values`, exactly; backward: the gradient goes to `weight` unchanged."""
    return _StraightThrough.apply(weight, quantized_values.detach())


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|ref|^2 / |ref - approx|^2), in dB (inf if exact)."""
    reference = reference.detach().double()
    noise = (reference - approximation.detach().double()).square().sum().item()
    signal = reference.square().sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


class _StraightThrough(torch.autograd.Function):
    """Returns the quantized tensor itself (weight + (q - weight).detach() is off by rounding)."""

    @staticmethod
    def forward(ctx, weight, quantized):
        return quantized.view_as(quantized)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _prepare(weight: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight as detached float32 (half-precision weights are quantized at full precision)
    and the kept weights as a bool tensor."""
    w = weight.detach().float()
    if mask is None:
        return w, torch.ones_like(w, dtype=torch.bool)
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    return w, mask.detach() != 0


def _rows(t: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """One row per output channel, or a single row for the whole layer."""
    return t.reshape(t.shape[0], -1) if per_channel else t.reshape(1, -1)


def _result(weight: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, kept: torch.Tensor,
            bits: int) -> Quantized:
    values = torch.where(kept, _lookup(codebook, codes), 0).to(weight.dtype)
    return Quantized(values, codes, codebook, bits)


def _lookup(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    if codebook.dim() == 1 or codebook.shape[0] == 1:
        return codebook.reshape(-1)[codes]
    # Per channel: row c of the codebook serves output channel c.
    return codebook.gather(1, codes.reshape(codes.shape[0], -1)).view_as(codes)


def _initial_centres(values: torch.Tensor, size: int) -> torch.Tensor:
    """Zero, then size - 1 centres at the middles of equal cells over [min, max] of the kept
    values (all zero if nothing is kept)."""
    low, high = torch.aminmax(values) if values.numel() else (values.new_zeros(()),) * 2
    cells = (torch.arange(size - 1, device=values.device, dtype=torch.float32) + 0.5) / (size - 1)
    return torch.cat([values.new_zeros(1), low + (high - low) * cells])


def _warm_start(init: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    if init.numel() != size:
        raise ValueError(f"init has {init.numel()} centres, {size} are needed")
    centres = init.detach().to(device=device, dtype=torch.float32).flatten().clone()
    centres[0] = 0
    return centres


def _nearest(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre of every element of x, from the midpoints of the sorted centres."""
    ordered, order = centres.sort()
    return order[torch.searchsorted((ordered[1:] + ordered[:-1]) / 2, x.contiguous())]


def _lloyd_step(values: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Move each free centre to the mean of its cluster. With `values` sorted, every cluster is a
    contiguous run, so its sum is a difference of prefix sums: no scatter, deterministic on CUDA."""
    ordered, order = centres.sort()
    ends = torch.searchsorted(values, (ordered[1:] + ordered[:-1]) / 2, right=True)  # ties as in _nearest
    bounds = torch.cat([ends.new_zeros(1), ends, ends.new_full((1,), values.numel())])
    prefix = torch.cat([values.new_zeros(1, dtype=torch.float64), values.double().cumsum(0)])
    counts = bounds.diff()
    means = (prefix[bounds].diff() / counts.clamp_min(1)).float()
    updated = centres.clone()
    updated[order] = torch.where(counts > 0, means, ordered)
    updated[0] = 0  # the zero centre is fixed: pruned weights stay pruned
    return updated
