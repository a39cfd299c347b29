"""Noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper) and speckle.

Every pixel value (each channel of each pixel) draws its own noise, as in the published code; the
noise is not spatial, so nothing scales with the image side.
"""

from __future__ import annotations

import numpy as np

from cardkit.corrupt.registry import register_corruption

# Parameters per severity (index severity - 1), from make_cifar_c.py (Hendrycks & Dietterich 2019).
GAUSSIAN_STD = (0.04, 0.06, 0.08, 0.09, 0.10)
SHOT_PHOTONS = (500, 250, 100, 75, 50)  # photons at full intensity: fewer is noisier
IMPULSE_AMOUNT = (0.01, 0.02, 0.03, 0.05, 0.07)  # fraction of values replaced by 0 or 1
SPECKLE_STD = (0.06, 0.10, 0.12, 0.16, 0.20)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


@register_corruption("gaussian_noise")
def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return images + _normal(rng, images.shape, GAUSSIAN_STD[severity - 1])


@register_corruption("shot_noise")
def shot_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    photons = SHOT_PHOTONS[severity - 1]
    return (rng.poisson(images * photons) / photons).astype(np.float32)


@register_corruption("impulse_noise")
def impulse_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    # One uniform draw per value decides both whether it flips and to which end, with salt and
    # pepper equally likely (the published code's salt_vs_pepper=0.5).
    amount = IMPULSE_AMOUNT[severity - 1]
    u = rng.random(images.shape, dtype=np.float32)
    return np.where(u < amount, (u < amount / 2).astype(np.float32), images)


@register_corruption("speckle_noise")
def speckle_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return images + images * _normal(rng, images.shape, SPECKLE_STD[severity - 1])
