"""Training-time augmentation for diverse CARDs: AugMix (Hendrycks et al. 2020) and Gaussian noise.

An augmentation wraps any objective, so it combines with every objective and every pruner: the
wrapped objective sees augmented inputs; with AugMix's Jensen-Shannon consistency term instead, it
sees the clean batch and the loss adds the divergence among the predictions on the clean batch and
on two AugMix views. The augmentation a model was trained with is its *domain*; a CARD-Deck gates
its cards by the spectral similarity of a test batch to each card's domain.
"""

from __future__ import annotations

from typing import Annotated, Callable, Literal, Optional, Union

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt, TypeAdapter

from cardkit.config_base import Section
from cardkit.data.augmix import AugMix, jensen_shannon
from cardkit.numbers import Number
from cardkit.objectives.registry import Objective


class AugMixConfig(Section):
    name: Literal["augmix"] = "augmix"
    width: PositiveInt = 3
    depth: int = Field(0, ge=0)  # 0: random 1..3 per chain
    severity: int = Field(3, ge=1, le=10)
    alpha: Number = Field(1.0, gt=0)
    jsd: bool = True  # add the Jensen-Shannon consistency loss
    jsd_weight: NonNegativeFloat = 12.0


class NoiseConfig(Section):
    """Additive Gaussian noise of standard deviation `sigma`, clipped to [0, 1]."""

    name: Literal["gaussian"] = "gaussian"
    sigma: Number = Field(0.1, gt=0)


class CleanConfig(Section):
    """The domain of a model trained without augmentation."""

    name: Literal["clean"] = "clean"


AUGMENT_CONFIGS = (AugMixConfig, NoiseConfig)
AugmentConfig = Annotated[Union[AUGMENT_CONFIGS], Field(discriminator="name")]
DOMAIN_CONFIGS = AUGMENT_CONFIGS + (CleanConfig,)
DomainConfig = Annotated[Union[DOMAIN_CONFIGS], Field(discriminator="name")]
CLEAN = CleanConfig().name


def domain_config(domain: dict) -> AugMixConfig | NoiseConfig | CleanConfig:
    """A recorded domain (a checkpoint's or a deck's JSON) as its validated config."""
    return TypeAdapter(DomainConfig).validate_python(domain)


def augmenter(config: AugMixConfig | NoiseConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The batch transform of an augmentation config (random numbers from torch's global RNG)."""
    if isinstance(config, AugMixConfig):
        return AugMix(width=config.width, depth=config.depth, severity=config.severity,
                      alpha=float(config.alpha))
    sigma = float(config.sigma)
    return lambda x: (x + sigma * torch.randn_like(x)).clamp_(0, 1)


class Augmented(Objective):
    def __init__(self, objective: Objective, config: AugMixConfig | NoiseConfig):
        self.objective, self.augment = objective, augmenter(config)
        self.jsd_weight = config.jsd_weight if isinstance(config, AugMixConfig) and config.jsd else None

    def set_progress(self, epoch: float) -> None:
        self.objective.set_progress(epoch)

    def __call__(self, model, x, y):
        if self.jsd_weight is None:
            return self.objective(model, self.augment(x), y)
        out = self.objective(model, x, y)
        views = model(torch.cat([self.augment(x), self.augment(x)])).chunk(2)
        consistency = jensen_shannon(out["logits"], *views)
        return {**out, "loss": out["loss"] + self.jsd_weight * consistency,
                "consistency_loss": consistency.detach()}


def with_augmentation(objective: Objective, config: Optional[AugMixConfig | NoiseConfig]) -> Objective:
    return objective if config is None else Augmented(objective, config)


def stage_domain(stage_config) -> dict:
    """The domain a training stage teaches: its augmentation, or the noise of a `gaussian`
    (randomized-smoothing) objective, else clean images."""
    if stage_config.augment is not None:
        return stage_config.augment.model_dump(mode="json")
    if stage_config.objective.name == "gaussian":
        return NoiseConfig(sigma=stage_config.objective.sigma).model_dump(mode="json")
    return {"name": CLEAN}
