"""Natural training, PGD adversarial training (Madry et al. 2018) and TRADES (Zhang et al. 2019)."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveInt

from cardkit.attacks import Threat, default_step_size, pgd
from cardkit.config_base import Section
from cardkit.numbers import Number
from cardkit.objectives.registry import Objective, register_objective


class NaturalConfig(Section):
    """Cross-entropy on clean inputs."""

    name: Literal["natural"] = "natural"


class _AttackedConfig(Section):
    """Shared by objectives that train on PGD inputs; eps and norm default to the run's threat."""

    eps: Optional[Number] = Field(None, ge=0)
    norm: Optional[Literal["linf", "l2"]] = None
    steps: PositiveInt = 10
    step_size: Optional[Number] = Field(None, gt=0)  # default 2.5 eps / steps
    random_start: bool = True
    eps_warmup_epochs: NonNegativeFloat = 0.0  # eps grows linearly from 0 over these epochs

    def threat(self, run_threat: Threat) -> Threat:
        return Threat(norm=self.norm or run_threat.norm,
                      eps=run_threat.eps if self.eps is None else self.eps)


class PGDATConfig(_AttackedConfig):
    """loss = clean_weight x CE(x) + adversarial_weight x CE(x_adv); the default is Madry's pure
    adversarial loss, ATMC's paper mixes both terms."""

    name: Literal["pgd_at"] = "pgd_at"
    clean_weight: NonNegativeFloat = 0.0
    adversarial_weight: NonNegativeFloat = 1.0


class TradesConfig(_AttackedConfig):
    """TRADES (Zhang et al. 2019): CE(x) + beta x KL(f(x) || f(x_adv)), x_adv maximising the KL."""

    name: Literal["trades"] = "trades"
    beta: Number = Field(6.0, ge=0)


class Natural(Objective):
    def __call__(self, model, x, y):
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}


class _Attacked(Objective):
    """Holds the attack of an adversarial objective and its eps ramp-up.

    Small networks trained at the full eps from the first step can stall at chance level; a linear
    ramp of eps (and of the step size with it) over the first epochs avoids that.
    """

    def __init__(self, config: _AttackedConfig, threat: Threat):
        self.config = config
        self.full_threat = threat
        self.full_step_size = config.step_size or default_step_size(threat.eps, config.steps)
        self.scale = 1.0 if config.eps_warmup_epochs == 0 else 0.0

    def set_progress(self, epoch: float) -> None:
        warmup = self.config.eps_warmup_epochs
        self.scale = 1.0 if warmup == 0 else min(1.0, epoch / warmup)

    def attack(self, model, x, target, loss_fn=None) -> torch.Tensor:
        threat = Threat(self.full_threat.norm, self.full_threat.eps * self.scale)
        return pgd(model, x, target, threat, steps=self.config.steps, loss_fn=loss_fn,
                   step_size=max(self.full_step_size * self.scale, 1e-12),
                   random_start=self.config.random_start)


class PGDAT(_Attacked):
    def __call__(self, model, x, y):
        x_adv = self.attack(model, x, y)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        if self.config.adversarial_weight != 1.0:
            loss = self.config.adversarial_weight * loss
        if self.config.clean_weight:
            loss = loss + self.config.clean_weight * F.cross_entropy(model(x), y)
        return {"loss": loss, "logits": logits, "x_adv": x_adv}


class Trades(_Attacked):
    """Cross-entropy on clean inputs plus beta x KL(clean || adversarial).

    The adversary maximises the KL divergence from the clean prediction (a uniform random start in
    the ball replaces the paper's small Gaussian one when random_start is set).
    """

    def __call__(self, model, x, y):
        logits = model(x)
        x_adv = self.attack(model, x, logits.detach().softmax(1), loss_fn=_kl)
        kl = _kl(model(x_adv), logits.softmax(1)).mean()
        loss = F.cross_entropy(logits, y) + self.config.beta * kl
        return {"loss": loss, "logits": logits, "x_adv": x_adv, "robust_loss": kl.detach()}


def _kl(adv_logits: torch.Tensor, clean_probs: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(clean || adversarial)."""
    log_adv = F.log_softmax(adv_logits, dim=1)
    return F.kl_div(log_adv, clean_probs, reduction="none").sum(1)


@register_objective(NaturalConfig)
def natural(config: NaturalConfig, threat: Threat) -> Objective:
    return Natural()


@register_objective(PGDATConfig)
def pgd_at(config: PGDATConfig, threat: Threat) -> Objective:
    return PGDAT(config, config.threat(threat))


@register_objective(TradesConfig)
def trades(config: TradesConfig, threat: Threat) -> Objective:
    return Trades(config, config.threat(threat))
