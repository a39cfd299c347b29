"""Structured pruning: remove whole output channels (filters) of Conv2d / Linear layers.

A layer's output channels can be removed when they reach the next Conv2d / Linear only through
channel-wise modules that map 0 to 0 once the channel is zeroed: BatchNorm (its weight and bias are
zeroed too), ReLU-like activations, Dropout, pooling and Flatten. Its outputs must not reach an
addition, any other function, an unhandled module type or the model's output. The layers are found
by tracing the model with torch.fx, so this covers cnn_small, cnn_large and vgg16_bn (every layer
but the classifier) and the inner conv1 of each residual block of resnet18, preact_resnet18 and wrn
(the other convs feed a residual addition).

`apply_channel_masks` zeroes the removed channels in place (the masked model); `rebuild` returns a
new, physically smaller model computing the same function, recorded as arch["structured"]; and
`create_structured(arch)` builds that smaller architecture again, e.g. to load its state_dict.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cardkit.errors import CardkitError
from cardkit.models import create_model
from cardkit.prune.masked import MaskedLayer, kept_count, prunable_layers

Source = Literal["weight", "scores"]
Scope = Literal["layer", "global"]

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


def channel_scores(model: nn.Module, source: Source = "weight") -> dict[str, torch.Tensor]:
    """L1 norm of each output channel of every layer whose channels can be removed.

    `source="weight"` reads the layer's weight; `source="scores"` its `scores` tensor (the layers
    must be masked layers, see `cardkit.prune.add_masks`). Keyed by module name, in module order.
    """
    if source not in ("weight", "scores"):
        raise CardkitError(f"source={source!r} is invalid; use 'weight' or 'scores'")
    plans = _prunable_plans(model)
    modules = dict(model.named_modules())
    return {name: _filter_l1(name, modules[name], source) for name in plans}


def channel_masks(model: nn.Module, sparsity: float, source: Source = "weight",
                  scope: Scope = "layer") -> dict[str, torch.Tensor]:
    """Bool keep-mask over the output channels of every layer that `channel_scores` covers.

    Layer scope keeps exactly max(1, round((1 - sparsity) x C_out)) channels of each layer, those
    with the largest scores. Global scope divides each layer's scores by their mean (filter norms
    grow with fan-in, so raw norms would favour wide-input layers), keeps the
    round((1 - sparsity) x total) largest over all layers, and then the best channel of any layer
    left empty. The classifier is never included: its outputs are the classes.
    """
    _check_sparsity(sparsity)
    if scope not in ("layer", "global"):
        raise CardkitError(f"scope={scope!r} is invalid; use 'layer' or 'global'")
    scores = channel_scores(model, source)
    if scope == "layer":
        return {name: _top_k(s, max(1, kept_count(s.numel(), sparsity))) for name, s in scores.items()}
    return _global_masks(scores, sparsity)


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
def rebuild(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A new, physically smaller model computing what `apply_channel_masks` would make of `model`.

    Removed output channels are deleted from each pruned layer and their BatchNorms, and the
    matching input channels (features, for a Linear after Flatten) from the layers they feed.
    Masked layers become plain Conv2d / Linear holding their effective (masked) weight. `model` is
    not changed; the copy's `arch` gains "structured": {layer: kept channels}.
    """
    plans = _plans_for(model, masks)
    smaller = copy.deepcopy(model)
    apply_channel_masks(smaller, masks)
    _bake_masks(smaller)
    modules = dict(smaller.named_modules())
    for name, plan in plans.items():
        _shrink(modules, plan, masks[name].to(modules[name].weight.device))
    if isinstance(getattr(model, "arch", None), dict):
        kept = {name: int(masks[name].sum()) for name in plans}
        smaller.arch = {**copy.deepcopy(model.arch),
                        "structured": {**model.arch.get("structured", {}), **kept}}
    return smaller


def create_structured(arch: dict) -> nn.Module:
    """Build the smaller architecture that `rebuild` recorded in `arch` (fresh weights).

    `create_model(**arch)` rejects the "structured" entry; use this for such an arch.
    """
    if not isinstance(arch, dict) or not isinstance(arch.get("structured", {}), dict):
        raise CardkitError(f"arch={arch!r} is invalid; pass the `arch` dict of a rebuilt model")
    base = create_model(**{k: v for k, v in arch.items() if k != "structured"})
    modules = dict(base.named_modules())
    masks = {}
    for name, kept in arch.get("structured", {}).items():
        channels = _out_channels(modules[name]) if name in modules else 0
        if name in modules and not (isinstance(kept, int) and 1 <= kept <= channels):
            raise CardkitError(f"arch structured[{name!r}]={kept!r} is invalid; it must be an "
                               f"integer in [1, {channels}]")
        masks[name] = torch.arange(channels) < kept  # the first `kept` channels
    return rebuild(base, masks)


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


def _check_sparsity(sparsity) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity <= 1:
        raise CardkitError(f"sparsity={sparsity!r} is invalid; give the fraction of channels to "
                           f"remove, a number in [0, 1]")


# ---------------------------------------------------------------------------------------------
# Scores and masks


def _filter_l1(name: str, module: nn.Module, source: Source) -> torch.Tensor:
    if source == "scores" and not isinstance(module, MaskedLayer):
        raise CardkitError(f"layer '{name}' ({type(module).__name__}) has no scores; call "
                           f"cardkit.prune.add_masks(model) first or use source='weight'")
    tensor = module.scores if source == "scores" else module.weight
    return tensor.detach().abs().reshape(tensor.shape[0], -1).sum(1)


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores, k, sorted=False).indices] = True
    return mask


def _global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    normed = [s / s.mean().clamp_min(torch.finfo(s.dtype).tiny) for s in scores.values()]
    flat = torch.cat(normed)
    keep = _top_k(flat, max(1, kept_count(flat.numel(), sparsity)))
    masks = dict(zip(scores, keep.split([s.numel() for s in normed])))
    for name, s in zip(scores, normed):
        if not masks[name].any():
            masks[name] = masks[name].clone()
            masks[name][s.argmax()] = True
    return masks


# ---------------------------------------------------------------------------------------------
# Editing layers


def _out_channels(module: nn.Module) -> int:
    return module.weight.shape[0]


def _bake_masks(model: nn.Module) -> None:
    """Turn masked layers into plain ones holding their effective weight."""
    for _, layer in prunable_layers(model):
        if isinstance(layer, MaskedLayer):
            weight = layer.effective_weight().detach().clone()
            trainable = layer.weight.requires_grad
            del layer.scores, layer.mask, layer.binary, layer.group
            layer.__class__ = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
            layer.weight = nn.Parameter(weight, requires_grad=trainable)


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
