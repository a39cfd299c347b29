"""Pruning methods: each is a config class (its `name` is the YAML tag) plus a handler.

A handler `handler(model, config) -> PruneSetup` builds the method's layers in place (masked or
factorized, with the shapes a checkpoint of the method holds) and decides what trains in the
prune stage; the setup's `start(context)` then gives them their first values (scores, masks,
factors) from the dense weights and, when the method needs them, from training batches and the
stage objective (a `PruneContext`). `prune_model` runs both. Restoring a checkpoint runs the
handler only and the saved state provides the values, so no start (an SVD, a k-means fit, a
search for a size budget) runs at load.

A method may also run the prune stage itself (`PruneSetup.run_stage`: the rounds of iterative
pruning), add a step after it (`PruneSetup.finish`: a structural rebuild) and ask the pretrain
stage to keep checkpoints (`kept_pretrain_epochs`: a rewind point). The pipeline calls these hooks
and never names a method, so a new method is one file: its config class and its registered handler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Literal, Optional, Protocol

import torch
from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator
from torch import nn

from cardkit.compress.quantize import Bits, QuantSpec
from cardkit.config_base import HandlerTable, Section
from cardkit.errors import CardkitError
from cardkit.numbers import Number
from cardkit.prune.masked import MaskGroup, add_masks, masked_layers

if TYPE_CHECKING:
    from cardkit.attacks import Threat
    from cardkit.objectives import Objective

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


class PruneMethodConfig(Section):
    """The base of every method config: what the pipeline reads of a method besides its handler."""

    @property
    def label(self) -> str:
        """A run-folder name for the variant, e.g. hydra-0.9."""
        return self.name

    @property
    def kept_pretrain_epochs(self) -> frozenset[int]:
        """Pretrain epochs whose checkpoints the method reads (a rewind point): the pretrain stage
        keeps them when the config lists the method."""
        return frozenset()


class SparsityConfig(PruneMethodConfig):
    """The base of the methods that mask weights at a sparsity, per layer or globally."""

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
        q = self.quantize
        bits = "" if q is None else f"-{q.bits}bit" + ("-kmeans" if q.scheme == "kmeans" else "")
        return f"{self.name}-{self.sparsity:g}" + ("" if self.scope == "layer" else f"-{self.scope}") + bits


class MagnitudeConfig(SparsityConfig):
    """One-shot least-weight-magnitude pruning (LWM; Sehwag et al. 2019 with robust fine-tuning)."""

    name: Literal["magnitude"] = "magnitude"
    structured: ClassVar[bool] = True


class HydraConfig(SparsityConfig):
    """HYDRA (Sehwag et al. 2020): scores trained under the robust loss with weights frozen."""

    name: Literal["hydra"] = "hydra"
    structured: ClassVar[bool] = True
    train_norm: bool = False  # also train normalization layers while the scores train


class EdgePopupConfig(SparsityConfig):
    """edge-popup (Ramanujan et al. 2020): a subnetwork of a random, frozen network, found by
    training only the scores."""

    name: Literal["edge_popup"] = "edge_popup"
    weight_init: Literal["signed_constant", "kaiming_normal"] = "signed_constant"


class BipropConfig(SparsityConfig):
    """biprop (Diffenderfer & Kailkhura 2021): binary weights alpha x sign(W) x mask, with
    alpha = mean |W| over each layer's kept weights; W random and frozen, scores trained."""

    name: Literal["biprop"] = "biprop"


class GMPConfig(SparsityConfig):
    """Gradual magnitude pruning (Zhu & Gupta 2017) while the weights train in the prune stage:
    sparsity rises from `initial_sparsity` to `sparsity` on a cubic schedule, updated every
    `frequency` optimizer steps between `start_step` and `end_step` (default: the stage's last)."""

    name: Literal["gmp"] = "gmp"
    initial_sparsity: Number = Field(0.0, ge=0, lt=1)
    start_step: NonNegativeInt = 0
    end_step: Optional[PositiveInt] = None
    frequency: PositiveInt = 10


class LotteryConfig(SparsityConfig):
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

    @property
    def kept_pretrain_epochs(self) -> frozenset[int]:
        return frozenset({self.rewind_epoch} if self.rewind == "weights" else ())


@dataclass
class PruneContext:
    """What a method's start may use besides the dense weights (the pipeline gives one to every
    start; from the Python API, pass one to `prune_model` for a method that needs it)."""

    model: nn.Module  # the model being pruned: the handler's, converted in place
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]  # training (x in [0, 1], y), on the model's device
    objective: Objective  # the stage's loss: (model, x, y) -> {"loss", "logits", ...}, robust or not
    threat: Optional[Threat] = None  # the run's threat model (the objective's attack uses it already)
    seed: int = 0  # for the start's own random draws
    stage: Optional[Section] = None  # the prune stage's config (epochs, optimizer, ...)


