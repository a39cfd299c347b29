"""Batched, seeded data augmentation for image batches (uint8 or float)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cardkit.errors import CardkitError


@dataclass(frozen=True)
class Augmentation:
    """Random crop after zero padding, and random horizontal flip, applied to a whole batch at once.

    Random numbers come from `generator`, which must be a CPU generator (None: torch's global one),
    and are drawn on the CPU, so a batch is augmented the same way on any device.
    """

    crop_padding: int = 0  # random crop with zero padding of this many pixels (0 = off)
    hflip: bool = False  # random horizontal flip with p=0.5

    def __post_init__(self) -> None:
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise CardkitError(f"crop_padding={self.crop_padding!r} is not valid; give an integer >= 0 (0 = off)")

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, *,
                 part: slice = slice(None), total: int | None = None) -> torch.Tensor:
        """Augment `x`; with `part` and `total`, x is that part of a batch of `total` images and gets
        the draws the whole batch would (a data-parallel rank's share)."""
        if not self.active or len(x) == 0:
            return x
        _, _, h, w = x.shape
        n, p = total or len(x), self.crop_padding
        shifts = torch.randint(0, 2 * p + 1, (2, n), generator=generator)[:, part]
        flips = torch.rand(n, generator=generator) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
        flips = flips[part]
        rows, cols = _source_indices(shifts, flips, h, w)
        padded = F.pad(x, (p, p, p, p)) if p else x
        return _gather(padded, rows.to(x.device), cols.to(x.device))


def _source_indices(shifts: torch.Tensor, flips: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample rows (N x H) and columns (N x W) of the padded image to read; a flip reverses the columns."""
    rows = shifts[0, :, None] + torch.arange(h)
    ascending = torch.arange(w)
    cols = shifts[1, :, None] + torch.where(flips[:, None], ascending.flip(0), ascending)
    return rows, cols


def _gather(padded: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[n, c, i, j] = padded[n, c, rows[n, i], cols[n, j]] as one gather over flattened pixels."""
    n, c, hp, wp = padded.shape
    h, w = rows.shape[1], cols.shape[1]
    pixels = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, hp * wp).gather(2, pixels).reshape(n, c, h, w)
