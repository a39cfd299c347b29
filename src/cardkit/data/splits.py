"""load_dataset: read a registered dataset and cut seeded, disjoint train/val/test subsets."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cardkit.data.files import FileRequest
from cardkit.data.registry import Arrays, DatasetInfo, canonical_name, get_reader
from cardkit.errors import CardkitError

log = logging.getLogger(__name__)

# Independent random streams per purpose, so e.g. changing test_size never changes the training subset.
_VAL_STREAM, _TRAIN_STREAM, _TEST_STREAM = 0, 1, 2


@dataclass
class ArrayDataset:
    """Images kept as uint8 N x C x H x W in memory, with int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise CardkitError(f"images are {images.dtype} {tuple(images.shape)}; expected uint8 N x C x H x W")
        if labels.dtype != torch.int64 or labels.shape != (len(images),):
            raise CardkitError(
                f"labels are {labels.dtype} {tuple(labels.shape)}; expected int64 of length {len(images)}"
            )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DatasetSplits:
    info: DatasetInfo
    train: ArrayDataset
    val: ArrayDataset | None
    test: ArrayDataset


def load_dataset(
    name: str,
    data_dir: str | Path = "data",
    *,
    download: bool = True,
    seed: int = 0,
    train_size: int | None = None,
    val_size: int = 0,
    test_size: int | None = None,
    train_files: list[str] | None = None,
    val_files: list[str] | None = None,
    test_files: list[str] | None = None,
    only: str | None = None,
) -> DatasetSplits:
    """Load a registered dataset (see `list_datasets`) with seeded subsets.

    Validation comes from `val_files` when given (then `val_size` > 0 subsamples it), else `val_size`
    images are carved out of the training set. `train_size` and `test_size` pick seeded random subsets
    of the remaining training set and of the test set; None keeps all. Every subset keeps file order and
    depends only on `seed`. `*_files` are paths relative to `data_dir` (or absolute) replacing the
    dataset's default files; the defaults per dataset are listed in `cardkit.data.builtin`. `only`
    ("train" or "test") needs only that split's files; the other split then holds the same images.
    """
    name = canonical_name(name)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CardkitError(f"seed={seed!r} is not valid; give an integer >= 0")
    files = {"train": train_files, "val": val_files, "test": test_files}
    if only not in (None, "train", "test"):
        raise CardkitError(f"only={only!r} is not a split; give 'train', 'test' or None")
    raw = get_reader(name)(FileRequest(name, Path(data_dir).expanduser(), download, files, only))
    train, val = _train_val(raw.train, raw.val, seed, val_size)
    train = _subset(train, train_size, seed, _TRAIN_STREAM, "train_size", "training images")
    test = _subset(raw.test, test_size, seed, _TEST_STREAM, "test_size", "test images")
    log.debug("%s: %d train, %d val, %d test images", raw.info.name, len(train[1]),
              0 if val is None else len(val[1]), len(test[1]))
    return DatasetSplits(raw.info, _dataset(train), None if val is None else _dataset(val), _dataset(test))


def _train_val(train: Arrays, val: Arrays | None, seed: int, val_size: int) -> tuple[Arrays, Arrays | None]:
    _check_size("val_size", val_size, allow_zero=True)
    if val is not None:
        return train, _subset(val, val_size or None, seed, _VAL_STREAM, "val_size", "images in val_files")
    if val_size == 0:
        return train, None
    n = len(train[1])
    if val_size >= n:
        raise CardkitError(f"val_size={val_size} leaves no training images out of {n}; use a val_size below {n}")
    order = np.random.default_rng([seed, _VAL_STREAM]).permutation(n)
    return _take(train, np.sort(order[val_size:])), _take(train, np.sort(order[:val_size]))


def _subset(arrays: Arrays, size: int | None, seed: int, stream: int, what: str, pool: str) -> Arrays:
    """`size` seeded random items in their original order; None keeps all."""
    if size is None:
        return arrays
    _check_size(what, size, allow_zero=False)
    n = len(arrays[1])
    if size > n:
        raise CardkitError(f"{what}={size} is larger than the {n} {pool} available; use {what} <= {n} or None")
    chosen = np.random.default_rng([seed, stream]).choice(n, size, replace=False)
    return _take(arrays, np.sort(chosen))


def _check_size(what: str, size: object, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < low:
        raise CardkitError(f"{what}={size!r} is not valid; give an integer >= {low}")


def _take(arrays: Arrays, index: np.ndarray) -> Arrays:
    return arrays[0][index], arrays[1][index]


def _dataset(arrays: Arrays) -> ArrayDataset:
    images, labels = (a if a.flags.writeable else a.copy() for a in arrays)
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(images, np.uint8)),
                        torch.from_numpy(np.ascontiguousarray(labels, np.int64)))
