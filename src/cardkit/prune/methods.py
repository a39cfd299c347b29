"""Pruning methods: each is a config class (its `name` is the YAML tag) plus a handler.

A handler turns a dense model into a masked one: it swaps in the masked layers, sets their scores,
decides what trains during the prune stage (scores for HYDRA, nothing for one-shot magnitude
pruning) and returns the model's `MaskGroup`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Optional

import torch
from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator
from torch import nn

from cardkit.compress.quantize import Bits, QuantSpec
from cardkit.config_base import HandlerTable, Section
from cardkit.errors import CardkitError
from cardkit.numbers import Number
from cardkit.prune.masked import MaskGroup, add_masks, masked_layers

NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


class QuantizeConfig(Section):
    """Quantization-aware training of the kept weights (straight-through estimator): `uniform`
    symmetric levels (bits 1 is binary alpha x sign), per layer or per output channel, or a
    per-layer `kmeans` codebook of 2^bits centres, one of them fixed at zero."""

    scheme: Literal["uniform", "kmeans"] = "uniform"
    bits: Bits = 8
    per_channel: bool = False

    @model_validator(mode="after")
    def _per_channel_uniform(self):
        if self.per_channel and self.scheme == "kmeans":
            raise ValueError("a k-means codebook is per layer: set per_channel: false or scheme: uniform")
        return self

    def spec(self) -> QuantSpec:
        return QuantSpec(self.scheme, self.bits, self.per_channel)


class _MethodConfig(Section):
    sparsity: Number = Field(..., ge=0, lt=1)  # fraction of weights removed: 0.99 keeps 1%
    # layer: the same sparsity in every layer; global: one threshold over all layers;
    # structured: whole output channels (this fraction of them) removed and the model rebuilt smaller
    scope: Literal["layer", "global", "structured"] = "layer"
    quantize: Optional[QuantizeConfig] = None  # quantize the kept weights while they train

    @model_validator(mode="after")
    def _quantize_where_supported(self):
        if self.quantize is not None and (self.scope == "structured" or self.name == "biprop"):
            why = "biprop's weights are binary already" if self.name == "biprop" else \
                "a structurally pruned model is rebuilt dense"
            raise ValueError(f"quantize does not apply here: {why}; remove quantize")
        return self

    @field_validator("scope")
    @classmethod
    def _structured_only_where_supported(cls, scope: str) -> str:
        if scope == "structured" and not cls.structured:
            raise ValueError("the structured scope is available for magnitude and hydra; use "
                             "scope: layer or global")
        return scope

    structured: ClassVar[bool] = False

    @property
    def label(self) -> str:
        """A run-folder name for this method and sparsity, e.g. hydra-0.9."""
        q = self.quantize
        bits = "" if q is None else f"-{q.bits}bit" + ("-kmeans" if q.scheme == "kmeans" else "")
        return f"{self.name}-{self.sparsity:g}" + ("" if self.scope == "layer" else f"-{self.scope}") + bits


class MagnitudeConfig(_MethodConfig):
    """One-shot least-weight-magnitude pruning (LWM; Sehwag et al. 2019 with robust fine-tuning)."""

    name: Literal["magnitude"] = "magnitude"
    structured: ClassVar[bool] = True


class HydraConfig(_MethodConfig):
    """HYDRA (Sehwag et al. 2020): scores trained under the robust loss with weights frozen."""

    name: Literal["hydra"] = "hydra"
    structured: ClassVar[bool] = True
    train_norm: bool = False  # also train normalization layers while the scores train


class EdgePopupConfig(_MethodConfig):
    """edge-popup (Ramanujan et al. 2020): a subnetwork of a random, frozen network, found by
    training only the scores."""

    name: Literal["edge_popup"] = "edge_popup"
    weight_init: Literal["signed_constant", "kaiming_normal"] = "signed_constant"


class BipropConfig(_MethodConfig):
    """biprop (Diffenderfer & Kailkhura 2021): binary weights alpha x sign(W) x mask, with
    alpha = mean |W| over each layer's kept weights; W random and frozen, scores trained."""

    name: Literal["biprop"] = "biprop"


class GMPConfig(_MethodConfig):
    """Gradual magnitude pruning (Zhu & Gupta 2017) while the weights train in the prune stage:
    sparsity rises from `initial_sparsity` to `sparsity` on a cubic schedule, updated every
    `frequency` optimizer steps between `start_step` and `end_step` (default: the stage's last)."""

    name: Literal["gmp"] = "gmp"
    initial_sparsity: Number = Field(0.0, ge=0, lt=1)
    start_step: NonNegativeInt = 0
    end_step: Optional[PositiveInt] = None
    frequency: PositiveInt = 10


