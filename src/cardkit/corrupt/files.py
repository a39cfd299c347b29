"""Corrupted datasets in the official CIFAR-10-C layout, written and read.

A suite folder holds one `<corruption>.npy` per corruption, uint8 (5 N) x H x W x C: the N images
at severity 1, then at severity 2, ..., 5; and `labels.npy` with the 5 N labels (CIFAR-10-C and
CIFAR-100-C repeat the test labels five times). Arrays are read with `allow_pickle=False` and
memory-mapped, so a 50,000-image file costs memory only for the severity in use.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cardkit.corrupt.registry import SEVERITIES, check_severity, corrupt, corruption_names, lookup_corruption
from cardkit.data.splits import ArrayDataset
from cardkit.errors import CardkitError

log = logging.getLogger(__name__)

LABELS = "labels.npy"


def write_suite(dataset: ArrayDataset, folder: str | Path, names: Sequence[str] | None = None,
                seed: int = 0) -> list[Path]:
    """Corrupt `dataset` by each of `names` (default: every registered corruption) at every
    severity and write the official layout into `folder`; returns the files written."""
    names = list(names) if names else corruption_names()
    for name in names:
        lookup_corruption(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = dataset.images.permute(0, 2, 3, 1).contiguous().numpy()  # N x H x W x C, as published
    labels = np.tile(dataset.labels.numpy().astype(np.uint8 if dataset.labels.max() < 256 else np.int64),
                     len(SEVERITIES))
    written = [_save(folder / LABELS, labels)]
    for name in names:
        stacked = np.concatenate([corrupt(images, name, s, seed) for s in SEVERITIES])
        written.append(_save(folder / f"{name}.npy", stacked))
        log.info("wrote %s", written[-1])
    return written


def _save(path: Path, array: np.ndarray) -> Path:
    """Atomic: a killed run never leaves a truncated file that looks complete."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(partial, path)
    return path


class CorruptedSuite:
    """An official-layout folder (CIFAR-10-C, CIFAR-100-C, or one written by `write_suite`)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CardkitError(f"corruption folder '{self.folder}' does not exist; give a folder of "
                               f"<corruption>.npy files and labels.npy (CIFAR-10-C layout), or write one "
                               f"with `cardkit corrupt`")
        self.labels = _load(self.folder / LABELS, "labels")
        if self.labels.ndim != 1 or len(self.labels) % len(SEVERITIES):
            raise CardkitError(f"'{self.folder / LABELS}' has shape {self.labels.shape}; expected one "
                               f"label per image, 5 x N for the 5 severities")
        self.size = len(self.labels) // len(SEVERITIES)

    @property
    def names(self) -> list[str]:
        """The registered corruptions present in the folder."""
        return [n for n in corruption_names() if (self.folder / f"{n}.npy").is_file()]

    def check(self, names: Sequence[str]) -> None:
        missing = [n for n in names if not (self.folder / f"{lookup_corruption(n).name}.npy").is_file()]
        if missing:
            raise CardkitError(f"corruption folder '{self.folder}' lacks {', '.join(m + '.npy' for m in missing)}; "
                               f"it has {', '.join(self.names) or 'no corruption files'}")

    def load(self, name: str, severity: int) -> ArrayDataset:
        """The N images of one corruption at one severity, as uint8 N x C x H x W."""
        self.check([name])
        severity = check_severity(severity)
        path = self.folder / f"{name}.npy"
        images = _load(path, name)
        if images.ndim != 4 or images.shape[0] != len(self.labels) or images.shape[3] not in (1, 3) \
                or images.dtype != np.uint8:
            raise CardkitError(f"'{path}' holds {images.dtype} {images.shape}; expected uint8 "
                               f"{len(self.labels)} x H x W x C (5 severities of {self.size} images, C = 1 or 3)")
        part = slice((severity - 1) * self.size, severity * self.size)
        return ArrayDataset(torch.from_numpy(images[part].transpose(0, 3, 1, 2).copy()),
                            torch.from_numpy(self.labels[part].astype(np.int64)))


def _load(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise CardkitError(f"'{path}' is missing; an official corruption folder needs labels.npy and "
                           f"one <corruption>.npy per corruption")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise CardkitError(f"'{path}' is not a readable .npy array of {what} ({err}); re-download or "
                           f"re-create it with `cardkit corrupt`") from None


class GeneratedSuite:
    """The same interface as `CorruptedSuite`, corrupting a clean dataset on demand: the fallback
    when the official files are not at hand."""

    def __init__(self, dataset: ArrayDataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed
        self.size = len(dataset)
        self.names = corruption_names()
        self._images = dataset.images.permute(0, 2, 3, 1).contiguous().numpy()

    def check(self, names: Sequence[str]) -> None:
        for name in names:
            lookup_corruption(name)

    def load(self, name: str, severity: int) -> ArrayDataset:
        images = corrupt(self._images, name, severity, self.seed)
        return ArrayDataset(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), self.dataset.labels)
