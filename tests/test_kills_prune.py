"""Exact values of prune/masked.py: binary scale, quantized masked layers and what they store."""

import pytest
import torch
from torch import nn

from cardkit.compress.quantize import QuantSpec, quantize_uniform
from cardkit.prune.masked import add_masks, binary_scale


def test_binary_scale_is_the_mean_kept_magnitude():
    weight = torch.tensor([[3.0, -6.0], [1.0, 2.0]])
    assert binary_scale(weight, torch.tensor([[0.0, 1.0], [0.0, 0.0]])).item() == 6.0  # one kept
    assert binary_scale(weight, torch.tensor([[1.0, 1.0], [1.0, 0.0]])).item() == pytest.approx(10 / 3)
    assert binary_scale(weight, torch.zeros(2, 2)).item() == 0.0


def _layer(spec):
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.3, -1.2, 0.9, 0.1], [2.0, -0.5, 0.25, -2.0]]))
    (layer,) = add_masks(model)
    with torch.no_grad():
        layer.mask.copy_(torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]]))
    layer.set_quantizer(spec)
    return layer


def test_quantized_layer_follows_in_place_changes_of_weight_and_mask():
    layer = _layer(QuantSpec("uniform", 3, per_channel=True))
    expected = quantize_uniform(layer.weight, layer.mask, bits=3, per_channel=True).values
    assert torch.equal(layer.quantized().values, expected)
    with torch.no_grad():
        layer.weight.mul_(2)
    assert torch.equal(layer.quantized().values, 2 * expected)
    with torch.no_grad():
        layer.mask.zero_()
    assert torch.equal(layer.quantized().values, torch.zeros(2, 4))
    (stored,) = layer.stored_tensors("0")
    assert stored.name == "0.weight" and stored.scheme == "uniform" and stored.per_channel is True


def test_kmeans_layer_fits_its_codebook_when_the_quantizer_is_set():
    layer = _layer(QuantSpec("kmeans", 1))
    # Kept weights 0.3, -1.2, 0.1, 2.0, -0.5, 0.25; one free centre, started at 0.4, the middle of
    # [-1.2, 2.0]. Lloyd: the values above 0.2 are {0.3, 0.25, 2.0}, mean 0.85; then those above
    # 0.425 are {2.0}, mean 2.0, where it stays.
    assert layer.codebook.tolist() == [0.0, 2.0]
    before = layer.quantized().values.clone()
    with torch.no_grad():
        layer.codebook.copy_(torch.tensor([0.0, 1.0]))
    assert not torch.equal(layer.quantized().values, before)
    assert torch.equal(layer.quantized().values, torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


def test_binary_layers_refuse_a_quantizer_and_store_signs():
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    (layer,) = add_masks(model)
    layer.binary = True
    with pytest.raises(ValueError, match=r"^binary layers are quantized already \(1 bit\)$"):
        layer.set_quantizer(QuantSpec("uniform", 4))


def test_a_plain_masked_layer_stores_float_values_even_when_they_look_binary():
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0]]))  # +-alpha, but not a binary layer
    (layer,) = add_masks(model)
    (stored,) = layer.stored_tensors("0")
    assert (stored.name, stored.scheme, stored.quantized) == ("0.weight", "float", None)
    assert stored.values.tolist() == [[1.0, -1.0]]
