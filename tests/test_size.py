"""Size accounting: values, positions (bitmap or indices, whichever is smaller) and scales."""

import torch
from torch import nn

from cardkit.compress import model_size
from cardkit.compress.size import position_bits
from cardkit.models import create_model
from cardkit.prune import method_config, prune_model
from cardkit.prune.masked import kept_count


def test_position_bits_picks_the_cheaper_format():
    n = 10_000
    dense = torch.ones(n, dtype=torch.bool)
    assert position_bits(dense) == (0, "dense")
    half = torch.arange(n) % 2 == 0
    assert position_bits(half) == (n, "bitmap")  # 5000 indices would cost more than 10000 bits
    sparse = torch.zeros(n, dtype=torch.bool)
    sparse[::1000] = True  # 10 kept, gaps of 1000: 10 bits each
    assert position_bits(sparse) == (10 * 10, "indices")


def test_dense_model_size_is_its_float32_parameters_and_buffers():
    model = create_model("cnn_small", 10, 1, 28)
    report = model_size(model)
    floats = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers() if b.is_floating_point())
    assert report.bits == 32 * floats and report.compression_ratio == 1.0
    assert all(layer.position_format == "dense" for layer in report.layers)


def test_pruned_and_binary_models_count_kept_values_positions_and_scales():
    torch.manual_seed(0)
    model = create_model("cnn_small", 10, 1, 28)
    setup = prune_model(model, method_config("magnitude", sparsity=0.9))
    report = model_size(setup.model)
    for layer in report.layers:
        assert layer.kept == kept_count(layer.weights, 0.9)
        assert layer.values == 32 * layer.kept and layer.positions <= layer.weights
    assert 5 < report.compression_ratio < 10  # positions and the dense biases cost something

    binary = prune_model(create_model("cnn_small", 10, 1, 28), method_config("biprop", sparsity=0.9)).model
    layers = model_size(binary).layers
    assert all(layer.value_bits == 1 and layer.scales == 32 for layer in layers)


def test_unpruned_zero_weights_count_as_removed():
    layer = nn.Linear(100, 10, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, :5] = 1
    report = model_size(nn.Sequential(layer))
    assert report.layers[0].kept == 5
