"""Noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper) and speckle.

Every pixel value (each channel of each pixel) draws its own noise, as in the published code; the
noise is not spatial, so nothing scales with the image side.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.stats

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
    """Poisson(photons * value) / photons, drawn from alias tables: the registry's images lie on
    the 1/255 grid, so the rate takes one of 256 values and each draw costs O(1)."""
    photons = SHOT_PHOTONS[severity - 1]
    keep, alias, size = _poisson_alias(photons)
    u = rng.random(images.shape) * size
    column = u.astype(np.intp)
    cell = np.rint(images * 255).astype(np.intp) * size + column
    counts = np.where(u - column < keep[cell], column, alias[cell])
    return counts.astype(np.float32) / np.float32(photons)


@lru_cache(maxsize=None)
def _poisson_alias(photons: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Walker alias tables (Vose's construction) of Poisson(level / 255 * photons) for the 256
    levels, flattened level-major: column j of a level is kept with probability keep, else
    replaced by its alias."""
    size = int(photons + 12 * np.sqrt(photons) + 20)  # the tail beyond has probability < 1e-28
    pmf = scipy.stats.poisson.pmf(np.arange(size), np.arange(256)[:, None] / 255 * photons)
    scaled_pmf = pmf / pmf.sum(axis=1, keepdims=True) * size
    keep = np.ones_like(scaled_pmf)
    alias = np.tile(np.arange(size), (256, 1))
    for level, row in enumerate(scaled_pmf):
        small, large = list(np.flatnonzero(row < 1)), list(np.flatnonzero(row >= 1))
        while small and large:
            short, tall = small.pop(), large[-1]
            keep[level, short], alias[level, short] = row[short], tall
            row[tall] -= 1 - row[short]
            if row[tall] < 1:
                small.append(large.pop())
    return keep.ravel(), alias.ravel(), size


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
