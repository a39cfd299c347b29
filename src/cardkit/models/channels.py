"""Removing whole output channels (filters) of Conv2d / Linear layers, physically.

A layer's output channels can be removed when they reach the next Conv2d / Linear only through
channel-wise modules that map 0 to 0 once the channel is zeroed: BatchNorm (its weight and bias are
zeroed too), ReLU-like activations, Dropout, pooling and Flatten. Its outputs must not reach an
addition, any other function, an unhandled module type or the model's output. The layers are found
by tracing the model with torch.fx, so this covers cnn_small, cnn_large and vgg16_bn (every layer
but the classifier) and the inner conv1 of each residual block of resnet18, preact_resnet18 and wrn
(the other convs feed a residual addition).

`apply_channel_masks` zeroes the removed channels in place; `remove_channels` deletes them, in
place, from the layers, their BatchNorms and the layers they feed, and records the kept counts as
arch["structured"], from which `cardkit.models.model_from_arch` builds the smaller model again.
Choosing the channels (by weight or score norms) is pruning's part: `cardkit.prune.structured`.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cardkit.errors import CardkitError

SUPPORTED = ("supported: Conv2d/Linear layers whose outputs reach the next Conv2d/Linear only through "
             "BatchNorm, ReLU-like activations, Dropout, pooling or Flatten, i.e. every layer but the "
             "classifier of cnn_small, cnn_large and vgg16_bn, and the inner conv1 of each residual "
             "block of resnet18, preact_resnet18 and wrn")

# Element-wise modules that keep a zero channel at zero.
_ZERO_KEEPING = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardtanh,
                 nn.Dropout, nn.Dropout2d, nn.Identity)
# A window of these always covers at least one real (zero) value of a zeroed channel.
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass
class _Plan:
    """What removing output channels of `layer` touches."""

    layer: str
    norms: list[str] = field(default_factory=list)
    # (consumer name, input features per channel): 1 for a Conv2d, h*w for a Linear after Flatten.
    consumers: list[tuple[str, int]] = field(default_factory=list)


class _Blocked(Exception):
    """The reason a layer's output channels cannot be removed."""


class _Tracer(fx.Tracer):
    # Modules without children (including masked layers and Normalize) stay single graph nodes.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return next(m.children(), None) is None


# ---------------------------------------------------------------------------------------------
# Public API


def removable_layers(model: nn.Module) -> list[str]:
    """The Conv2d / Linear layers whose output channels can be removed, in module order."""
    return list(_prunable_plans(model))


@torch.no_grad()
def apply_channel_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the removed channels in place: weight rows, bias entries and the weight and bias of
    the BatchNorms they pass through, so each removed channel outputs exactly 0 (BN in eval mode
    maps 0 to bias - mean x weight / sqrt(var + eps), hence both are zeroed)."""
    plans = _plans_for(model, masks)
    modules = dict(model.named_modules())
    for name, plan in plans.items():
        drop = ~masks[name].to(modules[name].weight.device)
        layer = modules[name]
        layer.weight[drop] = 0
        if layer.bias is not None:
            layer.bias[drop] = 0
        for norm in plan.norms:
            modules[norm].weight[drop] = 0
            modules[norm].bias[drop] = 0


@torch.no_grad()
def remove_channels(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Delete the channels `masks` drop, in place: from each layer and its BatchNorms, and the
    matching input channels (features, for a Linear after Flatten) from the layers they feed. The
    model computes what `apply_channel_masks` would make of it; its `arch` gains "structured":
    {layer: kept channels}."""
    plans = _plans_for(model, masks)
    apply_channel_masks(model, masks)
    modules = dict(model.named_modules())
    for name, plan in plans.items():
        _shrink(modules, plan, masks[name].to(modules[name].weight.device))
    if isinstance(getattr(model, "arch", None), dict):
        kept = {name: int(masks[name].sum()) for name in plans}
        model.arch = {**copy.deepcopy(model.arch), "structured": {**model.arch.get("structured", {}), **kept}}


def keep_channels(model: nn.Module, kept: dict) -> None:
    """Keep the first kept[layer] output channels of each layer (a record's "structured" entry),
    in place."""
    modules = dict(model.named_modules())
    masks = {}
    for name, count in kept.items():
        channels = _out_channels(modules[name]) if name in modules else 0
        if name in modules and not (isinstance(count, int) and 1 <= count <= channels):
            raise CardkitError(f"arch structured[{name!r}]={count!r} is invalid; it must be an "
                               f"integer in [1, {channels}]")
        masks[name] = torch.arange(channels) < count
    remove_channels(model, masks)


# ---------------------------------------------------------------------------------------------
# Which layers can lose output channels


def _analyse(model: nn.Module) -> tuple[dict[str, _Plan], dict[str, str]]:
    """Plans for every Conv2d / Linear whose output channels can be removed, and the reason
    for each one whose cannot."""
    graph = _trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    plans, blocked = {}, {}
    for node in graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        try:
            plans[node.target] = _plan(node, module, modules, calls)
        except _Blocked as reason:
            blocked[node.target] = str(reason)
    return plans, blocked


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        raise CardkitError(f"cannot trace {type(model).__name__} for structured pruning ({exc}); "
                           f"{SUPPORTED}") from exc


