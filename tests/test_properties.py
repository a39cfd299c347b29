"""Properties that hold for every input, checked with Hypothesis: bit packing and position coding,
the quantizers, the masks' keep counts and the config parser's overrides.

Every test runs a fixed, derandomized set of examples, so the suite is reproducible."""

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from cardkit.compress.packing import (_encode_gaps, decode_positions, encode_positions, pack_uint,
                                      position_cost, unpack_uint)
from cardkit.compress.encode import decode_tensor, encode_tensor
from cardkit.compress.quantize import quantize_binary, quantize_kmeans, quantize_uniform
from cardkit.compress.stored import StoredTensor
from cardkit.config import RunConfig, dump_config, load_config, validate_config
from cardkit.errors import CardkitError
from cardkit.prune.masked import MaskGroup, add_masks

FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=25)


# --- packing and position coding ---------------------------------------------------------------


def reference_pack(values, width):
    """Bit by bit: field k at bits k*width .. k*width + width - 1, LSB first, little-endian bytes."""
    bits = [(int(v) >> b) & 1 for v in values for b in range(width)]
    return np.packbits(np.array(bits, dtype=np.uint8), bitorder="little")


@st.composite
def fields(draw):
    width = draw(st.integers(1, 32))
    values = draw(st.lists(st.integers(0, (1 << width) - 1), max_size=40))
    return width, np.array(values, dtype=np.int64)


@FAST
@given(fields())
def test_uint_fields_round_trip_in_exactly_ceil_n_width_over_8_bytes(case):
    width, values = case
    data = pack_uint(values, width)
    assert data.dtype == np.uint8 and data.size == math.ceil(len(values) * width / 8)
    np.testing.assert_array_equal(data, reference_pack(values, width))
    np.testing.assert_array_equal(unpack_uint(data, width, len(values)), values)


def gaps_of(kept):
    return np.diff(np.flatnonzero(kept), prepend=-1)


