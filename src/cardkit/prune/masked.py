"""One masking mechanism for every Conv2d and Linear weight.

A prunable layer is swapped in place for its masked subclass, which holds a `scores` tensor (one
score per weight) and a `mask` buffer. Masks come from scores: the top-k per layer (scope `layer`)
or one global top-k over all layers (scope `global`), with k = round((1 - sparsity) x n) exactly.
A `MaskGroup` owns the layers of one model and recomputes the masks only when some score tensor
has changed (its in-place version counter moved, i.e. once per optimizer step), so the forwards of
a PGD attack inside one step reuse the cached masks. Gradients reach the scores through a
straight-through estimator. A frozen mask is baked into the weights: the forward is the plain
layer's, and the pruned weights are zeroed again after every optimizer step.

A layer may also carry a quantizer (`set_quantizer`): its forward then uses the quantized masked
weight, with the gradient passed straight through to the float weight (quantization-aware
training). A k-means codebook is layer state, refitted after every optimizer step, so that the
forward is a function of the saved state and a reloaded model computes exactly the same.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterable, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cardkit.compress.quantize import QuantSpec, Quantized, quantize_kmeans, straight_through
from cardkit.compress.stored import StoredTensor, binary_codes
from cardkit.models.layers import LayerFilter, prunable_layers  # noqa: F401  (a model's weight layers)

Scope = Literal["layer", "global"]
KMEANS_FIT_ITERATIONS = 20  # a codebook's first fit
KMEANS_REFIT_ITERATIONS = 2  # after an optimizer step, warm-started: the weights moved a little


class MaskedLayer:
    """Mixin for the masked Conv2d / Linear. `weight` keeps its name, shape and meaning."""

    scores: nn.Parameter
    mask: torch.Tensor
    binary: bool
    quantizer: QuantSpec | None

    def _init_mask_state(self) -> None:
        self.scores = nn.Parameter(self.weight.detach().abs().clone(), requires_grad=False)
        self.register_buffer("mask", torch.ones_like(self.weight))
        self.binary = False  # biprop: the weight used is alpha x sign(weight) x mask
        object.__setattr__(self, "group", None)  # plain attribute: not a submodule
        object.__setattr__(self, "quantizer", None)

    def set_quantizer(self, spec: QuantSpec, fit: bool = True) -> None:
        """Quantize the masked weight from now on; a k-means codebook is fitted to it now (unless
        `fit` is false: a checkpoint about to be loaded holds it)."""
        if self.binary:
            raise ValueError("binary layers are quantized already (1 bit)")
        object.__setattr__(self, "quantizer", spec)
        if spec.scheme == "kmeans":
            self.register_buffer("codebook", torch.zeros(2 ** spec.bits, device=self.weight.device))
            if fit:
                self.fit_codebook(KMEANS_FIT_ITERATIONS, warm=False)

    @torch.no_grad()
    def fit_codebook(self, iterations: int, warm: bool = True) -> None:
        spec = self.quantizer
        if spec is not None and spec.scheme == "kmeans":
            fitted = quantize_kmeans(self.weight, self.mask, bits=spec.bits, iterations=iterations,
                                     init=self.codebook if warm else None)
            self.codebook.copy_(fitted.codebook)

    def quantized(self) -> Quantized:
        """The quantized masked weight, computed once per change of weight, mask or codebook."""
        codebook = getattr(self, "codebook", None)
        key = _state_key(self.weight, self.mask, codebook)
        if getattr(self, "_quantized_key", None) != key:
            object.__setattr__(self, "_quantized", self.quantizer(self.weight, self.mask, codebook))
            object.__setattr__(self, "_quantized_key", key)
        return self._quantized

    def stored_tensors(self, prefix: str) -> list[StoredTensor]:
        """The weight as a compressed file stores it: exactly what the forward uses."""
        name, kept = f"{prefix}.weight", self.mask.detach() != 0
        if self.quantizer is not None:
            q = self.quantized()
            return [StoredTensor(name, q.values.float(), kept, self.quantizer.scheme, q,
                                 self.quantizer.per_channel)]
        values = self.effective_weight().detach().float()
        codes = binary_codes(values, kept) if self.binary else None
        return [StoredTensor(name, values, kept, "binary" if codes else "float", codes)]

    def effective_weight(self) -> torch.Tensor:
        group = self.group
        if group is not None:
            group.refresh()
        if self.scores.requires_grad and not self.weight.requires_grad:
            # Score training (HYDRA, edge-popup, biprop): the weights are frozen, so the masked
            # weight changes only with the mask and is cached between the forwards of a step.
            unmasked, masked = self._cached_weights()
            return _ScoredWeight.apply(self.scores, unmasked, masked)
        if self.scores.requires_grad:
            return self._unmasked_weight() * _StraightThrough.apply(self.scores, self.mask)
        if self.quantizer is not None:
            return straight_through(self.weight, self.quantized().values)
        if not self.binary:
            return self.weight  # frozen: the mask is baked into the weight
        return self._unmasked_weight() * self.mask

    def _unmasked_weight(self) -> torch.Tensor:
        if self.binary:
            return binary_scale(self.weight, self.mask) * self.weight.sign()
        return self.weight

    @torch.no_grad()
    def _cached_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = (_state_key(self.weight, self.mask), self.binary, self.quantizer)
        if getattr(self, "_cache_key", None) != key:
            unmasked = self._unmasked_weight().detach()
            masked = unmasked * self.mask if self.quantizer is None else self.quantized().values
            object.__setattr__(self, "_cache", (unmasked, masked))
            object.__setattr__(self, "_cache_key", key)
        return self._cache


def _state_key(*tensors: torch.Tensor | None) -> tuple:
    """Changes whenever one of the tensors is modified in place or replaced (e.g. moved to
    another device, where a new tensor may start at the same version count)."""
    return tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)


class _StraightThrough(torch.autograd.Function):
    """The forward sees the 0/1 mask of the top |scores|; the backward passes the mask's gradient
    to |scores| unchanged, i.e. times sign(scores). No elementwise work in the forward, which
    runs once per PGD step."""

    @staticmethod
    def forward(ctx, scores, mask):
        ctx.save_for_backward(scores)
        return mask.view_as(mask)

    @staticmethod
    def backward(ctx, grad):
        (scores,) = ctx.saved_tensors
        return grad * scores.sign(), None


class _ScoredWeight(torch.autograd.Function):
    """weight x mask(|scores|) for frozen weights, from cached tensors: nothing is computed in the
    forward; the backward is the straight-through gradient grad x weight x sign(scores)."""

    @staticmethod
    def forward(ctx, scores, unmasked, masked):
        ctx.save_for_backward(scores, unmasked)
        return masked.view_as(masked)

    @staticmethod
    def backward(ctx, grad):
        scores, unmasked = ctx.saved_tensors
        return grad * unmasked * scores.sign(), None, None


def binary_scale(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """alpha = mean |W| over the kept weights of the layer."""
    return (weight.detach().abs() * mask).sum() / mask.sum().clamp_min(1)


class MaskedConv2d(MaskedLayer, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.effective_weight(), self.bias)


class MaskedLinear(MaskedLayer, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.effective_weight(), self.bias)


_MASKED = {nn.Conv2d: MaskedConv2d, nn.Linear: MaskedLinear}


_SELECTION: ContextVar[Optional[LayerFilter]] = ContextVar("cardkit_layer_selection", default=None)


@contextmanager
def layer_selection(layers: Optional[LayerFilter]) -> Iterator[None]:
    """While active, pruning methods convert only the layers `layers` accepts (None: all). Method
    handlers take (model, config), so the choice of layers reaches them this way; the layers left
    out stay plain, and are stored and accounted as dense float32 weights."""
    token = _SELECTION.set(layers)
    try:
        yield
    finally:
        _SELECTION.reset(token)


def selected_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The prunable layers a pruning method converts: those of the active `layer_selection`."""
    return prunable_layers(model, _SELECTION.get())


