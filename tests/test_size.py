"""Size accounting: values x bits, positions (the cheaper format), tables, dense float32 rest."""

import torch
from torch import nn

from cardkit.compress import model_size
from cardkit.compress.packing import position_cost
from cardkit.models import create_model
from cardkit.prune import method_config, prune_model
from cardkit.prune.masked import kept_count


def test_dense_model_size_is_its_float32_parameters_and_buffers():
    model = create_model("cnn_small", 10, 1, 28)
    report = model_size(model)
    floats = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers() if b.is_floating_point())
    assert report.bits == 32 * floats == report.dense_bits and report.compression_ratio == 1.0
    assert all(t.position_format == "dense" for t in report.tensors)


def _cheapest_positions(kept: list[bool]) -> int:
    """Bits of the cheaper position code, written out independently of packing.py: nothing when
    every weight is kept; else a bitmap of n bits, or gap-coded indices at the best width w,
    where a gap g takes 1 + (g - 1) // (2^w - 1) entries of w bits (the extra ones escapes);
    the bitmap wins ties."""
    if all(kept):
        return 0
    indices = [i for i, k in enumerate(kept) if k]
    gaps = [b - a for a, b in zip([-1] + indices, indices)]
    coded = min(w * sum(1 + (g - 1) // (2 ** w - 1) for g in gaps) for w in range(1, 33))
    return min(len(kept), coded)


def test_pruned_and_binary_models_count_kept_values_positions_and_scales():
    torch.manual_seed(0)
    model = create_model("cnn_small", 10, 1, 28)
    setup = prune_model(model, method_config("magnitude", sparsity=0.9))
    report = model_size(setup.model)
    for t, layer in zip(report.tensors, setup.group.layers):
        assert t.kept == kept_count(t.weights, 0.9) and t.scheme == "float"
        assert t.values == 32 * t.kept and t.tables == 0
        assert (t.positions, t.position_format) == position_cost(layer.mask.flatten().bool().numpy())
    # cnn_small on 28x28x1: weights 16x1x4x4 = 256, 32x16x4x4 = 8192, 100x1568 = 156,800 and
    # 10x100 = 1000; biases 16 + 32 + 100 + 10 and the Normalize mean and std: 160 other floats.
    # At sparsity 0.9 each layer keeps round(0.1 n): 26, 819, 15,680 and 100 float32 values.
    kept = [26, 819, 15_680, 100]
    assert [t.kept for t in report.tensors] == kept
    positions = [_cheapest_positions(layer.mask.flatten().bool().tolist()) for layer in setup.group.layers]
    total = 32 * sum(kept) + sum(positions) + 32 * 160
    assert report.bits == total and report.dense_bits == 32 * (256 + 8192 + 156_800 + 1000 + 160)
    assert report.compression_ratio == 32 * 166_408 / total

    binary = prune_model(create_model("cnn_small", 10, 1, 28), method_config("biprop", sparsity=0.9)).model
    tensors = model_size(binary).tensors
    assert all(t.scheme == "binary" and t.value_bits == 1 and t.tables == 32 for t in tensors)


def test_quantized_layers_count_their_bits_and_tables():
    torch.manual_seed(0)
    model = create_model("cnn_small", 10, 1, 28)
    uniform = method_config("magnitude", sparsity=0.5, quantize={"bits": 4, "per_channel": True})
    tensors = model_size(prune_model(model, uniform).model).tensors
    for t, (_, layer) in zip(tensors, [(n, m) for n, m in model.named_modules() if hasattr(m, "mask")]):
        assert t.scheme == "uniform" and t.values == 4 * t.kept
        assert t.tables == 32 * layer.weight.shape[0]  # one scale per output channel
    model = create_model("cnn_small", 10, 1, 28)
    kmeans = method_config("magnitude", sparsity=0.5, quantize={"bits": 3, "scheme": "kmeans"})
    tensors = model_size(prune_model(model, kmeans).model).tensors
    for t in tensors:  # the centres in use, and codes just wide enough for them
        assert t.scheme == "kmeans" and t.tables <= 32 * 8 and t.values == t.value_bits * t.kept
        assert 2 ** (t.value_bits - 1) < t.tables // 32 <= 2 ** t.value_bits


def test_unpruned_zero_weights_count_as_removed():
    layer = nn.Linear(100, 10, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, :5] = 1
    report = model_size(nn.Sequential(layer))
    assert report.tensors[0].kept == 5
