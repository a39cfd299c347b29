"""A stored weight tensor as bits: kept positions plus fixed-width codes and a small float table.

- float: the kept values as float32;
- uniform: codes of `bits` bits and one scale per row (layer or output channel), the codebook
  rebuilt by `uniform_codebook`;
- binary: one sign bit per kept value and one alpha per row;
- kmeans: the codebook's centres in use (at most 2^b) and codes of just enough bits to index them.

The size report counts exactly these streams, and the compressed file writes them, so the two
cannot drift apart. Decoding is exact: it returns the float32 values the model computed with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cardkit.compress.packing import Positions, decode_positions, encode_positions, pack_uint, unpack_uint
from cardkit.compress.quantize import uniform_codebook
from cardkit.compress.stored import StoredTensor

FLOAT_BITS = 32


@dataclass(frozen=True)
class EncodedTensor:
    name: str
    shape: tuple[int, ...]
    scheme: str  # float | uniform | binary | kmeans
    value_bits: int  # bits per kept value (32 for float)
    rows: int  # rows of the table: 1, or the output channels of a per-channel quantizer
    kept: int
    positions: Positions
    values: np.ndarray  # packed codes (uint8), or the kept values (float32)
    table: np.ndarray  # float32: scales (uniform), alphas (binary), the codebook (kmeans); else empty

    @property
    def weights(self) -> int:
        return math.prod(self.shape)

    @property
    def value_stream_bits(self) -> int:
        return self.kept * self.value_bits

    @property
    def table_bits(self) -> int:
        return FLOAT_BITS * self.table.size

    @property
    def bits(self) -> int:
        return self.positions.bits + self.value_stream_bits + self.table_bits


def encode_tensor(stored: StoredTensor) -> EncodedTensor:
    kept = stored.kept.detach().reshape(-1).cpu()
    positions = encode_positions(kept.numpy())
    q = stored.quantized
    if stored.scheme == "float" or q is None:
        values = stored.values.detach().reshape(-1).cpu()[kept].float().numpy()
        return EncodedTensor(stored.name, tuple(stored.values.shape), "float", FLOAT_BITS, 1,
                             int(kept.sum()), positions, values, np.zeros(0, np.float32))
    codes = q.codes.detach().reshape(-1).cpu()[kept].numpy()
    codebook = q.codebook.detach().cpu().float().reshape(-1, q.codebook.shape[-1])
    scheme = "binary" if q.bits == 1 and stored.scheme == "uniform" else stored.scheme  # 1-bit uniform
    if scheme == "uniform":
        table = codebook[:, codebook.shape[1] // 2 + 1]  # level 1 x scale = scale, exactly
        bits = q.bits
    elif scheme == "binary":
        table, bits = codebook[:, 1], 1
    else:  # k-means: only the centres in use are stored, the codes renumbered to them
        used = np.unique(codes)
        table, codes = codebook[0][used], np.searchsorted(used, codes)
        bits = max(1, (len(used) - 1).bit_length())
    encoded = EncodedTensor(stored.name, tuple(stored.values.shape), scheme, bits, codebook.shape[0],
                            len(codes), positions, pack_uint(codes, bits), table.numpy().copy())
    _check_exact(encoded, stored)
    return encoded


def decode_tensor(encoded: EncodedTensor) -> torch.Tensor:
    """The dense float32 tensor, exactly as encoded."""
    kept = torch.from_numpy(decode_positions(encoded.positions))
    if kept.numel() != encoded.weights or int(kept.sum()) != encoded.kept:
        raise ValueError(f"the positions hold {int(kept.sum())} kept of {kept.numel()} weights, "
                         f"{encoded.kept} of {encoded.weights} expected")
    out = torch.zeros(encoded.weights, dtype=torch.float32)
    out[kept] = _kept_values(encoded, kept)
    return out.view(encoded.shape)


def _kept_values(encoded: EncodedTensor, kept: torch.Tensor) -> torch.Tensor:
    if encoded.scheme == "float":
        return torch.from_numpy(np.asarray(encoded.values, dtype=np.float32).copy())
    codes = torch.from_numpy(unpack_uint(encoded.values, encoded.value_bits, encoded.kept))
    table = torch.from_numpy(np.asarray(encoded.table, dtype=np.float32).copy())
    if encoded.scheme == "kmeans":
        return table[codes]
    if encoded.scheme == "uniform":
        codebook = uniform_codebook(table, encoded.value_bits)
    else:  # binary: code 1 is +alpha
        codebook = torch.stack([-table, table], dim=1)
    row = kept.nonzero().flatten() // (encoded.weights // encoded.rows)
    return codebook[row, codes]


def _check_exact(encoded: EncodedTensor, stored: StoredTensor) -> None:
    """A quantized layer's codes must reproduce its values bitwise; anything else is a bug."""
    decoded = decode_tensor(encoded).view(-1)
    expected = torch.where(stored.kept, stored.values, 0).detach().reshape(-1).cpu().float()
    if not torch.equal(decoded, expected):
        raise AssertionError(f"{stored.name}: the {stored.scheme} codes do not reproduce the layer's values")
