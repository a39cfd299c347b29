"""Certified training: IBP (Gowal et al. 2018), CROWN-IBP (Zhang et al. 2020) and MixTrain as used
by HYDRA (Wang et al. 2018): cross-entropy on worst-case logits built from margin lower bounds.

Bounds are computed in fp32 even when training runs under bf16/fp16 autocast: a bound rounded in
half precision is no longer a bound, and training would optimise an unsound surrogate."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat

from cardkit.attacks import Threat
from cardkit.certify.crown import crown_ibp_margin_bounds
from cardkit.certify.ibp import ibp_margin_bounds
from cardkit.config_base import Section
from cardkit.numbers import Number
from cardkit.objectives.registry import Objective, register_objective
from cardkit.objectives.standard import PGDAT, PGDATConfig


class _BoundConfig(Section):
    """eps ramps linearly from 0 after `warmup_epochs` over `ramp_epochs`; kappa, the weight of the
    natural loss, moves from 1 to `kappa` over the same ramp."""

    eps: Optional[Number] = Field(None, ge=0)  # Linf; default: the run's threat eps
    warmup_epochs: NonNegativeFloat = 0.0
    ramp_epochs: NonNegativeFloat = 0.0
    kappa: Number = Field(0.0, ge=0, le=1)


class IBPConfig(_BoundConfig):
    """Certified training on the IBP bound loss (Gowal et al. 2018), mixed with the clean loss."""

    name: Literal["ibp"] = "ibp"


class CrownIBPConfig(_BoundConfig):
    """The bound mixes CROWN-IBP (weight beta) and IBP (1 - beta); beta moves from `beta_start`
    to `beta_end` over the ramp."""

    name: Literal["crown_ibp"] = "crown_ibp"
    beta_start: Number = Field(1.0, ge=0, le=1)
    beta_end: Number = Field(0.0, ge=0, le=1)


class MixTrainConfig(PGDATConfig):
    """PGD-AT loss plus `bound_weight` x the IBP bound loss on a random `bound_fraction` of
    each batch (MixTrain, as HYDRA uses it)."""

    name: Literal["mixtrain"] = "mixtrain"
    bound_fraction: Number = Field(0.1, gt=0, le=1)
    bound_weight: NonNegativeFloat = 1.0


def fp32_bounds(x: torch.Tensor):
    """A context in which bound computations on `x`'s device leave autocast (see the module doc)."""
    return torch.autocast(x.device.type, enabled=False)


def bound_loss(lower_margins: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the worst-case logits: 0 for the true class, -lower margin for the others."""
    worst = torch.cat([torch.zeros_like(lower_margins[:, :1]), -lower_margins], dim=1)
    return F.cross_entropy(worst, torch.zeros(len(worst), dtype=torch.long, device=worst.device))


class _Bounded(Objective):
    def __init__(self, config: _BoundConfig, threat: Threat):
        if threat.norm != "linf" and config.eps is None:
            raise ValueError("bound-based objectives certify Linf balls; set the objective's eps")
        self.config, self.full_eps = config, threat.eps if config.eps is None else config.eps
        self.progress = 1.0 if config.ramp_epochs == 0 else 0.0

    def set_progress(self, epoch: float) -> None:
        ramp = self.config.ramp_epochs
        done = epoch - self.config.warmup_epochs
        self.progress = (1.0 if done >= 0 else 0.0) if ramp == 0 else min(max(done / ramp, 0.0), 1.0)

    def margins(self, model, x, y, eps) -> torch.Tensor:
        return ibp_margin_bounds(model, x, y, eps).lower

    def __call__(self, model, x, y):
        eps = self.full_eps * self.progress
        kappa = 1.0 - (1.0 - self.config.kappa) * self.progress if eps > 0 else 1.0
        # Without weight on the natural loss, its forward only reports accuracy: no graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and kappa > 0):
            logits = model(x)
            natural = F.cross_entropy(logits, y)
        if eps == 0:
            return {"loss": natural, "logits": logits, "robust_loss": natural.detach()}
        with fp32_bounds(x):
            robust = bound_loss(self.margins(model, x.float(), y, eps))
        loss = robust if kappa == 0 else kappa * natural + (1 - kappa) * robust
        return {"loss": loss, "logits": logits, "robust_loss": robust.detach()}


class IBP(_Bounded):
    pass


class CrownIBP(_Bounded):
    def margins(self, model, x, y, eps):
        beta = self.config.beta_start + (self.config.beta_end - self.config.beta_start) * self.progress
        if beta == 0:
            return ibp_margin_bounds(model, x, y, eps).lower
        crown, ibp = crown_ibp_margin_bounds(model, x, y, eps)
        return beta * crown + (1 - beta) * ibp


class MixTrain(PGDAT):
    def __call__(self, model, x, y):
        out = super().__call__(model, x, y)
        count = max(1, round(self.config.bound_fraction * len(x)))
        pick = torch.randperm(len(x), device=x.device)[:count]
        with fp32_bounds(x):
            bound = bound_loss(ibp_margin_bounds(model, x[pick].float(), y[pick], self.full_threat.eps * self.scale).lower)
        return {**out, "loss": out["loss"] + self.config.bound_weight * bound, "robust_loss": bound.detach()}


@register_objective(IBPConfig)
def ibp(config: IBPConfig, threat: Threat) -> Objective:
    return IBP(config, threat)


@register_objective(CrownIBPConfig)
def crown_ibp(config: CrownIBPConfig, threat: Threat) -> Objective:
    return CrownIBP(config, threat)


@register_objective(MixTrainConfig)
def mixtrain(config: MixTrainConfig, threat: Threat) -> Objective:
    if (config.norm or threat.norm) != "linf":
        raise ValueError("mixtrain's bound loss certifies Linf balls; use norm: linf")
    return MixTrain(config, config.threat(threat))


class GaussianConfig(Section):
    """Gaussian noise augmentation for randomized smoothing (Cohen et al. 2019), with an optional
    stability term: `stability_weight` x KL(f(x) || f(x + noise)) (Li et al. 2019)."""

    name: Literal["gaussian"] = "gaussian"
    sigma: Number = Field(0.25, gt=0)
    stability_weight: NonNegativeFloat = 0.0


class Gaussian(Objective):
    def __init__(self, config: GaussianConfig):
        self.config = config

    def __call__(self, model, x, y):
        noisy = x + torch.randn_like(x) * self.config.sigma
        logits = model(noisy)
        loss = F.cross_entropy(logits, y)
        if self.config.stability_weight > 0:
            clean = model(x).softmax(1)
            stability = F.kl_div(F.log_softmax(logits, 1), clean, reduction="batchmean")
            loss = loss + self.config.stability_weight * stability
        return {"loss": loss, "logits": logits}


@register_objective(GaussianConfig)
def gaussian(config: GaussianConfig, threat: Threat) -> Objective:
    return Gaussian(config)
