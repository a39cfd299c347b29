"""Interval bound propagation (Gowal et al. 2018) through sequential networks, and through any
other network torch.fx can trace (see `graph.py`).

Each layer maps an elementwise interval [lower, upper] to an interval containing all of its
outputs. Affine layers use the centre/radius form (centre through W, radius through |W|), so the
bounds are exact for one affine layer. The last Linear layer is folded into the margin
specification (logit of the true class minus each other logit), which is tighter than bounding the
logits first. Masked and binary layers of the pruning engine enter through their effective weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cardkit.errors import CardkitError
from cardkit.models import Normalize
from cardkit.models.resnet import BasicBlock, PreActBlock

_ELEMENTWISE_MONOTONE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten,
                         nn.Identity, nn.Dropout)


@dataclass(frozen=True)
class Bounds:
    lower: torch.Tensor
    upper: torch.Tensor


def supported_layers() -> list[str]:
    return sorted({"Normalize", "Conv2d", "Linear", "BatchNorm2d (eval)", "Sequential", "BasicBlock",
                   "PreActBlock",
                   *(cls.__name__ for cls in _ELEMENTWISE_MONOTONE)})


def input_bounds(x: torch.Tensor, eps: float) -> Bounds:
    """The Linf ball of radius eps around x, intersected with [0, 1]."""
    return Bounds((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))


def ibp_bounds(model: nn.Module, x: torch.Tensor, eps: float) -> Bounds:
    """Interval bounds on the logits for every input in the Linf eps-ball around x within [0,1]."""
    bounds = input_bounds(x, eps)
    if _is_graph(model):
        from cardkit.certify.graph import graph_bounds

        return graph_bounds(model, bounds)
    for name, layer in _layers(model):
        bounds = _propagate(name, layer, bounds)
    return bounds


def ibp_margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> Bounds:
    """Bounds on the margins logit[y] - logit[j] for every class j != y (N x (K - 1)).

    A sample is verified when every lower margin bound is positive.
    """
    if _is_graph(model):
        from cardkit.certify.graph import graph_margin_bounds

        return graph_margin_bounds(model, input_bounds(x, eps), y)
    layers = list(_layers(model))
    name, last = layers[-1]
    if not isinstance(last, nn.Linear):
        raise CardkitError(f"margin bounds need a Linear last layer, got '{name}' ({type(last).__name__})")
    bounds = input_bounds(x, eps)
    for layer_name, layer in layers[:-1]:
        bounds = _propagate(layer_name, layer, bounds)
    return margins_through(last, bounds, y)


def margins_through(last: nn.Linear, bounds: Bounds, y: torch.Tensor) -> Bounds:
    """Margin bounds from interval bounds on the input of the last Linear layer."""
    weight = _weight(last)
    spec = _margin_spec(y, weight.shape[0])  # N x (K-1) x K
    spec_weight = spec @ weight  # N x (K-1) x D
    spec_bias = spec @ last.bias if last.bias is not None else 0.0
    centre = (bounds.upper + bounds.lower) / 2
    radius = (bounds.upper - bounds.lower) / 2
    mid = (spec_weight @ centre.unsqueeze(-1)).squeeze(-1) + spec_bias
    spread = (spec_weight.abs() @ radius.unsqueeze(-1)).squeeze(-1)
    return Bounds(mid - spread, mid + spread)


def _margin_spec(y: torch.Tensor, classes: int) -> torch.Tensor:
    """C with rows e_y - e_j for j != y, per sample."""
    eye = torch.eye(classes, device=y.device)
    spec = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # N x K x K: row j is e_y - e_j
    keep = ~F.one_hot(y, classes).bool()
    return spec[keep].view(len(y), classes - 1, classes)


def _layers(model: nn.Module):
    """The leaf layers of nested Sequentials, in order; of any other model whose traced graph is
    one chain of layers, those layers."""
    if isinstance(model, nn.Sequential):
        for name, child in model.named_children():
            for sub_name, layer in _layers(child):
                yield (f"{name}.{sub_name}" if sub_name else name), layer
        return
    from cardkit.certify.graph import chain_layers, is_container

    chain = chain_layers(model) if is_container(model) else None
    if chain is None:
        yield "", model
        return
    for name, layer in chain:
        yield from ((f"{name}.{sub}" if sub else name, leaf) for sub, leaf in _layers(layer))


def _is_graph(model: nn.Module) -> bool:
    """A model bounded node by node through its traced graph: not a Sequential, not one chain."""
    from cardkit.certify.graph import chain_layers, is_container

    return is_container(model) and chain_layers(model) is None


def _weight(layer: nn.Module) -> torch.Tensor:
    # Masked, binary and factorized (ATMC) layers compute their weight.
    return layer.effective_weight() if hasattr(layer, "effective_weight") else layer.weight


def _chain(name: str, layers, b: Bounds) -> Bounds:
    for part, layer in layers:
        if layer is not None:
            b = _propagate(f"{name}.{part}", layer, b)
    return b


def _add(a: Bounds, b: Bounds) -> Bounds:
    return Bounds(a.lower + b.lower, a.upper + b.upper)


def _residual(name: str, block: nn.Module, b: Bounds) -> Bounds:
    """The two residual blocks of the model registry: branch and shortcut bounded separately
    and added (sound, though it ignores that both see the same input)."""
    if isinstance(block, BasicBlock):
        branch = _chain(name, [("conv1", block.conv1), ("bn1", block.bn1), ("relu1", block.relu1),
                               ("conv2", block.conv2), ("bn2", block.bn2)], b)
        shortcut = b if block.shortcut is None else _propagate(f"{name}.shortcut", block.shortcut, b)
        return _propagate(f"{name}.relu2", block.relu2, _add(branch, shortcut))
    pre = _chain(name, [("bn1", block.bn1), ("relu1", block.relu1)], b)
    shortcut = b if block.shortcut is None else _propagate(f"{name}.shortcut", block.shortcut, pre)
    branch = _chain(name, [("conv1", block.conv1), ("bn2", block.bn2), ("relu2", block.relu2),
                           ("dropout", block.dropout), ("conv2", block.conv2)], pre)
    return _add(branch, shortcut)


def _propagate(name: str, layer: nn.Module, b: Bounds) -> Bounds:
    if isinstance(layer, (BasicBlock, PreActBlock)):
        return _residual(name, layer, b)
    if isinstance(layer, nn.Sequential):
        return _chain(name, layer.named_children(), b)
    if isinstance(layer, Normalize):
        return Bounds((b.lower - layer.mean) / layer.std, (b.upper - layer.mean) / layer.std)
    if isinstance(layer, (nn.Conv2d, nn.Linear)):
        return _affine(layer, b)
    if isinstance(layer, nn.BatchNorm2d):
        if layer.training:
            raise CardkitError(f"layer '{name}' (BatchNorm2d) is in training mode; bounds need "
                               f"the model in eval mode (model.eval())")
        scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
        shift = layer.bias - layer.running_mean * scale
        scale, shift = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
        centre, radius = (b.upper + b.lower) / 2, (b.upper - b.lower) / 2
        return Bounds(centre * scale + shift - radius * scale.abs(), centre * scale + shift + radius * scale.abs())
    if isinstance(layer, _ELEMENTWISE_MONOTONE):
        return Bounds(layer(b.lower), layer(b.upper))
    raise CardkitError(f"interval bounds do not support layer '{name}' ({type(layer).__name__}); "
                       f"supported: {', '.join(supported_layers())}")


def _affine(layer: nn.Module, b: Bounds) -> Bounds:
    weight = _weight(layer)
    centre, radius = (b.upper + b.lower) / 2, (b.upper - b.lower) / 2
    if isinstance(layer, nn.Linear):
        mid, spread = F.linear(centre, weight, layer.bias), F.linear(radius, weight.abs())
    else:
        mid = layer._conv_forward(centre, weight, layer.bias)
        spread = layer._conv_forward(radius, weight.abs(), None)
    return Bounds(mid - spread, mid + spread)
