"""Natural training, PGD adversarial training (Madry et al. 2018) and TRADES (Zhang et al. 2019)."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from cardkit.attacks import Threat, pgd
from cardkit.config_base import Section
from cardkit.numbers import Number
from cardkit.objectives.registry import register_objective


class NaturalConfig(Section):
    name: Literal["natural"] = "natural"


class _AttackedConfig(Section):
    """Shared by objectives that train on PGD inputs; eps and norm default to the run's threat."""

    eps: Optional[Number] = Field(None, ge=0)
    norm: Optional[Literal["linf", "l2"]] = None
    steps: PositiveInt = 10
    step_size: Optional[Number] = Field(None, gt=0)
    random_start: bool = True

    def threat(self, run_threat: Threat) -> Threat:
        return Threat(norm=self.norm or run_threat.norm,
                      eps=run_threat.eps if self.eps is None else self.eps)


class PGDATConfig(_AttackedConfig):
    name: Literal["pgd_at"] = "pgd_at"


class TradesConfig(_AttackedConfig):
    name: Literal["trades"] = "trades"
    beta: Number = Field(6.0, ge=0)


@register_objective(NaturalConfig)
def natural(config: NaturalConfig, threat: Threat):
    def objective(model, x, y):
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    return objective


@register_objective(PGDATConfig)
def pgd_at(config: PGDATConfig, threat: Threat):
    threat = config.threat(threat)

    def objective(model, x, y):
        x_adv = pgd(model, x, y, threat, steps=config.steps, step_size=config.step_size,
                    random_start=config.random_start)
        logits = model(x_adv)
        return {"loss": F.cross_entropy(logits, y), "logits": logits, "x_adv": x_adv}

    return objective


@register_objective(TradesConfig)
def trades(config: TradesConfig, threat: Threat):
    """Cross-entropy on clean inputs plus beta x KL(clean || adversarial).

    The adversary maximises the KL divergence from the clean prediction, starting from a small
    Gaussian perturbation as in the paper (a uniform start in the ball when random_start is set).
    """
    threat = config.threat(threat)

    def objective(model, x, y):
        logits = model(x)
        clean_probs = logits.detach().softmax(1)
        x_adv = pgd(model, x, clean_probs, threat, steps=config.steps,
                    step_size=config.step_size, random_start=config.random_start, loss_fn=_kl)
        kl = _kl(model(x_adv), logits.softmax(1)).mean()
        loss = F.cross_entropy(logits, y) + config.beta * kl
        return {"loss": loss, "logits": logits, "x_adv": x_adv, "robust_loss": kl.detach()}

    return objective


def _kl(adv_logits: torch.Tensor, clean_probs: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(clean || adversarial)."""
    log_adv = F.log_softmax(adv_logits, dim=1)
    return F.kl_div(log_adv, clean_probs, reduction="none").sum(1)