def gap_entries(gaps, width):
    """Closed form: a gap g takes ceil(g / (2^w - 1)) entries (the last one nonzero, escapes before)."""
    m = (1 << width) - 1
    return sum(-(-int(g) // m) for g in gaps)


def closed_form_cost(kept):
    """(bits, format): nothing when every weight is kept; else the cheaper of the n-bit bitmap and
    the best gap width's entries x width over widths 1..32, a tie going to the bitmap."""
    n, count = kept.size, int(kept.sum())
    if count == n:
        return 0, "dense"
    gaps = gaps_of(kept)
    best = min(gap_entries(gaps, w) * w for w in range(1, 33))
    return (best, "gaps") if best < n else (n, "bitmap")


@st.composite
def masks(draw):
    """Arbitrary masks: small ones bit by bit, larger sparse ones from a few (possibly far apart)
    kept indices, and dense ones with a few holes."""
    kind = draw(st.sampled_from(["bits", "sparse", "holes"]))
    if kind == "bits":
        return np.array(draw(st.lists(st.booleans(), max_size=80)), dtype=bool)
    n = draw(st.integers(1, 5000))
    indices = draw(st.lists(st.integers(0, n - 1), max_size=12))
    kept = np.zeros(n, dtype=bool)
    kept[indices] = True
    return ~kept if kind == "holes" else kept


@FAST
@given(masks())
def test_positions_round_trip_and_cost_the_closed_form_bits(kept):
    p = encode_positions(kept)
    np.testing.assert_array_equal(decode_positions(p), kept)
    assert p.n == kept.size
    assert (p.bits, p.format) == closed_form_cost(kept) == position_cost(kept)
    assert p.data.size == math.ceil(p.bits / 8)  # the stream is exactly the accounted bits
    if p.format == "gaps":
        assert p.entries == gap_entries(gaps_of(kept), p.width) and p.bits == p.entries * p.width


@FAST
@given(masks(), st.integers(1, 32))
def test_gaps_at_any_width_round_trip_with_the_closed_form_entry_count(kept, width):
    p = _encode_gaps(kept, width)
    np.testing.assert_array_equal(decode_positions(p), kept)
    assert p.entries == gap_entries(gaps_of(kept), width)
    assert p.data.size == math.ceil(p.entries * width / 8)


# --- quantizers ---------------------------------------------------------------------------------

FINITE = st.floats(-4.0, 4.0, allow_nan=False, width=32)


@st.composite
def weights_and_masks(draw):
    """A float32 weight (out x fan_in, some entries exactly zero) and a 0/1 mask."""
    out, fan_in = draw(st.integers(1, 5)), draw(st.integers(1, 12))
    values = st.one_of(FINITE, st.just(0.0), st.sampled_from([0.5, -0.5, 1.0, -1.0]))
    weight = draw(hnp.arrays(np.float32, (out, fan_in), elements=values))
    mask = draw(hnp.arrays(np.bool_, (out, fan_in)))
    return torch.from_numpy(weight), torch.from_numpy(mask).float()


def rows(t, per_channel):
    return t.reshape(t.shape[0], -1) if per_channel else t.reshape(1, -1)


@FAST
@given(weights_and_masks(), st.integers(2, 8), st.booleans())
def test_uniform_levels_zero_half_step_error_and_idempotence(case, bits, per_channel):
    weight, mask = case
    kept = mask.bool()
    q = quantize_uniform(weight, mask, bits=bits, per_channel=per_channel)
    top = 2 ** (bits - 1) - 1
    assert torch.equal(q.values[~kept], torch.zeros_like(q.values[~kept]))
    assert torch.equal(q.values[kept & (weight == 0)], torch.zeros_like(q.values[kept & (weight == 0)]))
    absmax = torch.where(rows(kept, per_channel), rows(weight, per_channel).abs(), 0).amax(1, keepdim=True)
    scale = absmax / top
    for value, w, keep, s in zip(rows(q.values, per_channel), rows(weight, per_channel),
                                 rows(kept, per_channel), scale):
        # At most 2^b - 1 levels, all multiples k x scale with |k| <= 2^(b-1) - 1 ...
        assert value[keep].unique().numel() <= 2 ** bits - 1
        if s > 0:
            steps = value[keep] / s
            assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= top + 1e-4
        # ... and within half a step of the weight (rounding to the nearest level).
        assert ((value[keep] - w[keep]).abs() <= s / 2 * (1 + 1e-5) + 1e-30).all()
    again = quantize_uniform(q.values, mask, bits=bits, per_channel=per_channel)
    assert torch.equal(again.codes, q.codes) and torch.equal(again.values, q.values)


@FAST
@given(weights_and_masks(), st.booleans())
def test_binary_is_plus_or_minus_the_mean_magnitude_and_idempotent(case, per_channel):
    weight, mask = case
    kept = mask.bool()
    q = quantize_binary(weight, mask, per_channel=per_channel)
    assert torch.equal(q.values[~kept], torch.zeros_like(q.values[~kept]))
    for value, w, keep in zip(rows(q.values, per_channel), rows(weight, per_channel), rows(kept, per_channel)):
        if keep.any():
            alpha = w[keep].double().abs().mean()
            # +alpha for w >= 0 (a kept zero included), -alpha below.
            expected = torch.where(w[keep] >= 0, alpha, -alpha)
            assert torch.allclose(value[keep].double(), expected, rtol=1e-5, atol=1e-30)
    # Idempotent up to the float32 rounding of a mean of n copies of alpha.
    again = quantize_binary(q.values, mask, per_channel=per_channel)
    assert torch.allclose(again.values, q.values, rtol=1e-6, atol=0)


@FAST
@given(weights_and_masks(), st.integers(1, 8), st.integers(0, 20))
def test_kmeans_codebook_zero_centre_and_idempotence(case, bits, iterations):
    weight, mask = case
    kept = mask.bool()
    q = quantize_kmeans(weight, mask, bits=bits, iterations=iterations)
    assert q.codebook.shape == (2 ** bits,) and q.codebook[0].item() == 0.0
    assert q.values.unique().numel() <= 2 ** bits
    assert torch.equal(q.values[~kept], torch.zeros_like(q.values[~kept]))
    assert torch.equal(q.values[kept & (weight == 0)], torch.zeros_like(q.values[kept & (weight == 0)]))
    assert torch.equal(q.values[kept], q.codebook[q.codes[kept]])
    # Every kept weight goes to a nearest centre.
    distance = (weight[kept].unsqueeze(1) - q.codebook).abs()
    chosen = (weight[kept] - q.values[kept]).abs()
    assert (chosen <= distance.min(1).values + 1e-6).all()
    # Quantizing the quantized weight again with its codebook changes nothing, Lloyd steps included.
    again = quantize_kmeans(q.values, mask, bits=bits, iterations=5, init=q.codebook)
    assert torch.equal(again.values, q.values) and torch.equal(again.codebook, q.codebook)


@FAST
@given(weights_and_masks(), st.sampled_from(["float", "uniform", "uniform_per_channel", "binary", "kmeans"]),
       st.integers(1, 8))
def test_encoded_streams_are_exactly_the_accounted_bits_and_decode_exactly(case, scheme, bits):
    weight, mask = case
    kept = mask.bool()
    per_channel = scheme == "uniform_per_channel"
    if scheme == "float":
        stored = StoredTensor("w", weight * mask, kept)
    elif scheme == "kmeans":
        q = quantize_kmeans(weight, mask, bits=bits)
        stored = StoredTensor("w", q.values, kept, "kmeans", q)
    else:
        q = (quantize_binary(weight, mask) if scheme == "binary"
             else quantize_uniform(weight, mask, bits=bits, per_channel=per_channel))
        stored = StoredTensor("w", q.values, kept, "uniform", q, per_channel)
    encoded = encode_tensor(stored)
    count = int(kept.sum())
    assert encoded.kept == count and encoded.value_stream_bits == count * encoded.value_bits
    # Each stream holds exactly its accounted bits, rounded up to whole bytes.
    assert encoded.values.nbytes == math.ceil(encoded.value_stream_bits / 8)
    assert encoded.positions.data.nbytes == math.ceil(encoded.positions.bits / 8)
    assert encoded.table.nbytes * 8 == encoded.table_bits
    assert encoded.bits == encoded.positions.bits + encoded.value_stream_bits + encoded.table_bits
    if encoded.scheme == "kmeans":  # the centres in use and codes just wide enough for them
        used = q.codes[kept].unique().numel()
        assert encoded.table.size == used and encoded.value_bits == max(1, math.ceil(math.log2(max(used, 1))))
    elif encoded.scheme == "uniform":  # one scale per row
        assert encoded.value_bits == bits and encoded.table.size == (weight.shape[0] if per_channel else 1)
    elif encoded.scheme == "binary":  # one sign bit per kept value, one alpha per row
        assert encoded.value_bits == 1 and encoded.table.size == (weight.shape[0] if per_channel else 1)
    assert torch.equal(decode_tensor(encoded), torch.where(kept, stored.values, 0))


# --- mask keep counts ----------------------------------------------------------------------------


@st.composite
def layered_scores(draw):
    """2-3 Linear layers and integer-valued scores from a small range (many ties)."""
    sizes = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 9)), min_size=1, max_size=3))
    scores = [draw(hnp.arrays(np.float32, size, elements=st.integers(-3, 3).map(float))) for size in sizes]
    return sizes, scores


