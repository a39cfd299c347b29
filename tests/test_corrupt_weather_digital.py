"""Weather and digital corruptions: shapes, determinism, strength against severity, and the helpers
that stand in for the reference's cv2 / ImageMagick / skimage calls."""

import colorsys

import numpy as np
import pytest
from PIL import Image

from cardkit.corrupt import corrupt
from cardkit.corrupt import digital, weather

NAMES = ("snow", "frost", "fog", "spatter", "brightness", "contrast", "elastic_transform", "pixelate",
         "jpeg_compression", "saturate")
DETERMINISTIC = ("brightness", "contrast", "pixelate", "jpeg_compression", "saturate")
SIDES = ((32, 3), (28, 1), (8, 1))

# Reference tables whose strength, measured as the mean absolute change, is not monotone in severity
# by design (make_cifar_c.py): these are checked for monotonicity within each run of severities.
RUNS = {
    "saturate": ((1, 2), (3, 4, 5)),  # saturation x0.3, x0.1, then x1.5, x2 + 0.1, x2.5 + 0.2
    "spatter": ((1, 2, 3), (4, 5)),  # liquid splashes, then opaque mud
}


def _images(side: int, channels: int, n: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth gradients of random contrast and direction, plus a little noise, as uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / (side - 1)
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1))
    ramp = (np.cos(angle) * x[..., None] + np.sin(angle) * y[..., None] + 1) / 2
    tint = rng.uniform(0.3, 1.0, (n, 1, 1, channels))
    images = 0.1 + 0.8 * ramp * tint + rng.normal(0, 0.04, (n, side, side, channels))
    return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)


def _mad(name: str, images: np.ndarray, severity: int) -> float:
    return float(np.abs(corrupt(images, name, severity, seed=3).astype(float) - images).mean())


@pytest.mark.parametrize("side,channels", SIDES)
@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_determinism(name, severity, side, channels):
    images = _images(side, channels, n=4)
    out = corrupt(images, name, severity, seed=7)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert np.array_equal(out, corrupt(images, name, severity, seed=7))
    assert not np.array_equal(out, images)
    if name not in DETERMINISTIC:
        assert not np.array_equal(out, corrupt(images, name, severity, seed=8))


@pytest.mark.parametrize("side,channels", SIDES)
@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("frost", "elastic_transform")])
def test_change_rises_with_severity(name, side, channels):
    images = _images(side, channels)
    mad = {s: _mad(name, images, s) for s in range(1, 6)}
    for run in RUNS.get(name, ((1, 2, 3, 4, 5),)):
        changes = [mad[s] for s in run]
        assert all(b >= a for a, b in zip(changes, changes[1:])), (run, changes)
        assert changes[-1] > changes[0], (run, changes)


@pytest.mark.parametrize("side,channels", SIDES)
def test_frost_hides_more_of_the_image_with_severity(side, channels):
    """The reference lowers the image's weight as it raises the frost's (1 + 0.2 ... 0.75 + 0.45), so
    the mean absolute change is not monotone on mid-gray images; what rises is the frost left over
    once the dimmed image is accounted for: the residual of a per-image affine fit clean -> frosted,
    relative to the fitted slope."""
    images = _images(side, channels)
    clean = images.reshape(len(images), -1).astype(float)
    clutter = []
    for severity in range(1, 6):
        frosted = corrupt(images, "frost", severity, seed=3).reshape(len(images), -1).astype(float)
        ratios = []
        for x, y in zip(clean, frosted):
            slope, offset = np.polyfit(x, y, 1)
            ratios.append(np.abs(y - slope * x - offset).mean() / slope)
        clutter.append(np.mean(ratios))
    assert all(b > a for a, b in zip(clutter, clutter[1:])), clutter


@pytest.mark.parametrize("side,channels", SIDES)
def test_elastic_transform_moves_pixels_at_every_severity(side, channels):
    """The reference trades a shrinking random affine warp (jitter 2.56 -> 0.96 px at 32 x 32) for a
    growing local displacement field, so its total displacement, and the mean absolute change, fall
    with severity; every severity still distorts the images."""
    images = _images(side, channels)
    assert min(_mad("elastic_transform", images, s) for s in range(1, 6)) > 2


def test_hsv_round_trip_matches_colorsys():
    rng = np.random.default_rng(0)
    rgb = rng.random((500, 3))
    rgb[:50] = rgb[:50, :1]  # grays
    rgb[50:100, 1] = rgb[50:100, 0]  # ties for the maximum
    hsv = digital.rgb_to_hsv(rgb)
    assert np.allclose(hsv, [colorsys.rgb_to_hsv(*p) for p in rgb])
    assert np.allclose(digital.hsv_to_rgb(hsv), rgb)


@pytest.mark.parametrize("side,channels", SIDES)
def test_pixelate_matches_pillow_box_resizes(side, channels):
    images = _images(side, channels, n=3)
    out = corrupt(images, "pixelate", 5, seed=0)
    small = int(side * 0.65)
    for image, result in zip(images, out):
        pil = Image.fromarray(image[..., 0] if channels == 1 else image)
        expected = pil.resize((small, small), Image.BOX).resize((side, side), Image.BOX)
        assert np.array_equal(np.asarray(expected).reshape(result.shape), result)


def test_motion_blur_matches_a_direct_one_sided_line_kernel():
    rng = np.random.default_rng(0)
    layers = rng.random((3, 12, 12))
    angles = np.array([-135.0, -90.0, -61.0])
    radius, sigma = 4, 2.0
    out = weather._motion_blur(layers, radius, sigma, angles)
    steps = np.arange(2 * radius + 1)
    weights = np.exp(-steps ** 2 / (2 * sigma ** 2))
    weights /= weights.sum()
    for layer, angle, result in zip(layers, angles, out):
        expected = np.zeros_like(layer)
        for i, weight in zip(steps, weights):
            dx = int(np.ceil(i * np.cos(np.deg2rad(angle)) - 0.5))
            dy = int(np.ceil(i * np.sin(np.deg2rad(angle)) - 0.5))
            rows = np.clip(np.arange(12) + dy, 0, 11)
            cols = np.clip(np.arange(12) + dx, 0, 11)
            expected += weight * layer[np.ix_(rows, cols)]
        assert np.allclose(result, expected, atol=1e-5)
