"""Per-layer and total sparsity, and the kept parameters."""

from __future__ import annotations

from torch import nn

from cardkit.compress.size import other_tensors
from cardkit.compress.stored import stored_tensors
from cardkit.prune.masked import prunable_layers


def sparsity_report(model: nn.Module) -> dict:
    """Sparsity (fraction removed) of every prunable layer and in total.

    A layer's kept weights are the stored entries of its weight tensors (for a factorized ATMC
    layer: of U, V and C together), against the weights of its dense weight.
    `kept_parameters` adds every other parameter (biases, normalization).
    """
    kept_by_layer: dict[str, int] = {}
    for tensor in stored_tensors(model):
        layer = tensor.name.rsplit(".", 1)[0]
        kept_by_layer[layer] = kept_by_layer.get(layer, 0) + int(tensor.kept.sum())
    layers = []
    for name, module in prunable_layers(model):
        n, kept = module.weight.numel(), kept_by_layer[name]
        layers.append({"layer": name, "weights": n, "kept": kept, "sparsity": 1 - kept / n})
    kept_total = sum(layer["kept"] for layer in layers)
    prunable_total = sum(layer["weights"] for layer in layers)
    params = {name for name, _ in model.named_parameters()}
    other = sum(t.numel() for name, t in other_tensors(model).items() if name in params)
    return {"sparsity": 1 - kept_total / max(prunable_total, 1), "prunable_weights": prunable_total,
            "kept_weights": kept_total, "kept_parameters": kept_total + other, "layers": layers}