@FAST
@given(layered_scores(), st.floats(0.0, 0.999), st.sampled_from(["layer", "global"]))
def test_mask_group_keeps_exactly_round_of_the_kept_fraction_and_the_largest_scores(case, sparsity, scope):
    sizes, scores = case
    model = nn.Sequential(*[nn.Linear(fan_in, out) for out, fan_in in sizes])
    layers = add_masks(model)
    with torch.no_grad():
        for layer, s in zip(layers, scores):
            layer.scores.copy_(torch.from_numpy(s))
    MaskGroup(layers, sparsity, scope).recompute()
    masks = [layer.mask for layer in layers]
    assert all(((m == 0) | (m == 1)).all() for m in masks)
    groups = [(m, layer.scores.abs()) for m, layer in zip(masks, layers)]
    if scope == "global":
        groups = [(torch.cat([m.flatten() for m in masks]), torch.cat([l.scores.abs().flatten() for l in layers]))]
    for mask, magnitude in groups:
        assert int(mask.sum()) == round((1 - sparsity) * mask.numel())
        kept, dropped = magnitude[mask == 1], magnitude[mask == 0]
        if kept.numel() and dropped.numel():  # ties fall either way, but never a smaller one kept
            assert kept.min() >= dropped.max()


# --- config overrides ----------------------------------------------------------------------------

