"""Weight quantizers: level counts, masks, codebooks, SQNR, k-means, straight-through, bit checks."""

import math

import pytest
import torch

from cardkit.compress.quantize import (Quantized, check_bits, quantize_binary, quantize_kmeans,
                                       quantize_uniform, sqnr_db, straight_through)
from cardkit.errors import CardkitError

SHAPES = [(16, 8, 3, 3), (10, 64)]
QUANTIZERS = {
    "uniform": lambda w, m, b: quantize_uniform(w, m, bits=b),
    "uniform_per_channel": lambda w, m, b: quantize_uniform(w, m, bits=b, per_channel=True),
    "binary": lambda w, m, b: quantize_binary(w, m),
    "binary_per_channel": lambda w, m, b: quantize_binary(w, m, per_channel=True),
    "kmeans": lambda w, m, b: quantize_kmeans(w, m, bits=b),
}


def weights(shape, sparsity=0.5):
    weight = torch.randn(shape) * 0.1
    mask = (torch.rand(shape) >= sparsity).float()
    return weight, mask


def lookup(q: Quantized) -> torch.Tensor:
    if q.codebook.dim() == 1 or q.codebook.shape[0] == 1:
        return q.codebook.reshape(-1)[q.codes]
    return q.codebook.gather(1, q.codes.reshape(q.codes.shape[0], -1)).view_as(q.codes)