class PruneStage(Protocol):
    """The pipeline's prune stage as a method that runs it itself (`PruneSetup.run_stage`) sees it.
    Each part is a folder under the variant's prune/ folder that resumes on its own."""

    def pretrain_state(self, epoch: int) -> Optional[dict[str, torch.Tensor]]:
        """The dense model's state after pretrain epoch `epoch`, if the pretrain stage kept it."""

    def train(self, part: str, start: str, offset: int) -> None:
        """Train the weights under the frozen masks in prune/<part>/, from the checkpoint in
        prune/<start>/; `offset` gives the part its own random streams."""

    def save(self, part: str, make_model: Callable[[], nn.Module], trained: bool) -> None:
        """A checkpoint of make_model() in prune/<part>/ (prune/ itself for ""), unless one is there;
        `trained`: the weights last trained in this stage, not in pretraining."""


@dataclass
class PruneSetup:
    model: nn.Module  # the pruned model (a new, smaller one after one-shot structured pruning)
    group: Optional[MaskGroup]  # None for a physically rebuilt model: it has no masks
    trains: bool  # whether the prune stage trains anything (scores) before the mask is frozen
    # the first values of the method's state (scores, masks, factors); returns the model when it
    # is a new one. Not run when a checkpoint is restored: its state has the values.
    start: Optional[Callable[[Optional[PruneContext]], Optional[nn.Module]]] = None
    after_step: Optional[Callable[[int, int], None]] = None  # (steps done, total steps) in the stage
    regularizer: Optional[Callable[[], torch.Tensor]] = None  # added to the prune stage's loss
    finish: Optional[Callable[[], nn.Module]] = None  # after the prune stage: the model to fine-tune
    run_stage: Optional[Callable[[PruneStage], None]] = None  # the prune stage, in place of the pipeline's


METHODS = HandlerTable("pruning method")
METHOD_CONFIGS = METHODS.configs
register_method = METHODS.register
"""Decorator: `handler(model, config) -> PruneSetup` becomes the handler of a config class."""
method_names = METHODS.names
method_config = METHODS.config
"""Build a method config by name (for the CLI); unknown names suggest the closest."""


def prune_model(model: nn.Module, config: Section, context: Optional[PruneContext] = None) -> PruneSetup:
    """Apply a pruning method to a dense model in place (and its quantizer to the kept weights);
    `context` gives the methods that score weights on data (SNIP) their batches and objective."""
    setup = METHODS.handler(config)(model, config)
    if setup.start is not None:
        setup.model = setup.start(context) or setup.model
    _set_quantizers(setup, config, fit=True)
    return setup


def restore_method(model: nn.Module, config: Section) -> PruneSetup:
    """The layers of a model pruned by `config`, built for loading its checkpoint: the shapes and
    what trains in the prune stage are the method's, the values (masks, scores, factors, codebooks,
    budget) come from the state loaded next. The method's start does not run. A model rebuilt
    smaller by structured pruning has plain layers: nothing to restore."""
    if "structured" in getattr(model, "arch", {}):
        return PruneSetup(model, None, trains=False)
    setup = METHODS.handler(config)(model, config)
    _set_quantizers(setup, config, fit=False)
    return setup


def restore_masks(model: nn.Module, config: Section):
    """`restore_method` for fine-tuning: the masks stay as loaded (frozen), and the weights, not
    the scores, train. Returns the model's mask group (a `MaskGroup`, or the method's own group
    with the same interface), or None for a model rebuilt without masks."""
    group = restore_method(model, config).group
    for p in model.parameters():
        p.requires_grad_(True)
    if group is not None:
        group.restored()
    return group


def _set_quantizers(setup: PruneSetup, config: Section, fit: bool) -> None:
    quantize = getattr(config, "quantize", None)
    if quantize is not None:
        for layer in setup.group.layers:
            layer.set_quantizer(quantize.spec(), fit=fit)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def to_structured(model: nn.Module, config: SparsityConfig) -> nn.Module:
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


def mask_scope(config: SparsityConfig) -> str:
    """Structured HYDRA trains one score per weight under a layer-wise mask first."""
    return "layer" if config.scope == "structured" else config.scope


def frozen_group(model: nn.Module, sparsity: float, scope: str) -> MaskGroup:
    """Masked layers whose masks change only when the method sets them: the weights train."""
    group = MaskGroup(add_masks(model), sparsity, scope)
    group.frozen = True
    return group


@torch.no_grad()
def set_masks(group: MaskGroup, scores: list[torch.Tensor]) -> None:
    """The frozen group's masks from these scores (the top-k at its sparsity and scope), baked
    into the weights."""
    for layer, score in zip(group.layers, scores):
        layer.scores.copy_(score)
    group.recompute()
    group.enforce()


def magnitudes(group: MaskGroup) -> list[torch.Tensor]:
    return [layer.weight.detach().abs() for layer in group.layers]