NAME = st.from_regex(r"\A[A-Za-z0-9_-][A-Za-z0-9_.-]{0,15}\Z").filter(lambda s: set(s) != {"."})
SIMPLE_FLOAT = st.floats(1e-4, 10.0, allow_nan=False).map(lambda f: float(f"{f:.6g}"))
OVERRIDES = {  # key -> values it accepts
    "seed": st.integers(0, 10**6),
    "name": NAME,
    "threat.norm": st.sampled_from(["linf", "l2"]),
    "threat.eps": st.one_of(SIMPLE_FLOAT, st.just(0.0)),
    "data.batch_size": st.integers(1, 4096),
    "data.hflip": st.booleans(),
    "data.crop_padding": st.integers(0, 8),
    "model.channels_last": st.booleans(),
    "pretrain.epochs": st.integers(1, 1000),
    "pretrain.optimizer.name": st.sampled_from(["sgd", "adam"]),
    "pretrain.optimizer.lr": SIMPLE_FLOAT,
    "pretrain.optimizer.momentum": st.floats(0.0, 0.99).map(lambda f: float(f"{f:.4g}")),
    "pretrain.schedule.name": st.sampled_from(["cosine", "step", "constant"]),
    "pretrain.schedule.milestones": st.lists(st.integers(1, 100), max_size=4),
    "finetune.epochs": st.integers(1, 50),
    "evaluate.samples": st.integers(1, 10_000),
    "prune.methods": st.lists(st.tuples(st.sampled_from(["magnitude", "hydra", "gmp"]),
                                        st.sampled_from([0.0, 0.5, 0.9, 0.99])),
                              min_size=1, max_size=3, unique=True),
}


def text_of(value):
    """A value as written after --set key= (YAML)."""
    if isinstance(value, list) and value and isinstance(value[0], tuple):  # pruning methods
        return "[" + ", ".join(f"{{name: {name}, sparsity: {sparsity}}}" for name, sparsity in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return f"'{value}'"
    return str(value)


def field(config, key):
    for part in key.split("."):
        config = getattr(config, part)
    if key == "prune.methods":
        return [(method.name, method.sparsity) for method in config]
    return config


@SLOW
@given(st.dictionaries(st.sampled_from(sorted(OVERRIDES)), st.none(), min_size=1, max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: OVERRIDES[k] for k in keys})))
def test_valid_overrides_are_applied_and_round_trip_through_dump_and_load(chosen):
    overrides = [f"{key}={text_of(value)}" for key, value in chosen.items()]
    config = load_config(None, overrides)
    for key, value in chosen.items():
        assert field(config, key) == (tuple(value) if isinstance(field(config, key), tuple) else value), key
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(dump_config(config))
        assert load_config(path) == config
    assert validate_config({}, overrides) == validate_config(
        {}, [f"{key}={text_of(field(config, key))}" for key in chosen])


SECTIONS = {"": RunConfig, "data": RunConfig.model_fields["data"].annotation,
            "threat": RunConfig.model_fields["threat"].annotation,
            "pretrain": RunConfig.model_fields["pretrain"].annotation,
            "evaluate": RunConfig.model_fields["evaluate"].annotation}
SECTIONS["pretrain.optimizer"] = SECTIONS["pretrain"].model_fields["optimizer"].annotation
KEY = st.from_regex(r"\A[a-z][a-z0-9_]{0,14}\Z")


@SLOW
@given(st.sampled_from(sorted(SECTIONS)), KEY, st.sampled_from(["1", "x", "[1, 2]", "true"]), st.booleans())
def test_an_unknown_key_is_one_line_that_names_it(section, key, value, from_file):
    cls = SECTIONS[section]
    assume(key not in cls.model_fields and not (section == "evaluate" and key == "attack"))
    full = f"{section}.{key}" if section else key
    if from_file:  # written in the config itself
        raw = {key: value}
        for part in reversed(section.split(".") if section else []):
            raw = {part: raw}
        call = lambda: validate_config(raw)  # noqa: E731
    else:
        call = lambda: validate_config({}, [f"{full}={value}"])  # noqa: E731
    with pytest.raises(CardkitError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    assert f"unknown config key '{full}'" in message
