"""Bit-level encoding of a compressed model file: fixed-width integer codes and kept positions.

Every stored weight tensor is written as *where* its kept weights are (`Positions`) plus *what*
they are (integer codes packed `width` bits each with `pack_uint`). Both are plain numpy so the
file format does not depend on torch, and everything is vectorised so that size accounting of
large models (`position_cost`) stays cheap.

Bit order is little-endian throughout: field k of a packed stream occupies bits
k*width .. k*width+width-1, least significant bit first, and bit j of the stream is bit j % 8 of
byte j // 8 (numpy's `bitorder="little"`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_WIDTH = 32
FORMATS = ("dense", "bitmap", "gaps")


# --- fixed-width unsigned integers -------------------------------------------------------------


def _nbytes(count: int, width: int) -> int:
    return (count * width + 7) // 8


def _check_width(width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"width must be an integer in 1..{MAX_WIDTH}, got {width!r}")


def pack_uint(values: np.ndarray, width: int) -> np.ndarray:
    """Concatenate non-negative integers as `width`-bit fields, LSB first, into ceil(n*width/8) bytes.

    Goes through each value's little-endian bytes, so the intermediate bit matrix holds
    n * 8*ceil(width/8) bytes at most and no Python loop runs over values or bits.
    """
    _check_width(width)
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    if values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if not (np.issubdtype(values.dtype, np.integer) or values.dtype == bool):
        raise ValueError(f"values must be integers, got dtype {values.dtype}")
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= 1 << width:
        raise ValueError(f"values must lie in 0..{(1 << width) - 1} for width {width}, got {lo}..{hi}")
    if width == 8:
        return values.astype(np.uint8)
    if width == 1:
        return np.packbits(values.astype(np.uint8), bitorder="little")
    n, nb = values.size, (width + 7) // 8
    as_bytes = values.astype("<u4").view(np.uint8).reshape(n, 4)[:, :nb]
    bits = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :width]  # (n, width)
    return np.packbits(bits, axis=None, bitorder="little")


def unpack_uint(data: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of `pack_uint`: the first `count` `width`-bit fields of `data`, as int64."""
    _check_width(width)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    data = np.asarray(data, dtype=np.uint8).ravel()
    need = _nbytes(count, width)
    if data.size < need:
        raise ValueError(f"{count} values of {width} bits need {need} bytes, got {data.size}")
    data = data[:need]
    if width == 8:
        return data.astype(np.int64)
    bits = np.unpackbits(data, count=count * width, bitorder="little")
    if width == 1:
        return bits.astype(np.int64)
    as_bytes = np.packbits(bits.reshape(count, width), axis=1, bitorder="little")  # (count, ceil(w/8))
    padded = np.zeros((count, 4), dtype=np.uint8)
    padded[:, : as_bytes.shape[1]] = as_bytes
    return padded.view("<u4").ravel().astype(np.int64)


# --- kept positions ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Positions:
    """Which of `n` flat weight positions are kept, in one of three encodings.

    dense: all kept, nothing stored. bitmap: one bit per weight. gaps: `entries` fields of
    `width` bits holding distances between kept positions, 0 meaning "skip 2**width-1, none
    here" (an escape), so rare long gaps do not force a wide field for every entry.
    """

    format: str
    n: int
    data: np.ndarray
    width: int = 0
    entries: int = 0

    @property
    def bits(self) -> int:
        """Stored size in bits (what size accounting charges for the positions)."""
        if self.format == "bitmap":
            return self.n
        if self.format == "gaps":
            return self.entries * self.width
        return 0


def _gaps(kept: np.ndarray) -> np.ndarray:
    """Distances (>= 1) from the previous kept position, the first measured from -1."""
    return np.diff(np.flatnonzero(kept), prepend=-1)