class LotteryConfig(_MethodConfig):
    """Iterative magnitude pruning (Frankle & Carbin 2019): `rounds` times, prune the smallest
    weights to the next sparsity of a geometric schedule, rewind, and retrain under the mask (the
    retraining after the last round is the finetune stage). `rewind: weights` resets the kept
    weights to those of pretrain epoch `rewind_epoch` (Frankle et al. 2020); `rewind: lr` keeps the
    trained weights and restarts only the learning-rate schedule (LRR, Renda et al. 2020)."""

    name: Literal["lottery"] = "lottery"
    rounds: PositiveInt = 3
    rewind: Literal["weights", "lr"] = "weights"
    rewind_epoch: PositiveInt = 1

    def round_sparsity(self, round: int) -> float:
        """Each round removes the same fraction of the remaining weights."""
        return 1 - (1 - self.sparsity) ** (round / self.rounds)


@dataclass
class PruneSetup:
    model: nn.Module  # the pruned model (a new, smaller one after one-shot structured pruning)
    group: Optional[MaskGroup]  # None for a physically rebuilt model: it has no masks
    trains: bool  # whether the prune stage trains anything (scores) before the mask is frozen
    after_step: Optional[Callable[[int, int], None]] = None  # (steps done, total steps) in the stage
    regularizer: Optional[Callable[[], torch.Tensor]] = None  # added to the prune stage's loss


METHODS = HandlerTable("pruning method")
METHOD_CONFIGS = METHODS.configs
register_method = METHODS.register
"""Decorator: `handler(model, config) -> PruneSetup` becomes the handler of a config class."""
method_names = METHODS.names
method_config = METHODS.config
"""Build a method config by name (for the CLI); unknown names suggest the closest."""


def prune_model(model: nn.Module, config: Section) -> PruneSetup:
    """Apply a pruning method to a dense model in place (and its quantizer to the kept weights)."""
    setup = METHODS.handler(config)(model, config)
    quantize = getattr(config, "quantize", None)
    if quantize is not None:
        for layer in setup.group.layers:
            layer.set_quantizer(quantize.spec())
    return setup


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def to_structured(model: nn.Module, config: _MethodConfig) -> nn.Module:
    """Remove the lowest-L1 output channels (of the weights, or of HYDRA's trained scores) and
    rebuild the model physically smaller."""
    from cardkit.prune.structured import channel_masks, rebuild

    with torch.no_grad():  # keep the dense weights of the kept channels, not a weight-level mask
        for layer in masked_layers(model):
            if layer.group is not None:
                layer.group.frozen = True
            layer.mask.fill_(1.0)
            layer.scores.requires_grad_(False)
    source = "scores" if isinstance(config, HydraConfig) else "weight"
    return rebuild(model, channel_masks(model, config.sparsity, source=source))


def mask_scope(config: _MethodConfig) -> str:
    """Structured HYDRA trains one score per weight under a layer-wise mask first."""
    return "layer" if config.scope == "structured" else config.scope


@register_method(MagnitudeConfig)
def magnitude(model: nn.Module, config: MagnitudeConfig) -> PruneSetup:
    if config.scope == "structured":
        return PruneSetup(to_structured(model, config), None, trains=False)
    layers = add_masks(model)
    for layer in layers:
        layer.scores.data.copy_(layer.weight.detach().abs())
    group = MaskGroup(layers, config.sparsity, config.scope)
    group.freeze()  # one shot: the mask is final and baked into the weights
    return PruneSetup(model, group, trains=False)


@register_method(HydraConfig)
def hydra(model: nn.Module, config: HydraConfig) -> PruneSetup:
    layers = add_masks(model)
    freeze_all(model)
    for layer in layers:
        # Scaled magnitudes: the initial mask is LWM's, and the scores start on the scale of a
        # Kaiming-uniform initialisation so that SGD moves them at a useful rate.
        weight = layer.weight.detach()
        fan_in = weight[0].numel()
        layer.scores.data.copy_(math.sqrt(6.0 / fan_in) * weight / weight.abs().max().clamp_min(1e-12))
        layer.scores.requires_grad_(True)
    if config.train_norm:
        for module in model.modules():
            if isinstance(module, NORM_LAYERS):
                for p in module.parameters():
                    p.requires_grad_(True)
    group = MaskGroup(layers, config.sparsity, mask_scope(config))
    group.refresh()
    return PruneSetup(model, group, trains=True)


