"""Digital corruptions: brightness, contrast, elastic transform, pixelate and JPEG compression
(CIFAR-10-C), and the held-out saturate.

Parameters are the published CIFAR-10-C ones for 32 x 32 images (`make_cifar_c.py` of Hendrycks &
Dietterich, 2019); spatial ones scale with the image side. Brightness and saturate act in HSV space.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from cardkit.corrupt.registry import register_corruption, scaled

# make_cifar_c.py: added to the HSV value
_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
# make_cifar_c.py: HSV saturation factor, then offset
_SATURATE = ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))
# make_cifar_c.py: factor on the deviation from each channel's mean
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
# make_cifar_c.py (its fractions of the side times 32), in pixels: displacement scale, its smoothing
# sigma, affine jitter
_ELASTIC = ((0.0, 0.0, 2.56), (1.6, 6.4, 2.24), (2.56, 1.92, 1.92), (3.2, 1.28, 1.6), (3.2, 0.96, 0.96))
# make_cifar_c.py: side of the down-sampled image, as a fraction of the side
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
# make_cifar_c.py: JPEG quality
_JPEG_QUALITY = (80, 65, 58, 50, 40)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """... x 3 RGB in [0, 1] to HSV, each in [0, 1] (hue in turns, 0 where undefined)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = np.maximum(np.maximum(r, g), b)
    chroma = value - np.minimum(np.minimum(r, g), b)
    safe = np.where(chroma > 0, chroma, 1)  # gray: every branch below gives hue 0
    sector = np.where(value == r, (g - b) / safe,
                      np.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    saturation = chroma / np.where(value > 0, value, 1)
    return np.stack([sector / 6 % 1, saturation, value], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """The inverse of `rgb_to_hsv`: channel = V (1 - S clip(min(k, 4 - k), 0, 1)),
    k = (n + 6 H) mod 6 with n = 5, 3, 1 for red, green, blue."""
    hue, saturation, value = (hsv[..., i, None] for i in range(3))
    k = (np.array([5, 3, 1], dtype=hsv.dtype) + 6 * hue) % 6
    return value * (1 - saturation * np.clip(np.minimum(k, 4 - k), 0, 1))


def _map_saturation(images: np.ndarray, factor: float, offset: float) -> np.ndarray:
    hsv = rgb_to_hsv(images)
    hsv[..., 1] = np.clip(hsv[..., 1] * factor + offset, 0, 1)
    return hsv_to_rgb(hsv)


@register_corruption("brightness")
def brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    lift = _BRIGHTNESS[severity - 1]
    if images.shape[3] == 1:  # a gray pixel's HSV value is the pixel itself
        return np.clip(images + lift, 0, 1)
    hsv = rgb_to_hsv(images)
    hsv[..., 2] = np.clip(hsv[..., 2] + lift, 0, 1)
    return hsv_to_rgb(hsv)


@register_corruption("saturate")
def saturate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor, offset = _SATURATE[severity - 1]
    if images.shape[3] == 3:
        return _map_saturation(images, factor, offset)
    # Gray pixels have no saturation, so the HSV map would be the identity. In RGB, scaling the
    # saturation scales each channel's shortfall below the pixel's value V, (V - c) / V being its
    # saturation share. The grayscale counterpart used here: each pixel's shortfall below the
    # image's brightest pixel, as a share of it, is mapped like a saturation. Severities 1-2
    # therefore wash the image out towards its peak and 3-5 deepen its shadows, as they do colours.
    peak = images.max(axis=(1, 2, 3), keepdims=True)
    share = 1 - images / np.maximum(peak, 1e-12)
    return peak * (1 - np.clip(share * factor + offset, 0, 1))


@register_corruption("contrast")
def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = _CONTRAST[severity - 1]
    means = images.mean(axis=(1, 2), keepdims=True)
    return (images - means) * factor + means


def _field_gain(sigma: float) -> float:
    """The standard deviation of unit white noise after `_smooth_field`'s 2-D Gaussian blur."""
    if sigma == 0:
        return 1.0
    taps = np.arange(-int(3 * sigma + 0.5), int(3 * sigma + 0.5) + 1)
    weights = np.exp(-taps ** 2 / (2 * sigma ** 2))
    return float(np.sum((weights / weights.sum()) ** 2))  # the 2-D kernel's norm: the 1-D one's squared


def _smooth_field(noise: np.ndarray, sigma: float, images: np.ndarray) -> np.ndarray:
    """Zero-mean N x H x W white noise blurred (reflected, truncated at 3 sigma, as the reference)
    with `sigma`, given for 32 x 32, scaled to the images.

    A narrower blur averages fewer pixels and leaves a rougher, larger field; the result is rescaled
    to vary as much per pixel as the 32 x 32 reference's, so displacements keep their strength
    relative to the image at every side.
    """
    side_sigma = scaled(sigma, images)
    blurred = ndimage.gaussian_filter(noise, (0, side_sigma, side_sigma), mode="reflect", truncate=3)
    return _field_gain(sigma) / _field_gain(side_sigma) * blurred


def _sample(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mirror_edge: bool
            ) -> torch.Tensor:
    """Bilinear samples of N x C x H x W images at pixel coordinates (N x H x W), reflected outside:
    about the edge pixels' centres when `mirror_edge` (cv2's BORDER_REFLECT_101), else about the
    image's border (scipy's 'reflect')."""
    h, w = images.shape[2:]
    if mirror_edge:
        grid = torch.stack([2 * cols / (w - 1) - 1, 2 * rows / (h - 1) - 1], dim=-1)
    else:
        grid = torch.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=mirror_edge)


def _affine_sources(rng: np.random.Generator, n: int, side: int, jitter: float) -> np.ndarray:
    """N x 2 x 3 maps from output (x, y, 1) to source (x, y): three anchor points around the centre
    jittered uniformly by up to `jitter` pixels, the image warped so that each anchor lands on its
    jittered copy."""
    centre, spread = side // 2, side // 3
    anchors = np.array([[centre + spread] * 2, [centre + spread, centre - spread],
                        [centre - spread] * 2], dtype=float)
    moved = anchors + rng.uniform(-jitter, jitter, (n, 3, 2))
    homogeneous = np.concatenate([moved, np.ones((n, 3, 1))], axis=2)
    return np.linalg.solve(homogeneous, np.broadcast_to(anchors, (n, 3, 2))).transpose(0, 2, 1)


@register_corruption("elastic_transform")
def elastic_transform(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    alpha, sigma, jitter = _ELASTIC[severity - 1]
    n, side = images.shape[:2]
    pixels = torch.arange(side, dtype=torch.float32)
    rows, cols = pixels[:, None].expand(side, side), pixels[None, :].expand(side, side)
    # a random affine warp, then a smooth random displacement field, as two resamplings
    affine = torch.from_numpy(_affine_sources(rng, n, side, scaled(jitter, images))).float()
    src_cols, src_rows = (m[:, 0, None, None] * cols + m[:, 1, None, None] * rows + m[:, 2, None, None]
                          for m in affine.unbind(1))
    batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    warped = _sample(batch, src_rows, src_cols, mirror_edge=True)
    shift_rows, shift_cols = (
        torch.from_numpy(scaled(alpha, images) * _smooth_field(
            rng.uniform(-1, 1, (n, side, side)).astype(np.float32), sigma, images))
        for _ in range(2))
    out = _sample(warped, rows + shift_rows, cols + shift_cols, mirror_edge=False)
    return out.numpy().transpose(0, 2, 3, 1)


def _box_weights(source: int, target: int) -> np.ndarray:
    """target x source resampling matrix of Pillow's BOX filter: output pixel i averages the input
    pixels whose centres lie within the span of i (the nearest input pixel when up-sampling)."""
    scale = source / target
    support = 0.5 * max(scale, 1.0)
    centres = (np.arange(target) + 0.5) * scale
    offsets = (np.arange(source)[None, :] + 0.5 - centres[:, None]) / max(scale, 1.0)
    reach = (np.arange(source)[None, :] >= np.floor(centres - support + 0.5)[:, None]) & \
            (np.arange(source)[None, :] < np.floor(centres + support + 0.5)[:, None])
    weights = ((offsets > -0.5) & (offsets <= 0.5) & reach).astype(float)
    return weights / weights.sum(axis=1, keepdims=True)


def _resize_box(images: np.ndarray, side: int) -> np.ndarray:
    """Pillow's BOX resize of N x H x W x C images (0-255 levels) to side x side: the horizontal then
    the vertical pass, each rounded half up to 8 bits as Pillow stores it."""
    weights = _box_weights(images.shape[1], side)
    planes = images.transpose(0, 3, 1, 2)
    wide = np.floor(planes @ weights.T + 0.5)
    return np.floor(weights @ wide + 0.5).transpose(0, 2, 3, 1)


@register_corruption("pixelate")
def pixelate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    side = images.shape[1]
    levels = np.rint(images * 255)
    small = _resize_box(levels, int(side * _PIXELATE[severity - 1]))
    return _resize_box(small, side) / 255


@register_corruption("jpeg_compression")
def jpeg_compression(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = _JPEG_QUALITY[severity - 1]
    levels = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
    out = np.empty(images.shape, dtype=np.float32)
    for i, image in enumerate(levels):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(
            buffer, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buffer)).reshape(image.shape)
    return out / 255
