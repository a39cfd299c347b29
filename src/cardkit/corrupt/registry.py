"""The corruption registry: the 15 CIFAR-10-C corruptions and the 4 held-out extras.

A corruption is a function `(images, severity, rng) -> images` on float32 batches in [0, 1] laid out
N x H x W x C (the layout of the official files), C = 1 or 3. Parameters follow the published
CIFAR-10-C table for 32 x 32 images; spatial parameters (blur radii, displacements, pixel sizes)
scale with the image side, so 28 x 28 and 8 x 8 inputs get the same visual strength.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from cardkit.errors import CardkitError
from cardkit.registry import Registry

CorruptionFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

BENCHMARK = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
             "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
             "elastic_transform", "pixelate", "jpeg_compression")
"""The 15 corruptions of CIFAR-10-C, in the paper's order (noise, blur, weather, digital)."""

EXTRAS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
"""The 4 held-out corruptions, for validation."""

SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIDE = 32  # the side the published parameters are given for
CHUNK = 1000  # images corrupted at once: bounds the memory of the large intermediates


@dataclass(frozen=True)
class Corruption:
    name: str
    fn: CorruptionFn


# Listed in the paper's order: the benchmark corruptions, the extras, then any others.
CORRUPTIONS: Registry[Corruption] = Registry(
    "corruption", order=lambda n: (BENCHMARK + EXTRAS).index(n) if n in BENCHMARK + EXTRAS else len(BENCHMARK + EXTRAS))


def register_corruption(name: str) -> Callable[[CorruptionFn], CorruptionFn]:
    def add(fn: CorruptionFn) -> CorruptionFn:
        CORRUPTIONS.register(name, Corruption(name, fn))
        return fn
    return add


def corruption_names() -> list[str]:
    """Every registered corruption: the benchmark ones first, then the extras, then any others."""
    _load()
    return CORRUPTIONS.names()


def lookup_corruption(name: str) -> Corruption:
    _load()
    return CORRUPTIONS.lookup(name)


def expand_names(names: Sequence[str]) -> list[str]:
    """Corruption names with the groups expanded: "benchmark" (the 15), "extras" (the 4), "all"."""
    groups = {"benchmark": BENCHMARK, "extras": EXTRAS}
    out: list[str] = []
    for name in names:
        for item in corruption_names() if name == "all" else groups.get(name, (name,)):
            if lookup_corruption(item).name not in out:
                out.append(item)
    return out


def check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise CardkitError(f"severity={severity!r} is not valid; give an integer from 1 to 5")
    return int(severity)


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """`images` (uint8 N x H x W x C, C = 1 or 3) corrupted by `name` at `severity`, as uint8.

    The result depends only on (images, name, severity, seed): each chunk of images draws from its
    own generator seeded by those, so the suite can be built chunk by chunk in bounded memory.
    """
    corruption = lookup_corruption(name)
    severity = check_severity(severity)
    images = _check_images(images)
    out = np.empty_like(images)
    key = _name_key(name)
    for start in range(0, len(images), CHUNK):
        rng = np.random.default_rng([seed, key, severity, start // CHUNK])
        batch = images[start:start + CHUNK].astype(np.float32) / 255.0
        corrupted = corruption.fn(batch, severity, rng)
        out[start:start + CHUNK] = np.clip(np.rint(corrupted * 255.0), 0, 255).astype(np.uint8)
    return out


def scaled(value: float, images: np.ndarray) -> float:
    """A spatial parameter given for 32 x 32 images, scaled to these images' side."""
    return value * images.shape[1] / REFERENCE_SIDE


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] not in (1, 3) or images.dtype != np.uint8:
        raise CardkitError(f"images must be uint8 N x H x W x C with C = 1 or 3, got {images.dtype} "
                           f"{tuple(images.shape)}")
    return images


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode())


def _load() -> None:
    """Importing the corruption modules registers them."""
    from cardkit.corrupt import blur, digital, noise, weather  # noqa: F401