def _gap_entries(gaps: np.ndarray, width: int) -> int:
    """Number of `width`-bit entries the gaps need, escapes included."""
    return int(gaps.size + ((gaps - 1) // ((1 << width) - 1)).sum())


def _best_gap_width(gaps: np.ndarray, bound: int) -> tuple[int, int]:
    """(bits, width) of the cheapest gap width, trying widths only while they can beat `bound`.

    Cost(w) >= len(gaps)*w, so once that lower bound reaches the best so far no wider width
    can win; beyond bit_length(max gap) no escapes are left and cost only grows.
    """
    best_bits, best_width = bound, 0
    top = min(MAX_WIDTH, max(1, int(gaps.max()).bit_length()))
    for w in range(1, top + 1):
        if gaps.size * w >= best_bits:
            break
        bits = _gap_entries(gaps, w) * w
        if bits < best_bits:
            best_bits, best_width = bits, w
    return best_bits, best_width


def _choose(kept: np.ndarray) -> tuple[int, str, int]:
    """(bits, format, gap width) of the cheapest encoding; ties go to bitmap."""
    n = kept.size
    count = int(np.count_nonzero(kept))
    if count == n:
        return 0, "dense", 0
    if count == 0:
        return 0, "gaps", 1
    bits, width = _best_gap_width(_gaps(kept), bound=n)
    return (bits, "gaps", width) if width else (n, "bitmap", 0)


def _flat_bool(kept: np.ndarray) -> np.ndarray:
    return np.asarray(kept, dtype=bool).ravel()


def _encode_gaps(kept: np.ndarray, width: int) -> Positions:
    """Gap encoding at a given width (exposed so tests can force escapes)."""
    _check_width(width)
    kept = _flat_bool(kept)
    gaps = _gaps(kept)
    m = (1 << width) - 1
    escapes = (gaps - 1) // m
    entries = np.zeros(int(gaps.size + escapes.sum()), dtype=np.int64)  # zeros are the escapes
    entries[np.cumsum(escapes + 1) - 1] = gaps - m * escapes  # each gap's final entry, in 1..m
    return Positions("gaps", kept.size, pack_uint(entries, width), width, entries.size)


def encode_positions(kept: np.ndarray) -> Positions:
    """Encode a flat bool mask in whichever of dense / bitmap / gaps takes the fewest bits."""
    kept = _flat_bool(kept)
    _, fmt, width = _choose(kept)
    if fmt == "dense":
        return Positions("dense", kept.size, np.zeros(0, dtype=np.uint8))
    if fmt == "bitmap":
        return Positions("bitmap", kept.size, np.packbits(kept, bitorder="little"))
    return _encode_gaps(kept, width)


def position_cost(kept: np.ndarray) -> tuple[int, str]:
    """(bits, format) that `encode_positions` would produce, without packing anything."""
    bits, fmt, _ = _choose(_flat_bool(kept))
    return bits, fmt


def decode_positions(p: Positions) -> np.ndarray:
    """The flat bool mask of length `p.n` that `p` encodes; ValueError if `p` is inconsistent."""
    data = np.asarray(p.data, dtype=np.uint8).ravel()
    if p.format not in FORMATS:
        raise ValueError(f"unknown positions format {p.format!r}")
    if p.n < 0:
        raise ValueError(f"negative number of weights {p.n}")
    if p.format == "dense":
        if data.size:
            raise ValueError(f"dense positions store no data, got {data.size} bytes")
        return np.ones(p.n, dtype=bool)
    if p.format == "bitmap":
        if data.size != _nbytes(p.n, 1):
            raise ValueError(f"bitmap of {p.n} weights needs {_nbytes(p.n, 1)} bytes, got {data.size}")
        return np.unpackbits(data, count=p.n, bitorder="little").astype(bool)
    return _decode_gaps(data, p.n, p.width, p.entries)


def _decode_gaps(data: np.ndarray, n: int, width: int, entries: int) -> np.ndarray:
    _check_width(width)
    if entries < 0:
        raise ValueError(f"negative number of gap entries {entries}")
    need = _nbytes(entries, width)
    if data.size != need:
        raise ValueError(f"{entries} gap entries of {width} bits need {need} bytes, got {data.size}")
    e = unpack_uint(data, width, entries)
    pos = np.cumsum(np.where(e == 0, (1 << width) - 1, e)) - 1
    pos = pos[e != 0]
    if pos.size and pos[-1] >= n:
        raise ValueError(f"gap entries reach position {int(pos[-1])}, past the {n} weights")
    kept = np.zeros(n, dtype=bool)
    kept[pos] = True
    return kept
