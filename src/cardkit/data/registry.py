"""Dataset registry: each dataset is a small decorated function that reads its raw files."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from cardkit.errors import CardkitError

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
_READERS: dict[str, Reader] = {}


def register_dataset(name: str) -> Callable[[Reader], Reader]:
    """Register `fn(request) -> RawSplits` under `name`."""

    def decorate(fn: Reader) -> Reader:
        if name in _READERS:
            raise ValueError(f"dataset {name!r} is already registered")
        _READERS[name] = fn
        return fn

    return decorate


def list_datasets() -> list[str]:
    """Sorted names of the registered datasets."""
    return sorted(_READERS)


def get_reader(name: str) -> Reader:
    return _READERS[canonical_name(name)]


def canonical_name(name: str) -> str:
    """The registered spelling of `name` (case and spaces ignored); an unknown name suggests close ones."""
    key = name.strip().lower()
    if key in _READERS:
        return key
    close = difflib.get_close_matches(key, list_datasets(), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise CardkitError(
        f"unknown dataset {name!r}; {hint}valid names: {', '.join(list_datasets())}; fix the dataset name"
    )
