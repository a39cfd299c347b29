"""ATMC (Gui et al., NeurIPS 2019): pruning, factorization and quantization as constraints of one
adversarially trained model, solved with projections and ADMM.

Every Conv2d / Linear weight W (out x fan_in) becomes W = U V + C: U (out x r) and V (r x fan_in)
start from W's truncated SVD and C = W - U V is the residual. The prune stage trains the factors
theta = (U, V, C) under the robust loss with two constraints:

- sparsity: at most k nonzeros over all factors of all layers together (one global budget),
  kept by projected SGD as in the paper: after every optimizer step theta is projected back onto
  the constraint. Every `prune_interval` steps the projection is the global top-k of |theta|
  (masks chosen anew); on the other steps it is onto the current masks (pruned entries set back
  to zero), a cheaper projection onto a subset of the same constraint set. The gradient reaches
  every entry, so a pruned entry that one step carries above the k-th magnitude comes back at
  the next top-k. Pruned entries never keep a value between projections: one that drifted for
  `prune_interval` steps on gradients taken while it was zero would enter the forward with a
  value nothing has tested (on MNIST at 97% such a projection took the loss from 0.3 to 9).
- quantization: each factor tensor takes at most 2^bits values (a k-means codebook whose first
  centre is fixed at zero). ADMM keeps a quantized duplicate Z = q(theta + Lambda) and a scaled
  dual Lambda, updated every `quant_interval` steps, and adds rho/2 ||theta - Z + Lambda||^2 to
  the loss, which pulls theta towards its quantized duplicate.

The stage's last step projects once more and quantizes for good (the hard phase): from then on the
forward uses the nearest codebook centre of every kept entry, the gradient passes straight through
to the float factors, and masks and codebooks stay fixed (fine-tuning trains theta only).

All state (masks, codebooks, Z, Lambda, phase) is in buffers, the budget is the count the masks
keep, and the schedule is a function of the step count, so a resumed run continues exactly as an
uninterrupted one, and a checkpoint loads into layers of the right shapes without the start's SVD,
budget search or k-means fits.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, model_validator
from torch import nn

from cardkit.compress.quantize import Bits, Quantized, quantize_kmeans
from cardkit.compress.size import dense_bits, model_size
from cardkit.compress.stored import StoredTensor, factorized_weight
from cardkit.errors import CardkitError
from cardkit.numbers import Number
from cardkit.prune.masked import kept_count, selected_layers, top_k_mask
from cardkit.prune.methods import PruneMethodConfig, PruneSetup, register_method

log = logging.getLogger(__name__)
FACTORS = ("u", "v", "c")
DEFAULT_RANK = 0.25


class AtmcConfig(PruneMethodConfig):
    """ATMC with a budget given as `sparsity` (fraction of the dense weights' count removed,
    counted over all U, V, C entries) or as `size_ratio` (compressed / dense float32 bits)."""

    name: Literal["atmc"] = "atmc"
    sparsity: Optional[Number] = Field(None, ge=0, lt=1)
    size_ratio: Optional[Number] = Field(None, gt=0, lt=1)
    bits: Bits = 8  # k-means bits per factor entry: 2^bits centres, one of them zero
    rank: Number = Field(DEFAULT_RANK, gt=0, le=1)  # r = this fraction of min(out, fan_in), at least 1
    prune_interval: PositiveInt = 50  # optimizer steps between top-k projections
    quant_interval: PositiveInt = 50  # optimizer steps between ADMM (Z, Lambda) updates
    rho: NonNegativeFloat = 1e-3  # ADMM penalty
    kmeans_iterations: NonNegativeInt = 20
    scope: Literal["global"] = "global"  # one budget over all layers

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.sparsity is None) == (self.size_ratio is None):
            given = "both" if self.sparsity is not None else "neither"
            raise ValueError(f"atmc needs exactly one of sparsity (fraction of weights removed, e.g. "
                             f"0.99) and size_ratio (compressed / dense size, e.g. 0.02); {given} given")
        return self

    @property
    def label(self) -> str:
        """A run-folder name, e.g. atmc-0.99-8bit or atmc-r0.02-4bit."""
        budget = f"{self.sparsity:g}" if self.sparsity is not None else f"r{self.size_ratio:g}"
        rank = "" if self.rank == DEFAULT_RANK else f"-rank{self.rank:g}"
        return f"atmc-{budget}-{self.bits}bit{rank}"


class AtmcLayer:
    """Mixin for the factorized Conv2d / Linear: parameters u, v, c instead of `weight`, which is
    a read-only property (the effective weight), so code that reads `.weight` keeps working."""

    u: nn.Parameter
    v: nn.Parameter
    c: nn.Parameter
    hard: torch.Tensor  # bool scalar: quantized for good (fine-tuning) or not (the prune stage)

    def _init_factors(self, weight: torch.Tensor, rank: float, bits: int) -> None:
        """Factors, masks, codebooks and ADMM state of the shapes `weight` and `rank` give (zero
        factors: `set_factors` or a loaded state gives their values)."""
        shape, out, fan_in = weight.shape, weight.shape[0], math.prod(weight.shape[1:])
        r = factor_rank(out, fan_in, rank)
        object.__setattr__(self, "weight_shape", shape)
        for name, size in zip(FACTORS, ((out, r), (r, fan_in), (out, fan_in))):
            value = torch.zeros(size, dtype=torch.float32, device=weight.device)
            self.register_parameter(name, nn.Parameter(value.to(weight.dtype)))
            self.register_buffer(f"mask_{name}", torch.ones_like(value))
            self.register_buffer(f"codebook_{name}", value.new_zeros(2 ** bits))
            self.register_buffer(f"z_{name}", torch.zeros_like(value))  # ADMM duplicate
            self.register_buffer(f"dual_{name}", torch.zeros_like(value))  # ADMM scaled dual
        self.register_buffer("hard", torch.zeros((), dtype=torch.bool, device=weight.device))
        object.__setattr__(self, "_cache_key", None)

    @torch.no_grad()
    def set_factors(self, weight: torch.Tensor) -> None:
        """U, V from the truncated SVD of the dense `weight` at the layer's rank, C the residual."""
        factors = truncated_svd(weight.detach().reshape(self.weight_shape[0], -1).float(), self.u.shape[1])
        for name, value in zip(FACTORS, factors):
            getattr(self, name).copy_(value)

    @property
    def weight(self) -> torch.Tensor:
        return self.effective_weight()

    def factor(self, name: str) -> tuple[nn.Parameter, torch.Tensor, torch.Tensor]:
        """(theta, mask, codebook) of factor `name`."""
        return getattr(self, name), getattr(self, f"mask_{name}"), getattr(self, f"codebook_{name}")

    @property
    def bits(self) -> int:
        return self.codebook_u.numel().bit_length() - 1

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.u.shape[1]}, bits={self.bits}"

    def effective_weight(self) -> torch.Tensor:
        """U V + C from the masked (or quantized) factors. The product is computed once per change
        of the layer's state (i.e. once per optimizer step) and reused by every forward of a PGD
        attack; the backward sends each factor's gradient straight through to its float entries."""
        (u, v, _), _, weight = self._cached()
        return _FactorizedWeight.apply(self.u, self.v, self.c, u, v, weight)

    def stored_tensors(self, prefix: str) -> list[StoredTensor]:
        """U, V and C exactly as the forward uses them (a file recomputes W from these)."""
        factors, quantized, _ = self._cached()
        tensors = []
        for name, values, q in zip(FACTORS, factors, quantized or (None,) * 3):
            kept = self.factor(name)[1].detach() != 0
            tensors.append(StoredTensor(f"{prefix}.{name}", values.float(), kept,
                                        "float" if q is None else "kmeans", q))
        return tensors

    @torch.no_grad()
    def _cached(self) -> tuple[tuple[torch.Tensor, ...], Optional[list[Quantized]], torch.Tensor]:
        tensors = [t for name in FACTORS for t in self.factor(name)] + [self.hard]
        key = (torch.is_inference_mode_enabled(), *((t.data_ptr(), t._version) for t in tensors))
        if self._cache_key != key:
            if bool(self.hard):
                quantized = [quantize_kmeans(theta, mask, bits=self.bits, iterations=0, init=codebook)
                             for theta, mask, codebook in map(self.factor, FACTORS)]
                factors = tuple(q.values for q in quantized)
            else:
                quantized = None
                factors = tuple(theta * mask for theta, mask, _ in map(self.factor, FACTORS))
            weight = factorized_weight(*factors, self.weight_shape)
            object.__setattr__(self, "_cache", (factors, quantized, weight))
            object.__setattr__(self, "_cache_key", key)
        return self._cache