def most_distinct(values: torch.Tensor, kept: torch.Tensor, per_row: bool) -> int:
    """The largest number of distinct values that one row (layer or output channel) takes where kept."""
    rows = values.shape[0] if per_row else 1
    return max(row[keep].unique().numel()
               for row, keep in zip(values.reshape(rows, -1), kept.reshape(rows, -1)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_levels_masks_and_codebook_lookup(shape, name, bits):
    weight, mask = weights(shape)
    q = QUANTIZERS[name](weight, mask, bits)
    kept = mask.bool()
    assert q.values.shape == weight.shape and q.values.dtype == weight.dtype
    assert q.codes.shape == weight.shape and q.codes.dtype == torch.int64
    assert q.codebook.dtype == torch.float32
    assert torch.equal(q.values[~kept], torch.zeros_like(q.values[~kept]))
    assert torch.equal(q.values[kept], lookup(q)[kept])
    per_row = name.endswith("per_channel")
    assert most_distinct(q.values, kept, per_row) <= 2 ** bits
    if not name.startswith("binary") and bits > 1:
        # Zero is a level of uniform and k-means codebooks; binary codes (and uniform at one bit,
        # which is binary) have none: their zeros are positions, stored apart from the values.
        assert most_distinct(q.values, torch.ones_like(kept), per_row) <= 2 ** bits


@pytest.mark.parametrize("shape", SHAPES)
def test_codebook_shapes(shape):
    weight, mask = weights(shape)
    out = shape[0]
    assert quantize_uniform(weight, mask, bits=4).codebook.shape == (15,)
    assert quantize_uniform(weight, mask, bits=4, per_channel=True).codebook.shape == (out, 15)
    assert quantize_uniform(weight, mask, bits=1).codebook.shape == (1, 2)  # bits=1 is binary
    assert quantize_binary(weight, mask).codebook.shape == (1, 2)
    assert quantize_binary(weight, mask, per_channel=True).codebook.shape == (out, 2)
    assert quantize_kmeans(weight, mask, bits=3).codebook.shape == (8,)


def test_binary_matches_biprop_alpha_sign():
    weight, mask = weights((16, 8, 3, 3))
    alpha = (weight.abs() * mask).sum() / mask.sum()
    q = quantize_binary(weight, mask)
    assert torch.allclose(q.values, alpha * weight.sign() * mask)
    assert q.codebook[0, 1] == alpha.float()


@pytest.mark.parametrize("shape", SHAPES)
def test_sqnr_thresholds_for_gaussian_weights(shape):
    weight = torch.randn(shape)
    uniform8 = sqnr_db(weight, quantize_uniform(weight, bits=8).values)
    uniform4 = sqnr_db(weight, quantize_uniform(weight, bits=4).values)
    kmeans4 = sqnr_db(weight, quantize_kmeans(weight, bits=4).values)
    binary = sqnr_db(weight, quantize_binary(weight).values)
    assert uniform8 > 40 and uniform4 > 15
    assert kmeans4 >= uniform4
    assert binary > 0


@pytest.mark.parametrize("shape", SHAPES)
def test_per_channel_beats_per_layer_when_channel_scales_differ(shape):
    scales = torch.logspace(-3, 0, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    weight, mask = weights(shape)
    weight = weight * scales
    reference = weight * mask
    for bits in (2, 4, 8):
        per_layer = sqnr_db(reference, quantize_uniform(weight, mask, bits=bits).values)
        per_channel = sqnr_db(reference, quantize_uniform(weight, mask, bits=bits, per_channel=True).values)
        assert per_channel >= per_layer
    binary_layer = sqnr_db(reference, quantize_binary(weight, mask).values)
    binary_channel = sqnr_db(reference, quantize_binary(weight, mask, per_channel=True).values)
    assert binary_channel >= binary_layer


@pytest.mark.parametrize("bits", range(1, 9))
def test_kmeans_zero_centre_determinism_and_warm_start(bits):
    weight, mask = weights((16, 8, 3, 3))
    reference = weight * mask
    q = quantize_kmeans(weight, mask, bits=bits)
    assert q.codebook.shape == (2 ** bits,) and q.codebook[0].item() == 0.0
    again = quantize_kmeans(weight, mask, bits=bits)
    assert torch.equal(q.codebook, again.codebook) and torch.equal(q.codes, again.codes)
    warm = quantize_kmeans(weight, mask, bits=bits, init=q.codebook)
    assert warm.codebook[0].item() == 0.0
    assert sqnr_db(reference, warm.values) >= sqnr_db(reference, q.values)


def test_kmeans_warm_start_from_a_codebook_with_a_nonzero_first_entry_pins_it_to_zero():
    weight = torch.randn(10, 64)
    init = torch.linspace(-2, 2, 8)
    q = quantize_kmeans(weight, bits=3, init=init)
    assert q.codebook[0].item() == 0.0
    with pytest.raises(ValueError):
        quantize_kmeans(weight, bits=4, init=init)


def test_straight_through_forward_is_exact_and_gradient_passes_unchanged():
    weight = (torch.randn(10, 64) * 0.1).requires_grad_()
    q = quantize_uniform(weight, bits=3)
    out = straight_through(weight, q.values)
    assert torch.equal(out, q.values)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert torch.equal(weight.grad, upstream)


@pytest.mark.parametrize("bits", [0, 9, 2.5, True, "4", -1])
def test_check_bits_rejects_with_one_line(bits):
    with pytest.raises(CardkitError) as error:
        check_bits(bits)
    assert "\n" not in str(error.value) and "1 to 8" in str(error.value)


def test_check_bits_accepts_1_to_8():
    assert [check_bits(b) for b in range(1, 9)] == list(range(1, 9))


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_all_zero_kept_weights_give_zeros_without_nan(name, bits):
    weight, mask = weights((16, 8, 3, 3))
    zeroed = weight * (1 - mask)  # every kept weight is zero
    for m in (mask, torch.zeros_like(mask)):
        q = QUANTIZERS[name](zeroed, m, bits)
        assert torch.isfinite(q.codebook).all() and torch.isfinite(q.values).all()
        if not name.startswith("binary"):
            assert torch.equal(q.values, torch.zeros_like(weight))
        assert torch.equal(q.values[~m.bool()], torch.zeros_like(weight)[~m.bool()])


def test_binary_of_all_zero_kept_weights_is_zero():
    weight = torch.zeros(10, 64)
    assert torch.equal(quantize_binary(weight).values, weight)
    assert torch.equal(quantize_binary(weight, per_channel=True).values, weight)


def test_half_precision_and_bool_masks():
    weight, mask = weights((10, 64))
    q = quantize_kmeans(weight.half(), mask.bool(), bits=4)
    assert q.values.dtype == torch.float16 and q.codebook.dtype == torch.float32
    assert torch.equal(q.values[~mask.bool()], torch.zeros_like(q.values[~mask.bool()]))


def test_sqnr_db_edge_cases():
    x = torch.randn(100)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, torch.zeros_like(x)) == pytest.approx(0.0)
    assert sqnr_db(x, 0.9 * x) == pytest.approx(20.0)
