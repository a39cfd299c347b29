"""Dataset registry: each dataset is a small decorated function that reads its raw files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from cardkit.registry import Registry

if TYPE_CHECKING:
    from cardkit.data.files import FileRequest


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset; images are square."""

    name: str
    num_classes: int
    in_channels: int
    input_size: int
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    class_names: tuple[str, ...]


Arrays = tuple[np.ndarray, np.ndarray]  # uint8 N x C x H x W images, int64 N labels


@dataclass(frozen=True)
class RawSplits:
    """What a registered reader returns; `val` is set only when the user named validation files."""

    info: DatasetInfo
    train: Arrays
    test: Arrays
    val: Arrays | None = None


Reader = Callable[["FileRequest"], RawSplits]
DATASETS: Registry[Reader] = Registry("dataset", normalize=lambda name: name.strip().lower())


def register_dataset(name: str) -> Callable[[Reader], Reader]:
    """Register `fn(request) -> RawSplits` under `name`."""

    def decorate(fn: Reader) -> Reader:
        return DATASETS.register(name, fn)

    return decorate


def list_datasets() -> list[str]:
    """Sorted names of the registered datasets."""
    return sorted(DATASETS)


def get_reader(name: str) -> Reader:
    return DATASETS.lookup(name)


def canonical_name(name: str) -> str:
    """The registered spelling of `name` (case and spaces ignored); an unknown name suggests close ones."""
    return DATASETS.canonical(name)
