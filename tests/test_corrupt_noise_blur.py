"""Properties of the noise and blur corruptions on CIFAR-, MNIST- and sklearn-digits-sized images."""

from functools import lru_cache

import numpy as np
import pytest

from cardkit.corrupt import corrupt

RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur")
DETERMINISTIC = ("defocus_blur", "zoom_blur", "gaussian_blur")
NAMES = RANDOM + DETERMINISTIC
SHAPES = {32: 3, 28: 1, 8: 1}  # side -> channels: CIFAR RGB, MNIST and sklearn digits grayscale

# Severities the published table does not make stronger than the one before: motion blur 3 -> 4
# only lengthens the kernel past weights that vanish at sigma 2 (the random angles still differ);
# glass blur 1 -> 2 -> 3 and 4 -> 5 only raise the blur sigma, which smooths the shuffled pixels
# back towards the clean image (its strength comes from the number of shuffle passes). There the
# distance to the clean image may drop, a little.
PLATEAUS = {("motion_blur", 4), ("glass_blur", 2), ("glass_blur", 3), ("glass_blur", 5)}


@lru_cache(maxsize=None)
def images(side: int, n: int = 24) -> np.ndarray:
    """Smooth oriented waves plus a little noise, as uint8 N x side x side x C."""
    channels = SHAPES[side]
    rng = np.random.default_rng(side)
    t = np.linspace(0, 1, side)
    yy, xx = (g[..., None] for g in np.meshgrid(t, t, indexing="ij"))
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1, channels))
    freq = rng.uniform(1, 4, (n, 1, 1, channels))
    waves = 0.5 + 0.4 * np.sin(np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    waves += rng.normal(0, 0.01, waves.shape)
    return np.clip(np.rint(waves * 255), 0, 255).astype(np.uint8)


def distance(name: str, severity: int, side: int) -> float:
    clean = images(side)
    return float(np.abs(corrupt(clean, name, severity, seed=0).astype(np.float64) - clean).mean())


@pytest.mark.parametrize("side", sorted(SHAPES))
@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_seeding(name, severity, side):
    clean = images(side)
    out = corrupt(clean, name, severity, seed=0)
    assert out.shape == clean.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, corrupt(clean, name, severity, seed=0))
    other = corrupt(clean, name, severity, seed=1)
    if name in DETERMINISTIC:
        np.testing.assert_array_equal(out, other)
    elif not np.array_equal(out, clean):  # a kernel can shrink below a pixel on 8 x 8 images
        assert not np.array_equal(out, other)


@pytest.mark.parametrize("side", sorted(SHAPES))
@pytest.mark.parametrize("name", NAMES)
def test_strength_rises_with_severity(name, side):
    d = [distance(name, severity, side) for severity in range(1, 6)]
    assert d[4] > d[0], d
    for severity in range(2, 6):
        floor = 0.9 * d[severity - 2] if (name, severity) in PLATEAUS else d[severity - 2]
        assert d[severity - 1] >= floor, (severity, d)


def test_gaussian_noise_has_the_published_spread():
    flat = np.full((50, 32, 32, 3), 128, np.uint8)
    for severity, std in enumerate((0.04, 0.06, 0.08, 0.09, 0.10), start=1):
        noise = corrupt(flat, "gaussian_noise", severity, seed=0).astype(np.float64) - 128
        assert abs(noise.std() / 255 - std) < 0.002


def test_shot_noise_is_poisson_with_the_published_photon_counts():
    flat = np.full((50, 32, 32, 3), 128, np.uint8)
    for severity, photons in enumerate((500, 250, 100, 75, 50), start=1):
        counts = corrupt(flat, "shot_noise", severity, seed=0) / 255 * photons
        rate = 128 / 255 * photons  # a Poisson count's mean and variance
        assert abs(counts.mean() - rate) < 0.02 * rate
        assert abs(counts.var() - rate) < 0.05 * rate


def test_impulse_noise_flips_the_published_fraction_to_black_or_white():
    flat = np.full((50, 32, 32, 3), 128, np.uint8)
    for severity, amount in enumerate((0.01, 0.02, 0.03, 0.05, 0.07), start=1):
        out = corrupt(flat, "impulse_noise", severity, seed=0)
        assert set(np.unique(out)) <= {0, 128, 255}
        assert abs((out != 128).mean() - amount) < 0.003
        assert abs((out == 0).mean() - (out == 255).mean()) < 0.003


def test_blurs_keep_a_flat_image():
    flat = np.full((4, 32, 32, 3), 77, np.uint8)
    for name in ("defocus_blur", "motion_blur", "zoom_blur", "gaussian_blur", "glass_blur"):
        np.testing.assert_array_equal(corrupt(flat, name, 5, seed=0), flat)
