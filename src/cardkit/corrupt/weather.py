"""Weather corruptions: snow, frost and fog (CIFAR-10-C), and the held-out spatter.

Parameters are the published CIFAR-10-C ones for 32 x 32 images (`make_cifar_c.py` of Hendrycks &
Dietterich, 2019); spatial ones scale with the image side. Every step is vectorised over the batch.

Frost: the reference blends each image with a random crop of one of six frost photographs, which are
not available here. The frost layer is generated instead, one per image, from the corruption's
generator, at 32 x 32 and area-resampled to the images' side (as spatter's layers): dendritic ice crystals (sparse seeds
stamped with a six-armed, side-branched star at a random rotation, ice's hexagonal habit) over a
network of thin veins (the zero contours of smooth noise at three scales), thinned out by a
low-frequency coverage map, lifted to a bright base (mean about 0.53) and tinted pale blue. The
blend weights per severity are the reference's.

Snow's ImageMagick motion blur and spatter's cv2 / skimage steps (Canny edges, distance transform,
histogram equalisation, filters) are reimplemented on numpy / scipy.ndimage.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import fft, ndimage

from cardkit.corrupt.registry import register_corruption, scaled

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as cv2's RGB2GRAY

# make_cifar_c.py: noise mean, noise std, zoom, threshold, blur radius, blur sigma, image weight
_SNOW = ((0.1, 0.2, 1.0, 0.6, 8, 3, 0.95),
         (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9),
         (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
         (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
         (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))
# make_cifar_c.py: image weight, frost weight
_FROST = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
# make_cifar_c.py: fog thickness, plasma roughness decay
_FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))
# make_cifar_c.py: noise mean, noise std, blur sigma, threshold, (liquid: strength | mud: mask
# blur sigma), mud
_SPATTER = ((0.62, 0.1, 0.7, 0.7, 0.5, False),
            (0.65, 0.1, 0.8, 0.7, 0.5, False),
            (0.65, 0.3, 1.0, 0.69, 0.5, False),
            (0.65, 0.1, 0.7, 0.69, 0.6, True),
            (0.65, 0.1, 0.5, 0.68, 0.6, True))

_CRYSTALS_PER_PIXEL = 0.01  # about ten crystals per 32 x 32 image
_CRYSTAL_ARM = 6  # pixels at 32 x 32
_FROST_TINT = np.array([0.82, 0.91, 1.0], dtype=np.float32)  # pale blue ice
_WATER = np.array([175, 238, 238], dtype=np.float32) / 255  # pale turquoise, as the reference
_MUD = np.array([63, 42, 20], dtype=np.float32) / 255  # mud brown, as the reference
_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float32)  # the reference's


def _gray(images: np.ndarray) -> np.ndarray:
    """N x H x W x 1 luminance."""
    return images if images.shape[3] == 1 else images @ _LUMA[:, None]


def _colour(rgb: np.ndarray, channels: int) -> np.ndarray:
    """An RGB colour for images with this many channels (its luminance for grayscale)."""
    return rgb if channels == 3 else np.array([rgb @ _LUMA], dtype=np.float32)


def _smooth(layers: np.ndarray, sigma: float, mode: str) -> np.ndarray:
    """Each N x H x W layer Gaussian-blurred in space only (skimage's default truncation)."""
    return ndimage.gaussian_filter(layers, (0, sigma, sigma), mode=mode)


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """N x 32 x 32 tileable smooth Gaussian noise of unit variance: white noise blurred with a
    periodic Gaussian, applied as its transfer function."""
    frequencies = fft.fftfreq(32) ** 2
    transfer = np.exp(-2 * np.pi ** 2 * sigma ** 2 * (frequencies[:, None] + frequencies[None, :]))
    transfer /= np.sqrt(np.mean(transfer ** 2))  # unit variance (Parseval)
    spectrum = fft.rfft2(rng.standard_normal((n, 32, 32), dtype=np.float32), workers=-1)
    return fft.irfft2(spectrum * transfer[:, :17].astype(np.float32), s=(32, 32), workers=-1)


def _shift_sum(layers: np.ndarray, dy: np.ndarray, dx: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """out[n, y, x] = sum_k weights[n, k] * layers[n, y + dy[n, k], x + dx[n, k]], indices wrapping;
    fractional offsets are shared bilinearly between the four nearest pixels.

    A per-image sparse kernel, applied as one batched single-precision FFT product: far cheaper than
    a gather per tap.
    """
    n, h, w = layers.shape
    first = np.arange(n)[:, None] * (h * w)
    weights = np.broadcast_to(weights, dy.shape)
    top, left = np.floor(dy), np.floor(dx)
    taps, shares = [], []
    for row, row_share in ((top, 1 - (dy - top)), (top + 1, dy - top)):
        for col, col_share in ((left, 1 - (dx - left)), (left + 1, dx - left)):
            taps.append(first + (-row % h).astype(int) * w + (-col % w).astype(int))
            shares.append(weights * row_share * col_share)
    kernel = np.bincount(np.concatenate(taps, axis=1).ravel(), np.concatenate(shares, axis=1).ravel(),
                         minlength=n * h * w).reshape(n, h, w).astype(np.float32)
    product = fft.rfft2(layers.astype(np.float32), workers=-1) * fft.rfft2(kernel, workers=-1)
    return fft.irfft2(product, s=(h, w), workers=-1)


def _motion_blur(layers: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick's one-sided motion blur of each layer along its angle (degrees), edges clamped.

    Tap i = 0 .. 2 ceil(radius) sits i pixels along the angle (rounded to the grid) with weight
    exp(-i^2 / 2 sigma^2), the weights normalised to sum to one.
    """
    steps = np.arange(2 * int(np.ceil(radius)) + 1)
    weights = np.exp(-steps ** 2 / (2 * sigma ** 2))
    radians = np.deg2rad(angles)[:, None]
    dx = np.ceil(steps * np.cos(radians) - 0.5)
    dy = np.ceil(steps * np.sin(radians) - 0.5)
    # clamped margins just wide enough that no tap wraps around
    top, bottom, left, right = (int(max(m, 0)) for m in (-dy.min(), dy.max(), -dx.min(), dx.max()))
    padded = np.pad(layers, ((0, 0), (top, bottom), (left, right)), mode="edge")
    blurred = _shift_sum(padded, dy, dx, weights / weights.sum())
    h, w = layers.shape[1:]
    return blurred[:, top:top + h, left:left + w]


def _clipped_zoom(layers: np.ndarray, factor: float) -> np.ndarray:
    """The centre of each layer zoomed by `factor` (bilinear), cropped back to its size."""
    side = layers.shape[1]
    crop = int(np.ceil(side / factor))
    top = (side - crop) // 2
    zoomed = ndimage.zoom(layers[:, top:top + crop, top:top + crop], (1, factor, factor), order=1)
    trim = (zoomed.shape[1] - side) // 2
    return zoomed[:, trim:trim + side, trim:trim + side]


@register_corruption("snow")
def snow(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    mean, std, zoom, threshold, radius, sigma, keep = _SNOW[severity - 1]
    n, side = images.shape[:2]
    flakes = _clipped_zoom(mean + std * rng.standard_normal((n, side, side), dtype=np.float32), zoom)
    flakes = np.clip(np.where(flakes < threshold, 0.0, flakes), 0, 1)
    flakes = _motion_blur(flakes, scaled(radius, images), scaled(sigma, images),
                          rng.uniform(-135, -45, n))[..., None]
    # a snowy scene is brighter and washed out: blend towards a lifted grayscale
    lifted = np.maximum(images, 1.5 * _gray(images) + 0.5)
    return keep * images + (1 - keep) * lifted + flakes + flakes[:, ::-1, ::-1]


def _ice_crystals(rng: np.random.Generator, n: int) -> np.ndarray:
    """32 x 32 dendrites grown from sparse seeds, in [0, 1): six arms (ice's hexagonal habit, one
    random rotation per image), each with two side branches at 60 degrees."""
    seeds = (rng.random((n, 32, 32)) < _CRYSTALS_PER_PIXEL) * rng.uniform(0.5, 1.0, (n, 32, 32))
    stem = np.linspace(0, _CRYSTAL_ARM, 2 * _CRYSTAL_ARM + 1)  # half-pixel steps: unbroken lines
    twig = stem[1:len(stem) // 3 + 1]
    arms = rng.uniform(0, np.pi / 3, n)[:, None] + np.arange(6) * np.pi / 3
    fork = 0.5 * _CRYSTAL_ARM * np.exp(1j * arms)  # where the side branches leave each arm
    points = np.concatenate([
        (stem * np.exp(1j * arms)[..., None]).reshape(n, -1),
        (fork[..., None] + twig * np.exp(1j * (arms + np.pi / 3))[..., None]).reshape(n, -1),
        (fork[..., None] + twig * np.exp(1j * (arms - np.pi / 3))[..., None]).reshape(n, -1)], axis=1)
    reach = np.concatenate([np.tile(stem, 6), np.tile(0.5 * _CRYSTAL_ARM + twig, 12)])
    weights = np.exp(-reach / _CRYSTAL_ARM)  # growth thins towards the tips
    return 1 - np.exp(-_shift_sum(seeds, points.imag, points.real, weights))


def _ice_veins(rng: np.random.Generator, n: int) -> np.ndarray:
    """32 x 32 thin branching lines in [0, 1]: zero contours of smooth noise at three scales."""
    veins = np.zeros((n, 32, 32))
    for strength, sigma in ((1.0, 6.0), (0.7, 3.0), (0.5, 1.5)):  # the coarse cracks are brightest
        veins = np.maximum(veins, strength * np.exp(-(_smooth_noise(rng, n, sigma) / 0.15) ** 2))
    return veins


def _to_side(layers: np.ndarray, side: int) -> np.ndarray:
    """N x 32 x 32 layers area-resampled to N x side x side x 1: drawing a layer at the reference
    size and resampling it gives every image side the same pattern and strength."""
    layers = torch.from_numpy(np.ascontiguousarray(layers, dtype=np.float32))[:, None]
    return F.interpolate(layers, size=(side, side), mode="area")[:, 0, ..., None].numpy()


def _frost_layer(rng: np.random.Generator, images: np.ndarray) -> np.ndarray:
    """A frost texture in [0, 1] for each image, shaped like the images."""
    n, side, _, channels = images.shape
    coverage = 1 / (1 + np.exp(-3 * _smooth_noise(rng, n, 6.0)))
    ice = np.maximum(_ice_crystals(rng, n), 0.6 * _ice_veins(rng, n))
    frost = np.clip(0.45 + 0.55 * (0.4 + 0.6 * coverage) * ice, 0, 1)
    return _to_side(frost, side) * _colour(_FROST_TINT, channels)


@register_corruption("frost")
def frost(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    keep, weight = _FROST[severity - 1]
    return keep * images + weight * _frost_layer(rng, images)


def _plasma(rng: np.random.Generator, n: int, size: int, decay: float) -> np.ndarray:
    """N diamond-square height maps, size x size (a power of two), tileable, scaled to [0, 1].

    Each level halves the step and shrinks the random displacement by decay^2 (the reference
    draws wibble * U(-wibble, wibble) with wibble divided by `decay` per level).
    """
    grid = np.zeros((n, size, size))
    step, amplitude = size, 1.0
    while step >= 2:
        half = step // 2
        corners = grid[:, ::step, ::step]
        around = corners + np.roll(corners, -1, axis=1)
        around += np.roll(around, -1, axis=2)
        grid[:, half::step, half::step] = around / 4 + rng.uniform(-amplitude, amplitude, around.shape)
        centres = grid[:, half::step, half::step]
        # edge midpoints: the two corners of their edge and the two centres beside it
        across = corners + np.roll(corners, -1, axis=2) + centres + np.roll(centres, 1, axis=1)
        grid[:, ::step, half::step] = across / 4 + rng.uniform(-amplitude, amplitude, around.shape)
        down = corners + np.roll(corners, -1, axis=1) + centres + np.roll(centres, 1, axis=2)
        grid[:, half::step, ::step] = down / 4 + rng.uniform(-amplitude, amplitude, around.shape)
        step, amplitude = half, amplitude / decay ** 2
    grid -= grid.min(axis=(1, 2), keepdims=True)
    return grid / grid.max(axis=(1, 2), keepdims=True)


@register_corruption("fog")
def fog(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    thickness, decay = _FOG[severity - 1]
    n, side = images.shape[:2]
    # the reference's 32 x 32 map for 32 x 32 images; the smallest power of two covering others
    haze = _plasma(rng, n, 1 << (side - 1).bit_length(), decay)[:, :side, :side, None]
    peak = images.max(axis=(1, 2, 3), keepdims=True)
    return (images + thickness * haze) * peak / (peak + thickness)


def _sobel(layers: np.ndarray, axis: int) -> np.ndarray:
    """3 x 3 Sobel derivative along a spatial axis (ndimage.sobel would also smooth across images)."""
    across = 3 - axis
    smoothed = ndimage.correlate1d(layers, [1, 2, 1], axis=across, mode="nearest")
    return ndimage.correlate1d(smoothed, [-1, 0, 1], axis=axis, mode="nearest")


def _canny(layers: np.ndarray, low: float, high: float) -> np.ndarray:
    """cv2.Canny's edges of N x H x W uint8-valued layers: 3 x 3 Sobel, L1 magnitude, non-maximum
    suppression across the gradient (four directions), hysteresis with 8-connectivity."""
    gx, gy = _sobel(layers, axis=2), _sobel(layers, axis=1)
    magnitude = np.abs(gx) + np.abs(gy)
    image, row, col = np.nonzero(magnitude > low)  # only these can be edges
    ax, ay, m = np.abs(gx[image, row, col]), np.abs(gy[image, row, col]), magnitude[image, row, col]
    horizontal = ay < np.tan(np.deg2rad(22.5)) * ax
    vertical = ay > np.tan(np.deg2rad(67.5)) * ax
    # (dy, dx): the next pixel across the gradient; rows grow downwards
    dy = np.where(horizontal, 0, 1)
    same_sign = gx[image, row, col] * gy[image, row, col] > 0
    dx = np.where(vertical, 0, np.where(horizontal | same_sign, 1, -1))
    padded = np.pad(magnitude, ((0, 0), (1, 1), (1, 1)))
    before = padded[image, row + 1 - dy, col + 1 - dx]
    after = padded[image, row + 1 + dy, col + 1 + dx]
    peak = (m > before) & np.where(horizontal | vertical, m >= after, m > after)
    weak = np.zeros(layers.shape, dtype=bool)
    weak[image[peak], row[peak], col[peak]] = True
    strong = np.zeros(layers.shape, dtype=bool)
    strong[image[peak], row[peak], col[peak]] = m[peak] > high
    within_image = np.zeros((3, 3, 3), dtype=bool)
    within_image[1] = True
    labels, count = ndimage.label(weak, structure=within_image)
    kept = np.bincount(labels.ravel(), weights=strong.ravel(), minlength=count + 1) > 0
    kept[0] = False
    return kept[labels]


def _equalize(layers: np.ndarray) -> np.ndarray:
    """cv2.equalizeHist of each N x H x W uint8-valued layer."""
    n = len(layers)
    values = layers.reshape(n, -1).astype(np.int64)
    counts = np.bincount((values + 256 * np.arange(n)[:, None]).ravel(), minlength=256 * n)
    cdf = counts.reshape(n, 256).cumsum(axis=1)
    first = cdf[np.arange(n), values.min(axis=1)][:, None]
    spread = np.maximum(values.shape[1] - first, 1)
    lut = np.rint((cdf - first) * 255 / spread)
    lut = np.where(values.shape[1] == first, np.arange(256), lut)  # a constant layer stays put
    return np.take_along_axis(lut, values, axis=1).reshape(layers.shape)


def _ripples(wet: np.ndarray, cap: float) -> np.ndarray:
    """The reference's liquid shading: embossed, equalised distance to the puddles' edges."""
    edges = _canny(np.floor(wet * 255), 50, 150)
    distance = np.full(wet.shape, cap, dtype=np.float32)
    for i in np.flatnonzero(edges.any(axis=(1, 2))):  # per image: 4x faster than one 3-D transform
        distance[i] = ndimage.distance_transform_edt(~edges[i])
    distance = np.floor(ndimage.uniform_filter(np.minimum(distance, cap), (1, 3, 3), mode="mirror"))
    embossed = ndimage.correlate(_equalize(distance), _EMBOSS[None], mode="mirror")
    return ndimage.uniform_filter(np.clip(np.rint(embossed), 0, 255), (1, 3, 3), mode="mirror")


@register_corruption("spatter")
def spatter(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    mean, std, sigma, threshold, strength, mud = _SPATTER[severity - 1]
    n, side, _, channels = images.shape
    # drawn at 32 x 32, where the reference's pixel-sized filters and thresholds apply
    noise = mean + std * rng.standard_normal((n, 32, 32), dtype=np.float32)
    wet = _smooth(noise, sigma, "nearest")
    wet = np.where(wet < threshold, 0.0, wet)
    if mud:
        mask = _smooth((wet > threshold).astype(np.float32), strength, "nearest")
        mask = _to_side(np.where(mask < 0.8, 0.0, mask), side)
        return images * (1 - mask) + mask * _colour(_MUD, channels)
    water = wet * _ripples(wet, 20)
    water /= np.maximum(water.max(axis=(1, 2), keepdims=True), 1e-12)
    return images + strength * _to_side(water, side) * _colour(_WATER, channels)