@register_method(EdgePopupConfig)
def edge_popup(model: nn.Module, config: EdgePopupConfig) -> PruneSetup:
    return _random_subnetwork(model, config, config.weight_init, binary=False)


@register_method(BipropConfig)
def biprop(model: nn.Module, config: BipropConfig) -> PruneSetup:
    return _random_subnetwork(model, config, "kaiming_normal", binary=True)


@torch.no_grad()
def _random_subnetwork(model: nn.Module, config: _MethodConfig, weight_init: str,
                       binary: bool) -> PruneSetup:
    """Random frozen weights (the trained ones are discarded) and trainable Kaiming-uniform scores."""
    layers = add_masks(model)
    freeze_all(model)
    for layer in layers:
        weight = layer.weight
        std = math.sqrt(2.0 / weight[0].numel())  # Kaiming normal, fan-in, ReLU gain
        weight.normal_(0.0, std)
        if weight_init == "signed_constant":
            weight.copy_(weight.sign() * std)
        bound = 1.0 / math.sqrt(weight[0].numel())  # Kaiming uniform with a = sqrt(5), as nn.Linear
        layer.scores.uniform_(-bound, bound)
        layer.scores.requires_grad_(True)
        layer.binary = binary
    group = MaskGroup(layers, config.sparsity, config.scope)
    group.refresh()
    return PruneSetup(model, group, trains=True)


@register_method(LotteryConfig)
def lottery(model: nn.Module, config: LotteryConfig) -> PruneSetup:
    """The first round's one-shot magnitude mask; the pipeline runs the rounds (`prune_round`)."""
    return magnitude(model, MagnitudeConfig(sparsity=config.round_sparsity(1), scope=config.scope))


@torch.no_grad()
def prune_round(model: nn.Module, group: MaskGroup, sparsity: float,
                rewind_state: dict[str, torch.Tensor] | None) -> None:
    """Prune the smallest trained weights of a frozen group to `sparsity` (pruned weights are
    zero, so they stay pruned), then rewind every parameter and buffer to `rewind_state` (a dense
    state dict) when given; the kept weights take their rewound values."""
    for layer in group.layers:
        layer.scores.copy_(layer.weight.abs())
    group.sparsity = sparsity
    group.recompute()
    if rewind_state is not None:
        state = model.state_dict()
        for name, value in rewind_state.items():
            state[name].copy_(value)
    group.enforce()


def gmp_sparsity(step: int, config: GMPConfig, total_steps: int) -> float:
    """The cubic schedule, held constant between updates: s_f + (s_i - s_f)(1 - progress)^3."""
    start, end = config.start_step, config.end_step or total_steps
    if step <= start:
        return config.initial_sparsity
    if step >= end:
        return config.sparsity
    updated = start + (step - start) // config.frequency * config.frequency
    progress = (updated - start) / (end - start)
    return config.initial_sparsity + (config.sparsity - config.initial_sparsity) * (1 - (1 - progress) ** 3)


@register_method(GMPConfig)
def gmp(model: nn.Module, config: GMPConfig) -> PruneSetup:
    layers = add_masks(model)
    group = MaskGroup(layers, config.initial_sparsity, config.scope)
    group.frozen = True  # masks change only on the schedule, below

    @torch.no_grad()
    def after_step(step: int, total_steps: int) -> None:
        end = config.end_step or total_steps
        if end > total_steps or config.start_step >= end:
            raise CardkitError(f"gmp: start_step {config.start_step} and end_step {end} must satisfy "
                               f"start_step < end_step <= {total_steps}, the prune stage's steps; "
                               f"change them or prune.epochs")
        sparsity = gmp_sparsity(step, config, total_steps)
        # Stateless (compares with the previous step's value), so a resumed run updates the
        # masks at exactly the same steps.
        if sparsity != gmp_sparsity(step - 1, config, total_steps):
            for layer in layers:
                layer.scores.copy_(layer.weight.abs())
            group.sparsity = sparsity
            group.recompute()
        group.enforce(refit=True)

    with torch.no_grad():
        group.recompute()
        group.enforce()
    return PruneSetup(model, group, trains=True, after_step=after_step)


def restore_masks(model: nn.Module, config: Section):
    """Rebuild the masked layers of a pruned model, before its state is loaded: the loaded masks
    are then used as they are (frozen), and the weights, not the scores, train. Returns the
    model's mask group (a `MaskGroup`, or the method's own group with the same interface)."""
    group = prune_model(model, config).group
    for p in model.parameters():
        p.requires_grad_(True)
    group.restored()
    return group
