from __future__ import annotations

import numpy as np
import pytest

from cardkit.compress.packing import (
    Positions,
    _encode_gaps,
    decode_positions,
    encode_positions,
    pack_uint,
    position_cost,
    unpack_uint,
)

LENGTHS = (0, 1, 7, 8, 9, 1000)


def _reference_pack(values: np.ndarray, width: int) -> np.ndarray:
    """Slow, obviously-correct bit-by-bit packing to check the fast one against."""
    bits = [(int(v) >> b) & 1 for v in values for b in range(width)]
    return np.packbits(np.array(bits, dtype=np.uint8), bitorder="little")


@pytest.mark.parametrize("width", range(1, 33))
def test_uint_round_trip(width: int) -> None:
    rng = np.random.default_rng(width)
    top = (1 << width) - 1
    for n in LENGTHS:
        values = rng.integers(0, top, size=n, endpoint=True, dtype=np.int64)
        if n:
            values[0], values[-1] = top, 0  # the extremes
        data = pack_uint(values, width)
        assert data.dtype == np.uint8
        assert data.size == (n * width + 7) // 8
        np.testing.assert_array_equal(unpack_uint(data, width, n), values)
        if n <= 9:
            np.testing.assert_array_equal(data, _reference_pack(values, width))
    all_max = np.full(9, top, dtype=np.int64)
    np.testing.assert_array_equal(unpack_uint(pack_uint(all_max, width), width, 9), all_max)


def test_uint_accepts_other_integer_dtypes() -> None:
    values = np.array([0, 5, 7, 3], dtype=np.uint8)
    np.testing.assert_array_equal(unpack_uint(pack_uint(values, 3), 3, 4), values)
    values = np.array([0, 2**32 - 1], dtype=np.uint64)
    np.testing.assert_array_equal(unpack_uint(pack_uint(values, 32), 32, 2), values.astype(np.int64))


def test_uint_rejects_bad_input() -> None:
    for width in (0, 33, -1):
        with pytest.raises(ValueError):
            pack_uint(np.array([0]), width)
        with pytest.raises(ValueError):
            unpack_uint(np.zeros(8, dtype=np.uint8), width, 1)
    with pytest.raises(ValueError):
        pack_uint(np.array([8]), 3)
    with pytest.raises(ValueError):
        pack_uint(np.array([-1]), 3)
    with pytest.raises(ValueError):
        pack_uint(np.array([2**32]), 32)
    with pytest.raises(ValueError):
        pack_uint(np.array([0.5]), 3)
    with pytest.raises(ValueError):
        unpack_uint(np.zeros(3, dtype=np.uint8), 5, 5)  # needs 4 bytes


def _round_trip(kept: np.ndarray) -> Positions:
    p = encode_positions(kept)
    np.testing.assert_array_equal(decode_positions(p), kept)
    assert p.n == kept.size and p.data.dtype == np.uint8
    assert position_cost(kept) == (p.bits, p.format)
    assert p.data.size == (p.bits + 7) // 8
    return p


def test_positions_all_and_none_kept() -> None:
    p = _round_trip(np.ones(100, dtype=bool))
    assert (p.format, p.bits, p.data.size) == ("dense", 0, 0)
    p = _round_trip(np.zeros(100, dtype=bool))
    assert (p.format, p.bits, p.entries) == ("gaps", 0, 0)
    p = _round_trip(np.zeros(0, dtype=bool))
    assert p.bits == 0


@pytest.mark.parametrize("index", [0, 4999])
def test_positions_single_kept(index: int) -> None:
    kept = np.zeros(5000, dtype=bool)
    kept[index] = True
    p = _round_trip(kept)
    assert p.format == "gaps" and p.entries * p.width < 64


@pytest.mark.parametrize("density", [0.5, 0.1, 0.01, 0.001])
def test_positions_random_masks(density: float) -> None:
    rng = np.random.default_rng(int(density * 1000))
    for n in (1, 9, 1000, 100_003):
        _round_trip(rng.random(n) < density)


def test_positions_clustered_run() -> None:
    kept = np.zeros(100_000, dtype=bool)
    kept[40_000:60_000] = True
    p = _round_trip(kept)
    assert p.format == "gaps" and p.bits < 100_000


def test_forced_small_width_uses_escapes() -> None:
    kept = np.zeros(20_000, dtype=bool)
    kept[[0, 10_000, 10_001]] = True
    for width in (1, 2, 3, 7, 14, 32):
        p = _encode_gaps(kept, width)
        m = (1 << width) - 1
        gaps = np.array([1, 10_000, 1])
        assert p.entries == int(((gaps - 1) // m + 1).sum())
        np.testing.assert_array_equal(decode_positions(p), kept)
    p = _encode_gaps(kept, 3)  # 10_000 = 1428 escapes of 7, then 4
    entries = unpack_uint(p.data, 3, p.entries)
    assert entries[0] == 1 and entries[-2:].tolist() == [4, 1]
    assert np.count_nonzero(entries == 0) == 1428


def test_forced_widths_all_round_trip() -> None:
    rng = np.random.default_rng(1)
    kept = rng.random(3000) < 0.05
    kept[-1] = True
    for width in range(1, 33):
        np.testing.assert_array_equal(decode_positions(_encode_gaps(kept, width)), kept)


def test_cheaper_format_chosen() -> None:
    rng = np.random.default_rng(0)
    sparse = rng.random(1_000_000) < 0.01
    p = _round_trip(sparse)
    assert p.format == "gaps" and p.bits < 1_000_000
    assert p.bits == min(_encode_gaps(sparse, w).bits for w in range(1, 33))
    assert _round_trip(rng.random(1_000_000) < 0.5).format == "bitmap"


def test_tie_prefers_bitmap() -> None:
    kept = np.array([True, False])  # bitmap 2 bits, gaps one 1-bit entry: gaps is cheaper
    assert position_cost(kept) == (1, "gaps")
    kept = np.array([False, True, False, True])  # bitmap 4 bits, gaps [2, 2] 4 bits at width 1 or 2
    assert position_cost(kept) == (4, "bitmap")


def test_position_cost_matches_encode() -> None:
    rng = np.random.default_rng(2)
    for _ in range(200):
        n = int(rng.integers(1, 300))
        kept = rng.random(n) < rng.random() ** 3
        p = encode_positions(kept)
        assert position_cost(kept) == (p.bits, p.format)
        np.testing.assert_array_equal(decode_positions(p), kept)


def test_decode_rejects_inconsistent_data() -> None:
    rng = np.random.default_rng(3)
    sparse = encode_positions(rng.random(10_000) < 0.01)
    bitmap = encode_positions(rng.random(10_000) < 0.5)
    assert (sparse.format, bitmap.format) == ("gaps", "bitmap")
    for p in (sparse, bitmap):
        with pytest.raises(ValueError):
            decode_positions(Positions(p.format, p.n, p.data[:-1], p.width, p.entries))
    with pytest.raises(ValueError):  # more entries claimed than bytes present
        decode_positions(Positions("gaps", sparse.n, sparse.data, sparse.width, sparse.entries + 8))
    with pytest.raises(ValueError):  # positions run past n
        decode_positions(Positions("gaps", 50, sparse.data, sparse.width, sparse.entries))
    with pytest.raises(ValueError):
        decode_positions(Positions("dense", 10, np.zeros(1, dtype=np.uint8)))
    with pytest.raises(ValueError):
        decode_positions(Positions("runs", 10, np.zeros(0, dtype=np.uint8)))