def add_masks(model: nn.Module, layers: Optional[LayerFilter] = None) -> list[MaskedLayer]:
    """Swap every Conv2d / Linear (those `layers` accepts; default: the active selection, else all)
    for its masked subclass, in place (parameters are kept)."""
    masked = []
    for _, module in prunable_layers(model, layers) if layers is not None else selected_layers(model):
        if not isinstance(module, MaskedLayer):
            module.__class__ = _MASKED[type(module)]
            module._init_mask_state()
        masked.append(module)
    return masked


def masked_layers(model: nn.Module) -> list[MaskedLayer]:
    return [m for _, m in prunable_layers(model) if isinstance(m, MaskedLayer)]


def kept_count(n: int, sparsity: float) -> int:
    return int(round((1.0 - sparsity) * n))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A 0/1 mask (float, scores' shape) with exactly k ones at the largest scores."""
    flat = torch.zeros(scores.numel(), device=scores.device, dtype=torch.float32)
    if k > 0:
        flat[torch.topk(scores.reshape(-1), k, sorted=False).indices] = 1.0
    return flat.view_as(scores)


def thin_layers(model: nn.Module, group: "MaskGroup") -> list[tuple[str, int, int]]:
    """(layer, kept weights, output channels) of the layers that a layer-wise mask leaves fewer
    weights than output channels: some outputs are then constant, and score training stalls."""
    if group.scope != "layer":
        return []
    layers = {id(layer) for layer in group.layers}
    return [(name, kept, module.weight.shape[0]) for name, module in prunable_layers(model)
            if id(module) in layers
            and (kept := kept_count(module.weight.numel(), group.sparsity)) < module.weight.shape[0]]


class MaskGroup:
    """The masks of one model: computed from |scores| at a sparsity and scope, cached per step."""

    def __init__(self, layers: Iterable[MaskedLayer], sparsity: float, scope: Scope = "layer"):
        self.layers = list(layers)
        self.sparsity = sparsity
        self.scope = scope
        self.frozen = False
        self._versions: tuple[int, ...] | None = None
        for layer in self.layers:
            object.__setattr__(layer, "group", self)

    def refresh(self) -> None:
        """Recompute the masks if any score tensor changed since the last computation."""
        if self.frozen:
            return
        versions = tuple(layer.scores._version for layer in self.layers)
        if versions != self._versions:
            self.recompute()
            self._versions = tuple(layer.scores._version for layer in self.layers)

    @torch.no_grad()
    def recompute(self) -> None:
        if self.scope == "layer":
            for layer in self.layers:
                layer.mask.copy_(top_k_mask(layer.scores.abs(), kept_count(layer.scores.numel(), self.sparsity)))
            return
        scores = torch.cat([layer.scores.detach().abs().reshape(-1) for layer in self.layers])
        flat = top_k_mask(scores, kept_count(scores.numel(), self.sparsity))
        for layer, part in zip(self.layers, flat.split([l.scores.numel() for l in self.layers])):
            layer.mask.copy_(part.view_as(layer.mask))

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the current masks; weights (unless binary) are multiplied by them once."""
        self.refresh()
        self.frozen = True
        for layer in self.layers:
            layer.scores.requires_grad_(False)
            if not layer.binary:
                layer.weight.mul_(layer.mask)

    def restored(self) -> None:
        """Loaded from a checkpoint for fine-tuning: the masks stay as loaded and the scores
        stop training (the weights train)."""
        self.frozen = True
        for layer in self.layers:
            layer.scores.requires_grad_(False)

    @torch.no_grad()
    def enforce(self, refit: bool = False) -> None:
        """Zero the pruned weights again (after an optimizer step: momentum or weight decay may
        have moved them); `refit` (after an optimizer step, not after loading a checkpoint)
        also follows the moved weights with the k-means codebooks."""
        for layer in self.layers:
            if not layer.binary:
                layer.weight.mul_(layer.mask)
            if refit:
                layer.fit_codebook(KMEANS_REFIT_ITERATIONS)
