"""Blur corruptions: defocus, glass, motion, zoom and gaussian blur.

Kernels are built from the published parameters for 32 x 32 images. For another side every tap
moves to `side / 32` times its offset and is shared linearly between the two nearest pixels on each
axis: the kernel shrinks with the image instead of vanishing once its radius drops below a pixel,
and at 32 x 32 it is exactly the published kernel.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import scipy.sparse
from scipy import ndimage

from cardkit.corrupt.registry import register_corruption, scaled

# Parameters per severity (index severity - 1), from make_cifar_c.py (Hendrycks & Dietterich 2019).
DEFOCUS = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))  # (disk radius, anti-alias sigma)
GLASS = ((0.05, 1), (0.25, 1), (0.4, 1), (0.25, 2), (0.4, 2))  # (gaussian sigma, shuffle passes)
MOTION = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))  # (radius, sigma), ImageMagick motion blur
MOTION_MAX_ANGLE = 45.0  # degrees; each image draws its angle uniformly in [-45, 45]
# zoom factors np.arange(1, stop, 0.01): float round-off gives 7, 12, 16, 21 and 26 of them
ZOOM_STOPS = (1.06, 1.11, 1.16, 1.21, 1.26)
GAUSSIAN_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)
GAUSSIAN_TRUNCATE = 4.0  # kernel radius in sigmas, as skimage.filters.gaussian


# ---- kernels ------------------------------------------------------------------------------------

def _spread(size: int, factor: float) -> np.ndarray:
    """Matrix taking a centred 1-D kernel of `size` taps to one whose taps sit at `factor` times
    their offsets, each shared linearly between its two nearest pixels."""
    half = (size - 1) // 2
    new_half = math.ceil(half * factor)
    new_size = 2 * new_half + 1
    pos = np.clip((np.arange(size) - half) * factor + new_half, 0, new_size - 1)
    lo = np.floor(pos).astype(int)
    frac = pos - lo
    matrix = np.zeros((new_size, size))
    taps = np.arange(size)
    np.add.at(matrix, (lo, taps), 1 - frac)
    np.add.at(matrix, (np.minimum(lo + 1, new_size - 1), taps), frac)
    return matrix


def _gaussian_taps(sigma: float) -> np.ndarray:
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return taps / taps.sum()


def _disk(radius: float, alias_sigma: float) -> np.ndarray:
    """The published defocus kernel: a pixelated disk smoothed by a 3-tap gaussian (anti-aliasing)."""
    half = int(radius) + 1  # room for the disk and the one pixel the smoothing adds
    grid = np.arange(-half, half + 1) ** 2
    disk = (grid[:, None] + grid[None, :] <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    smooth = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * alias_sigma ** 2))
    smooth /= smooth.sum()
    for axis in (0, 1):
        disk = ndimage.correlate1d(disk, smooth, axis=axis, mode="constant")
    return disk


# ---- filtering ----------------------------------------------------------------------------------

def _gaussian(images: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian over H and W (edge pixels repeated), `sigma` given for side 32."""
    taps = _gaussian_taps(sigma)
    taps = (_spread(len(taps), scaled(1.0, images)) @ taps).astype(np.float32)
    for axis in (1, 2):
        images = ndimage.correlate1d(images, taps, axis=axis, mode="nearest")
    return images


# ---- corruptions --------------------------------------------------------------------------------

@register_corruption("gaussian_blur")
def gaussian_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return _gaussian(images, GAUSSIAN_SIGMA[severity - 1])


@register_corruption("defocus_blur")
def defocus_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    kernel = _disk(*DEFOCUS[severity - 1])
    spread = _spread(len(kernel), scaled(1.0, images))
    kernel = (spread @ kernel @ spread.T).astype(np.float32)
    # mode "mirror" is OpenCV's default border (reflect without repeating the edge), as filter2D
    return ndimage.correlate(images, kernel[None, :, :, None], mode="mirror")


@register_corruption("glass_blur")
def glass_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma, passes = GLASS[severity - 1]
    # The published code truncates the first blur to uint8 before shuffling; the epsilon keeps
    # float32 round-off from dropping a flat region's exact level to the one below.
    shuffled = np.floor(_gaussian(images, sigma) * 255 + 1e-4) / np.float32(255)
    for _ in range(passes):
        shuffled = _shuffle(shuffled, rng)
    return _gaussian(shuffled, sigma)