class _FactorizedWeight(torch.autograd.Function):
    """Returns the cached W = U'V' + C' (U', V', C': masked or quantized factors); the backward is
    that of the product, with each factor's gradient passed straight through to theta."""

    @staticmethod
    def forward(ctx, u, v, c, u_used, v_used, weight):
        ctx.save_for_backward(u_used, v_used)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        u_used, v_used = ctx.saved_tensors
        g = grad.reshape(u_used.shape[0], -1)
        return g @ v_used.t(), u_used.t() @ g, g, None, None, None


class AtmcConv2d(AtmcLayer, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.effective_weight(), self.bias)


class AtmcLinear(AtmcLayer, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.effective_weight(), self.bias)


_ATMC = {nn.Conv2d: AtmcConv2d, nn.Linear: AtmcLinear}


def factor_rank(out: int, fan_in: int, rank: float) -> int:
    """r for an out x fan_in weight: the fraction `rank` of min(out, fan_in), at least 1."""
    return max(1, round(rank * min(out, fan_in)))


def svd_factors(weight: torch.Tensor, rank: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U = U_r sqrt(S_r), V = sqrt(S_r) V_r^T and C = W - U V for a 2-D weight, r = factor_rank."""
    return truncated_svd(weight, factor_rank(*weight.shape, rank))


@torch.no_grad()
def truncated_svd(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`svd_factors` at rank r."""
    left, singular, right = torch.linalg.svd(weight, full_matrices=False)
    root = singular[:r].sqrt()
    u, v = left[:, :r] * root, root[:, None] * right[:r]
    return u.contiguous(), v.contiguous(), weight - u @ v


def to_atmc(model: nn.Module, rank: float, bits: int) -> list[AtmcLayer]:
    """Swap every Conv2d / Linear (of the active layer selection) for its factorized subclass, in
    place (the bias is kept), its factors from the SVD of its weight."""
    converted = factorize(model, rank, bits)
    for layer, weight in converted:
        if weight is not None:
            layer.set_factors(weight)
    return [layer for layer, _ in converted]


def factorize(model: nn.Module, rank: float, bits: int) -> list[tuple[AtmcLayer, Optional[torch.Tensor]]]:
    """Swap every Conv2d / Linear (of the active layer selection) for its factorized subclass, in
    place, with zero factors; each with the dense weight it replaced (None if it was factorized
    already)."""
    layers = []
    for _, module in selected_layers(model):
        weight = None
        if not isinstance(module, AtmcLayer):
            weight = module.weight.detach()
            del module.weight
            module.__class__ = _ATMC[type(module)]
            module._init_factors(weight, rank, bits)
        layers.append((module, weight))
    return layers


class AtmcGroup:
    """The factors of one model: projections, ADMM updates and the switch to the hard phase, with
    the interface of a `MaskGroup` (refresh, enforce, restored, frozen, layers)."""

    def __init__(self, model: nn.Module, layers: list[AtmcLayer], config: AtmcConfig, dense_bits: int):
        self.model, self.layers, self.config = model, layers, config
        self.scope = config.scope  # one budget over all layers and factors
        self.frozen = False
        self.dense_count = sum(math.prod(layer.weight_shape) for layer in layers)
        # a size_ratio budget is found by the start (`size_budget`); a restored one is in the masks
        self._budget = None if config.sparsity is None else kept_count(self.dense_count, config.sparsity)
        self.dense_bits = dense_bits  # of the dense float32 model
        self.target_bits = None if config.size_ratio is None else config.size_ratio * dense_bits
        self._fixed_bits: Optional[int] = None

    @property
    def budget(self) -> int:
        """Entries kept over all factors. Every projection keeps exactly the budget, so a loaded
        state's masks hold it until the last step (which may lower it for a size target)."""
        if self._budget is None:
            return sum(int(mask.sum()) for _, mask, *_ in self.factors())
        return self._budget

    @budget.setter
    def budget(self, k: int) -> None:
        self._budget = k

    @property
    def fixed_bits(self) -> int:
        """Accounted bits with nothing kept (biases, normalization, headers of empty codebooks): they
        depend on the shapes only."""
        if self._fixed_bits is None:
            self._fixed_bits = self._trial_bits(0)
        return self._fixed_bits

    def factors(self):
        """(theta, mask, codebook, z, dual) of every factor of every layer."""
        for layer in self.layers:
            for name in FACTORS:
                yield (*layer.factor(name), getattr(layer, f"z_{name}"), getattr(layer, f"dual_{name}"))

    def refresh(self) -> None:
        """Nothing to do: masks change only on the schedule, so saved masks always match."""

    def restored(self) -> None:
        """Loaded from a checkpoint for fine-tuning: masks, codebooks and phase stay as loaded."""
        self.frozen = True

    @torch.no_grad()
    def enforce(self, refit: bool = False) -> None:
        """Zero the factors outside their masks (after an optimizer step); the codebooks stay
        fixed, so `refit` changes nothing here."""
        for theta, mask, *_ in self.factors():
            theta.mul_(mask)

    def regularizer(self) -> torch.Tensor:
        """rho/2 sum ||theta * mask - Z + Lambda||^2 over every factor."""
        total = sum(torch.addcmul(dual - z, theta, mask).square().sum()
                    for theta, mask, _, z, dual in self.factors())
        return 0.5 * self.config.rho * total

    @torch.no_grad()
    def after_step(self, steps_done: int, total_steps: int) -> None:
        """The schedule, a function of the step count alone (resumable)."""
        if self.frozen:
            return
        if steps_done >= total_steps:
            self.finish()
            return
        if steps_done % self.config.prune_interval == 0:
            self.project(self.budget)
        else:
            self.enforce()  # projected onto the current masks: pruned entries do not drift
        if steps_done % self.config.quant_interval == 0:
            self.admm_update()

    @torch.no_grad()
    def project(self, k: int) -> None:
        """Keep the k largest |entries| over all factors (exactly k), zero the rest."""
        factors = list(self.factors())
        scores = torch.cat([theta.detach().abs().reshape(-1) for theta, *_ in factors])
        flat = top_k_mask(scores, k)
        for (theta, mask, *_), part in zip(factors, flat.split([f[0].numel() for f in factors])):
            mask.copy_(part.view_as(mask))
            theta.mul_(mask)

    @torch.no_grad()
    def start_admm(self) -> None:
        """Z = q(theta), Lambda = 0: the usual ADMM start."""
        for theta, mask, codebook, z, dual in self.factors():
            q = self._quantize(theta * mask, mask, codebook, self.config.kmeans_iterations)
            z.copy_(q.values)
            codebook.copy_(q.codebook)
            dual.zero_()

    @torch.no_grad()
    def admm_update(self) -> None:
        """Z = q(theta + Lambda) (k-means warm-started from the last codebook); Lambda += theta - Z."""
        for theta, mask, codebook, z, dual in self.factors():
            kept = theta * mask
            q = self._quantize(kept + dual, mask, codebook, self.config.kmeans_iterations)
            z.copy_(q.values)
            codebook.copy_(q.codebook)
            dual.add_(kept - z)

    @torch.no_grad()
    def harden(self, iterations: int) -> None:
        """Quantize the kept factors for good: theta takes its quantized values, the codebooks are
        fitted by k-means, and the forward switches to the hard phase."""
        for theta, mask, codebook, *_ in self.factors():
            q = self._quantize(theta, mask, codebook, iterations)
            theta.copy_(q.values)
            codebook.copy_(q.codebook)
        for layer in self.layers:
            layer.hard.fill_(True)

    @torch.no_grad()
    def finish(self) -> None:
        """The stage's last step: a final projection and hard quantization, shrinking the budget
        until a size_ratio target holds."""
        saved = self._snapshot() if self.target_bits is not None else None
        k = self.budget
        self.project(k)
        self.harden(self.config.kmeans_iterations)
        while self.target_bits is not None and (bits := self._accounted_bits()) > self.target_bits and k > 0:
            # The kept entries' share of the size is about linear in k.
            k = max(0, min(k - 1, int(k * (self.target_bits - self.fixed_bits) / (bits - self.fixed_bits))))
            log.info("atmc: %d bits exceed the target %.0f; budget lowered to %d entries", bits,
                     self.target_bits, k)
            self._restore(saved)
            self.project(k)
            self.harden(self.config.kmeans_iterations)
        self.frozen = True

    def size_budget(self) -> None:
        """Turn size_ratio into a budget k: about the largest k whose hard-quantized model fits
        (within 0.1% of the target size), by secant steps on the accounted size of trial
        projections of the current factors. The last step checks the trained model again."""
        target, dense_bits = self.target_bits, self.dense_bits
        if self.fixed_bits > target:
            smallest = math.ceil(self.fixed_bits / dense_bits * 1e4) / 1e4
            raise CardkitError(
                f"atmc: size_ratio {self.config.size_ratio:g} is out of reach: with no weight kept, the "
                f"parameters that stay float32 (biases, normalization) alone take {self.fixed_bits} of "
                f"{dense_bits} dense bits, a ratio of {smallest:g}; set size_ratio to at least {smallest:g}")
        points = [(0, self.fixed_bits), (self.dense_count, self._trial_bits(self.dense_count))]
        low, high = points  # the size fits at low[0] entries, and not at high[0]
        if high[1] <= target:
            low = high
        for _ in range(8):
            if low is high or high[0] - low[0] <= 1 or target - low[1] <= 1e-3 * target:
                break
            (k0, b0), (k1, b1) = points[-2:]
            k = k1 + int((target - b1) * (k1 - k0) / (b1 - b0)) if b1 != b0 else (low[0] + high[0]) // 2
            k = min(max(k, low[0] + 1), high[0] - 1)
            points.append((k, self._trial_bits(k)))
            low, high = (points[-1], high) if points[-1][1] <= target else (low, points[-1])
        self.budget = low[0]

    def _trial_bits(self, k: int) -> int:
        """The accounted size with budget k after a cheap hard quantization; the state is restored."""
        saved = self._snapshot()
        try:
            self.project(k)
            self.harden(iterations=0)
            return self._accounted_bits()
        finally:
            self._restore(saved)

    def _accounted_bits(self) -> int:
        return model_size(self.model).bits

    def _state(self) -> list[torch.Tensor]:
        return [t for theta, mask, codebook, *_ in self.factors() for t in (theta, mask, codebook)] + \
               [layer.hard for layer in self.layers]

    def _snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self._state()]

    @torch.no_grad()
    def _restore(self, saved: list[torch.Tensor]) -> None:
        for t, value in zip(self._state(), saved):
            t.copy_(value)

    def _quantize(self, values: torch.Tensor, mask: torch.Tensor, codebook: torch.Tensor,
                  iterations: int) -> Quantized:
        # An all-zero codebook has not been fitted yet: start from evenly spaced centres.
        init = codebook if bool(codebook.any()) else None
        return quantize_kmeans(values, mask, bits=self.config.bits, iterations=iterations, init=init)


@register_method(AtmcConfig)
def atmc(model: nn.Module, config: AtmcConfig) -> PruneSetup:
    """Factorize every Conv2d / Linear; the start sets the factors from the SVD of the dense
    weights, finds the budget, projects once and starts ADMM."""
    dense = dense_bits(model)  # of the dense float32 model, before factorizing
    converted = factorize(model, config.rank, config.bits)
    group = AtmcGroup(model, [layer for layer, _ in converted], config, dense)

    def start(context) -> None:
        for layer, weight in converted:
            if weight is not None:
                layer.set_factors(weight)
        converted.clear()  # the dense weights are no longer needed
        if config.size_ratio is not None:
            group.size_budget()
        group.project(group.budget)
        group.start_admm()

    return PruneSetup(model, group, trains=True, start=start, after_step=group.after_step,
                      regularizer=group.regularizer)