@register_method(MagnitudeConfig)
def magnitude(model: nn.Module, config: MagnitudeConfig) -> PruneSetup:
    if config.scope == "structured":
        return PruneSetup(model, None, trains=False, start=lambda context: to_structured(model, config))
    group = frozen_group(model, config.sparsity, config.scope)
    return PruneSetup(model, group, trains=False, start=lambda context: set_masks(group, magnitudes(group)))


@register_method(HydraConfig)
def hydra(model: nn.Module, config: HydraConfig) -> PruneSetup:
    layers = add_masks(model)
    freeze_all(model)
    for layer in layers:
        layer.scores.requires_grad_(True)
    if config.train_norm:
        for module in model.modules():
            if isinstance(module, NORM_LAYERS):
                for p in module.parameters():
                    p.requires_grad_(True)
    group = MaskGroup(layers, config.sparsity, mask_scope(config))

    @torch.no_grad()
    def start(context: Optional[PruneContext]) -> None:
        for layer in layers:
            # Scaled magnitudes: the initial mask is LWM's, and the scores start on the scale of a
            # Kaiming-uniform initialisation so that SGD moves them at a useful rate.
            weight = layer.weight.detach()
            fan_in = weight[0].numel()
            layer.scores.copy_(math.sqrt(6.0 / fan_in) * weight / weight.abs().max().clamp_min(1e-12))
        group.refresh()

    finish = (lambda: to_structured(model, config)) if config.scope == "structured" else None
    return PruneSetup(model, group, trains=True, start=start, finish=finish)


@register_method(EdgePopupConfig)
def edge_popup(model: nn.Module, config: EdgePopupConfig) -> PruneSetup:
    return _random_subnetwork(model, config, config.weight_init, binary=False)


@register_method(BipropConfig)
def biprop(model: nn.Module, config: BipropConfig) -> PruneSetup:
    return _random_subnetwork(model, config, "kaiming_normal", binary=True)


def _random_subnetwork(model: nn.Module, config: SparsityConfig, weight_init: str,
                       binary: bool) -> PruneSetup:
    """Random frozen weights (the trained ones are discarded) and trainable Kaiming-uniform scores."""
    layers = add_masks(model)
    freeze_all(model)
    for layer in layers:
        layer.scores.requires_grad_(True)
        layer.binary = binary
    group = MaskGroup(layers, config.sparsity, config.scope)

    @torch.no_grad()
    def start(context: Optional[PruneContext]) -> None:
        for layer in layers:
            weight = layer.weight
            std = math.sqrt(2.0 / weight[0].numel())  # Kaiming normal, fan-in, ReLU gain
            weight.normal_(0.0, std)
            if weight_init == "signed_constant":
                weight.copy_(weight.sign() * std)
            bound = 1.0 / math.sqrt(weight[0].numel())  # Kaiming uniform with a = sqrt(5), as nn.Linear
            layer.scores.uniform_(-bound, bound)
        group.refresh()

    return PruneSetup(model, group, trains=True, start=start)


@register_method(LotteryConfig)
def lottery(model: nn.Module, config: LotteryConfig) -> PruneSetup:
    """The first round's one-shot magnitude mask, and the rounds as the prune stage."""
    setup = magnitude(model, MagnitudeConfig(sparsity=config.round_sparsity(1), scope=config.scope))
    setup.run_stage = lambda stage: lottery_rounds(stage, setup, config)
    return setup


def lottery_rounds(stage: PruneStage, setup: PruneSetup, config: LotteryConfig) -> None:
    """Round r prunes the trained weights to the r-th sparsity and rewinds (prune/round-r/), then
    retrains under the mask (prune/train-r/). The last round's pruned model is the stage's
    checkpoint (prune/), which the finetune stage retrains."""
    rewind_state = None
    if config.rewind == "weights":
        rewind_state = stage.pretrain_state(config.rewind_epoch)
        if rewind_state is None:
            raise CardkitError(f"{config.label}: the pretrain stage kept no checkpoint of epoch "
                               f"{config.rewind_epoch} to rewind to (it keeps one only when the config lists "
                               f"this method before pretraining); use rewind: lr, or run the pipeline "
                               f"with the lottery method from the start")

    def pruned(round: int) -> nn.Module:
        prune_round(setup.model, setup.group, config.round_sparsity(round), rewind_state)
        return setup.model

    for round in range(1, config.rounds + 1):
        if round > 1:
            stage.train(f"train-{round - 1}", start=f"round-{round - 1}", offset=round)
        part = "" if round == config.rounds else f"round-{round}"
        stage.save(part, lambda: pruned(round), trained=round > 1)


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
    group = frozen_group(model, config.initial_sparsity, config.scope)  # masks change on the schedule
    layers = group.layers

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

    return PruneSetup(model, group, trains=True, start=lambda context: set_masks(group, magnitudes(group)),
                      after_step=after_step)