def _shuffle(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One pass of the published local pixel shuffle (maximum displacement 1 at every severity;
    it cannot shrink below one pixel for smaller images).

    The published loop visits pixels (h, w) for h, w from side - 1 down to 2 and "swaps" each with
    (h + dy, w + dx), dy and dx uniform in {-1, 0}. On H x W x C arrays that tuple swap assigns
    through views, so it only copies the neighbour into (h, w) - that is how CIFAR-10-C was made,
    and it is reproduced here. Every neighbour read lies above or left of (h, w), so it is visited
    later and still holds its original value: the whole sequential pass is one gather, done at
    once for all pixels of all images.
    """
    n, side = images.shape[:2]
    inner = np.arange(2, side)
    dy, dx = rng.integers(-1, 1, size=(2, n, side - 2, side - 2))  # -1 or 0
    out = images.copy()
    out[:, 2:, 2:] = images[np.arange(n)[:, None, None], inner[:, None] + dy, inner[None, :] + dx]
    return out


@register_corruption("motion_blur")
def motion_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """ImageMagick's MotionBlurImage: a one-sided line of taps i = 0 .. 2 * ceil(radius) with
    weights exp(-i^2 / (2 sigma^2)), tap i at i pixels along the angle, rounded to a pixel.
    Radius and sigma scale with the side; the taps stay one pixel apart."""
    radius, sigma = MOTION[severity - 1]
    taps = np.arange(2 * math.ceil(scaled(radius, images)) + 1)
    weights = np.exp(-0.5 * (taps / scaled(sigma, images)) ** 2)
    weights /= weights.sum()
    angles = np.deg2rad(rng.uniform(-MOTION_MAX_ANGLE, MOTION_MAX_ANGLE, size=len(images)))
    order = np.argsort(angles)  # neighbouring angles share offsets, which _line_blur batches
    angles = angles[order, None]
    # ImageMagick rounds halves down: ceil(v - 0.5)
    dy = np.ceil(taps * np.sin(angles) - 0.5).astype(int)
    dx = np.ceil(taps * np.cos(angles) - 0.5).astype(int)
    out = np.empty_like(images)
    out[order] = _line_blur(images[order], weights, dy, dx)
    return out


def _line_blur(images: np.ndarray, weights: np.ndarray, dy: np.ndarray,
               dx: np.ndarray) -> np.ndarray:
    """out[n, h, w] = sum_t weights[t] * images[n, h + dy[n, t], w + dx[n, t]], edge pixels
    repeated beyond the border (ImageMagick's default). dx >= 0, as the angle is within 45 degrees.

    For each tap, consecutive images with the same offset form a run, added as one shifted slice;
    with images sorted by angle a tap has only a few runs. Plain numpy, single-threaded: hundreds
    of small multithreaded ops stall badly when the cores are shared.
    """
    n, side = images.shape[:2]
    pad = len(weights) - 1
    padded = np.pad(images, ((0, 0), (pad, pad), (0, pad), (0, 0)), mode="edge")
    out = np.zeros_like(images)
    term = np.empty_like(images)
    for t, weight in enumerate(weights.astype(images.dtype)):
        key = dy[:, t] * (2 * pad + 1) + dx[:, t]
        starts = np.flatnonzero(np.diff(key, prepend=key[0] - 1)).tolist()
        for start, stop in zip(starts, starts[1:] + [n]):
            top, left = pad + int(dy[start, t]), int(dx[start, t])
            shifted = padded[start:stop, top:top + side, left:left + side]
            np.multiply(shifted, weight, out=term[start:stop])
            np.add(out[start:stop], term[start:stop], out=out[start:stop])
    return out


@register_corruption("zoom_blur")
def zoom_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    n, side, _, channels = images.shape
    # The blur is linear in the pixels: one sparse (side^2 x side^2) matrix for the whole batch.
    flat = images.transpose(1, 2, 0, 3).reshape(side * side, n * channels)
    blurred = _zoom_operator(side, severity) @ flat
    return blurred.reshape(side, side, n, channels).transpose(2, 0, 1, 3)


@lru_cache(maxsize=None)
def _zoom_operator(side: int, severity: int) -> scipy.sparse.csr_matrix:
    """Mean of the image and its clipped zooms by each factor (the image itself counted twice, at
    factor 1 and as the extra term, as in the published code), as a matrix on flattened images."""
    factors = np.arange(1, ZOOM_STOPS[severity - 1], 0.01)
    total = np.eye(side * side)
    for factor in factors:
        axis = _clipped_zoom(side, factor)
        total += np.kron(axis, axis)
    return scipy.sparse.csr_matrix((total / (len(factors) + 1)).astype(np.float32))


def _clipped_zoom(side: int, factor: float) -> np.ndarray:
    """Along one axis, as a (side x side) matrix: the centre `ceil(side / factor)` pixels zoomed by
    `factor` with linear interpolation (scipy.ndimage.zoom, order 1), then the centre `side` kept."""
    crop = math.ceil(side / factor)
    top = (side - crop) // 2
    zoomed = ndimage.zoom(np.eye(side)[top:top + crop], (factor, 1), order=1)
    trim = (len(zoomed) - side) // 2
    return zoomed[trim:trim + side]
