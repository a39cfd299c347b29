"""Structured pruning: remove whole output channels (filters) of Conv2d / Linear layers.

Which channels go is chosen here, by the L1 norm of each output channel's weights or of its
trained scores, per layer or globally; which layers can lose channels, and the removal itself,
are the model surgery of `cardkit.models.channels` (every layer but the classifier of cnn_small,
cnn_large and vgg16_bn, and the inner conv1 of each residual block of resnet18, preact_resnet18
and wrn).

`apply_channel_masks` zeroes the removed channels in place (the masked model); `rebuild` returns a
new, physically smaller model computing the same function, recorded as arch["structured"], which
`cardkit.models.model_from_arch` builds again, e.g. to load its state_dict.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from cardkit.errors import CardkitError
from cardkit.models.channels import apply_channel_masks, remove_channels, removable_layers
from cardkit.prune.masked import MaskedLayer, kept_count, prunable_layers

Source = Literal["weight", "scores"]
Scope = Literal["layer", "global"]


# ---------------------------------------------------------------------------------------------
# Public API


def channel_scores(model: nn.Module, source: Source = "weight") -> dict[str, torch.Tensor]:
    """L1 norm of each output channel of every layer whose channels can be removed.

    `source="weight"` reads the layer's weight; `source="scores"` its `scores` tensor (the layers
    must be masked layers, see `cardkit.prune.add_masks`). Keyed by module name, in module order.
    """
    if source not in ("weight", "scores"):
        raise CardkitError(f"source={source!r} is invalid; use 'weight' or 'scores'")
    modules = dict(model.named_modules())
    return {name: _filter_l1(name, modules[name], source) for name in removable_layers(model)}


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
def rebuild(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A new, physically smaller model computing what `apply_channel_masks` would make of `model`.

    Removed output channels are deleted from each pruned layer and their BatchNorms, and the
    matching input channels (features, for a Linear after Flatten) from the layers they feed.
    Masked layers become plain Conv2d / Linear holding their effective (masked) weight. `model` is
    not changed; the copy's `arch` gains "structured": {layer: kept channels}.
    """
    smaller = copy.deepcopy(model)
    apply_channel_masks(smaller, masks)  # checks the masks; zeroed before the masks are baked in
    _bake_masks(smaller)
    remove_channels(smaller, masks)
    return smaller


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


def _bake_masks(model: nn.Module) -> None:
    """Turn masked layers into plain ones holding their effective weight."""
    for _, layer in prunable_layers(model):
        if isinstance(layer, MaskedLayer):
            weight = layer.effective_weight().detach().clone()
            trainable = layer.weight.requires_grad
            del layer.scores, layer.mask, layer.binary, layer.group
            layer.__class__ = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
            layer.weight = nn.Parameter(weight, requires_grad=trainable)