def _plan(node: fx.Node, module: nn.Module, modules: dict, calls: Counter) -> _Plan:
    if calls[node.target] > 1:
        raise _Blocked("it is called more than once")
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise _Blocked(f"it is a grouped convolution (groups={module.groups})")
    plan = _Plan(node.target)
    flat = isinstance(module, nn.Linear)
    _follow(node, flat, _out_channels(module), plan, modules, calls)
    return plan


def _follow(node: fx.Node, flat: bool, channels: int, plan: _Plan, modules: dict, calls: Counter) -> None:
    """Walk the channels forward from `node` to the layers that read them, recording the plan."""
    for user in node.users:
        if user.op != "call_module":
            raise _Blocked(f"its output reaches {_describe(user)}")
        module = modules[user.target]
        if isinstance(module, (nn.Conv2d, nn.Linear, _BatchNorm)) and calls[user.target] > 1:
            raise _Blocked(f"'{user.target}' ({type(module).__name__}) it feeds is called more than once")
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            plan.consumers.append((user.target, _block(user.target, module, flat, channels)))
            continue
        if isinstance(module, _BatchNorm) and module.affine and module.num_features == channels:
            plan.norms.append(user.target)
        elif isinstance(module, nn.Flatten) and module.start_dim == 1:
            flat = True
        elif not (isinstance(module, _ZERO_KEEPING) or (isinstance(module, _POOLS) and not flat)):
            raise _Blocked(f"its output reaches '{user.target}' ({type(module).__name__}), "
                           f"which structured pruning does not handle")
        _follow(user, flat, channels, plan, modules, calls)


def _block(name: str, module: nn.Module, flat: bool, channels: int) -> int:
    """Input features per removed channel of the consumer `module`."""
    if isinstance(module, nn.Conv2d) and not flat and module.groups == 1 and module.in_channels == channels:
        return 1
    if isinstance(module, nn.Linear) and flat and module.in_features % channels == 0:
        return module.in_features // channels
    raise _Blocked(f"its output reaches '{name}' ({type(module).__name__}) in a layout that "
                   f"structured pruning does not handle")


def _describe(node: fx.Node) -> str:
    if node.op == "output":
        return "the model output"
    target = node.target
    if target in (operator.add, operator.iadd, torch.add):
        return "a residual addition"
    return f"the {node.op} '{getattr(target, '__name__', target)}'"


def _prunable_plans(model: nn.Module) -> dict[str, _Plan]:
    plans, blocked = _analyse(model)
    if not plans:
        first = next(iter(blocked.items()), None)
        why = f"e.g. '{first[0]}': {first[1]}" if first else "it has no Conv2d or Linear layer"
        raise CardkitError(f"{type(model).__name__} has no layer whose output channels can be removed "
                           f"({why}); {SUPPORTED}")
    return plans


def _plans_for(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, _Plan]:
    """The plans of the layers in `masks`, after checking every mask."""
    plans, blocked = _analyse(model)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in plans:
            raise CardkitError(_not_prunable(name, modules.get(name), blocked.get(name)))
        _check_mask(name, mask, _out_channels(modules[name]))
    return {name: plans[name] for name in masks}


def _not_prunable(name: str, module: nn.Module | None, reason: str | None) -> str:
    if module is None:
        return f"layer '{name}' is not in the model; use names from channel_masks(model, ...)"
    why = reason or "it is not a Conv2d or Linear"
    return (f"cannot remove output channels of layer '{name}' ({type(module).__name__}): {why}; "
            f"{SUPPORTED}")


def _check_mask(name: str, mask, channels: int) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (channels,):
        raise CardkitError(f"mask of layer '{name}' must be a bool tensor of shape ({channels},); "
                           f"got {getattr(mask, 'dtype', type(mask).__name__)} "
                           f"{tuple(getattr(mask, 'shape', ()))}; use channel_masks to make it")
    if not bool(mask.any()):
        raise CardkitError(f"mask of layer '{name}' keeps no channel; keep at least one")


# ---------------------------------------------------------------------------------------------
# Editing layers


def _out_channels(module: nn.Module) -> int:
    return module.weight.shape[0]


def _shrink(modules: dict, plan: _Plan, keep: torch.Tensor) -> None:
    index = keep.nonzero().flatten()
    layer = modules[plan.layer]
    _slice_params(layer, index, dim=0)
    setattr(layer, "out_channels" if isinstance(layer, nn.Conv2d) else "out_features", index.numel())
    for norm in plan.norms:
        _slice_params(modules[norm], index, dim=0, buffers=("running_mean", "running_var"))
        modules[norm].num_features = index.numel()
    for name, block in plan.consumers:
        consumer = modules[name]
        columns = (index[:, None] * block + torch.arange(block, device=index.device)).flatten()
        _slice_weight(consumer, columns, dim=1)
        setattr(consumer, "in_channels" if isinstance(consumer, nn.Conv2d) else "in_features", columns.numel())


def _slice_params(module: nn.Module, index: torch.Tensor, dim: int, buffers: tuple[str, ...] = ()) -> None:
    _slice_weight(module, index, dim)
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(module.bias.detach()[index].clone(), requires_grad=module.bias.requires_grad)
    for name in buffers:
        if getattr(module, name, None) is not None:
            setattr(module, name, getattr(module, name)[index].clone())


def _slice_weight(module: nn.Module, index: torch.Tensor, dim: int) -> None:
    if module.weight is not None:
        sliced = module.weight.detach().index_select(dim, index).clone()
        module.weight = nn.Parameter(sliced, requires_grad=module.weight.requires_grad)
