"""Per-layer and total sparsity, kept parameters and the effective model size."""

from __future__ import annotations

from torch import nn

from cardkit.prune.masked import MaskedLayer, prunable_layers


def sparsity_report(model: nn.Module) -> dict:
    """Sparsity (fraction removed) of every prunable weight and in total.

    `kept_parameters` counts the kept weights and every other parameter (biases, normalization);
    `effective_bytes` counts them and the buffers as float32 values (masks and scores excluded).
    The index overhead of a sparse format is not counted here.
    """
    layers, kept_total, prunable_total = [], 0, 0
    for name, module in prunable_layers(model):
        n = module.weight.numel()
        if isinstance(module, MaskedLayer):
            kept = int(module.mask.sum())
        else:
            kept = int((module.weight != 0).sum())
        layers.append({"layer": name, "weights": n, "kept": kept, "sparsity": 1 - kept / n})
        kept_total += kept
        prunable_total += n
    pruned = {f"{layer['layer']}.weight" for layer in layers}
    other_params = sum(p.numel() for name, p in model.named_parameters()
                       if name not in pruned and not name.endswith(".scores"))
    buffers = sum(t.numel() for name, t in model.named_buffers() if not name.endswith(".mask"))
    return {
        "sparsity": 1 - kept_total / max(prunable_total, 1),
        "prunable_weights": prunable_total,
        "kept_weights": kept_total,
        "kept_parameters": kept_total + other_params,
        "effective_bytes": 4 * (kept_total + other_params + buffers),
        "layers": layers,
    }


