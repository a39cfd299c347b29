"""Readers for the official raw formats; each returns uint8 N x C x H x W images and int64 labels.

A file is checked against the sizes its header declares before its data is read: an idx header's
dimensions must fit the file's bytes (a gzipped file's, at most deflate's ratio), a CIFAR binary's
size is checked from the file system, and a pickle is read from memory by the pure-Python
unpickler (its memo is a dict and every read is bounded by the bytes that are there), so a crafted
file cannot make a reader allocate more than the file holds.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

from cardkit.data.registry import Arrays
from cardkit.errors import CardkitError

_IDX_IMAGES, _IDX_LABELS = 2051, 2049
_CIFAR_RECORD = 1 + 3 * 32 * 32
_DEFLATE_RATIO = 1032  # the most deflate expands: 258 bytes per 2 bits, in the limit


def concat(parts: list[Arrays]) -> Arrays:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _bad(path: Path, what: str) -> CardkitError:
    return CardkitError(f"{path}: {what}; the file is not in the official format: download it again")


# --- MNIST idx --------------------------------------------------------------------------------


def read_idx(path: Path) -> tuple[int, np.ndarray]:
    """(magic number, array) of an idx file, gzipped or not."""
    gzipped = path.suffix == ".gz"
    try:
        stored = path.stat().st_size
        with (gzip.open if gzipped else open)(path, "rb") as f:
            head = f.read(4)
            magic = int.from_bytes(head, "big") if len(head) == 4 else -1
            if magic not in (_IDX_IMAGES, _IDX_LABELS):
                raise _bad(path, f"idx magic number {magic:#x}, expected {_IDX_IMAGES:#x} (images) or "
                                 f"{_IDX_LABELS:#x} (labels)")
            ndim = magic & 0xFF
            packed = f.read(4 * ndim)
            if len(packed) != 4 * ndim:
                raise _bad(path, f"its idx header is cut short ({4 + len(packed)} of {4 + 4 * ndim} bytes)")
            dims = [int.from_bytes(packed[4 * i: 4 + 4 * i], "big") for i in range(ndim)]
            size, most = math.prod(dims), (_DEFLATE_RATIO * stored if gzipped else stored - 4 - 4 * ndim)
            if size > most:
                raise _bad(path, f"idx header {magic:#x} with dims {dims} declares {size:,} data bytes, more "
                                 f"than the file's {stored:,} bytes can hold")
            raw = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise _bad(path, f"cannot read it ({e})") from None
    if len(raw) != size:
        raise _bad(path, f"idx header {magic:#x} with dims {dims} does not fit "
                         f"{'more than ' * (len(raw) > size)}{min(len(raw), size)} data bytes")
    return magic, np.frombuffer(raw, np.uint8).reshape(dims)


def read_mnist(paths: list[Path]) -> Arrays:
    """Images and labels from idx files, told apart by their magic number; order within each kind kept."""
    parsed = [read_idx(p) for p in paths]
    images = [a for magic, a in parsed if magic == _IDX_IMAGES]
    labels = [a for magic, a in parsed if magic == _IDX_LABELS]
    x = np.concatenate(images)[:, None] if images else np.zeros((0, 1, 28, 28), np.uint8)
    y = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
    if len(x) != len(y) or not images:
        names = ", ".join(p.name for p in paths)
        raise CardkitError(
            f"mnist: {names} hold {len(x)} images and {len(y)} labels; give an images file and its labels file"
        )
    return x, y


# --- CIFAR ------------------------------------------------------------------------------------


def read_cifar_bin(path: Path) -> Arrays:
    """Binary CIFAR-10 batch: records of 1 label byte then 1024 red, 1024 green, 1024 blue bytes."""
    try:
        size = path.stat().st_size
        if size % _CIFAR_RECORD:
            raise _bad(path, f"size {size} is not a multiple of the {_CIFAR_RECORD}-byte record")
        raw = np.fromfile(path, np.uint8)
    except OSError as e:
        raise _bad(path, f"cannot read it ({e})") from None
    if raw.size != size:
        raise _bad(path, f"it changed while it was read ({size} bytes, then {raw.size})")
    records = raw.reshape(-1, _CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)  # a view; copied once later


class _ArrayUnpickler(pickle._Unpickler):  # the pure-Python one: the C unpickler sizes its memo and reads from opcodes
    """Loads only plain containers and numpy arrays, so a malicious pickle cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset file")
        found = super().find_class(module, name)
        return _empty_only(found) if name == "_reconstruct" else found


def _empty_only(reconstruct):
    """numpy pickles an array as an empty one plus its bytes; a non-empty shape here would be
    allocated from a number in the file, so it is refused."""

    def checked(cls, shape, dtype):
        dims = shape if isinstance(shape, (tuple, list)) else (shape,)
        if not all(isinstance(d, int) for d in dims) or math.prod(dims) > 1:
            raise pickle.UnpicklingError(f"an array is rebuilt at shape {shape!r}; numpy pickles write (0,)")
        return reconstruct(cls, shape, dtype)

    return checked


_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                    KeyError, struct.error, OverflowError)


def read_pickle(path: Path) -> dict:
    """A dict from the official CIFAR python-version files, the only pickles this package reads."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _bad(path, f"cannot read it ({e})") from None
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _UNPICKLE_ERRORS as e:
        raise _bad(path, f"cannot unpickle it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(obj, dict):
        raise _bad(path, f"holds a {type(obj).__name__}, not a dict")
    return obj


def read_cifar_pickle(path: Path, label_key: bytes) -> Arrays:
    """Python-version CIFAR batch: b'data' is N x 3072 uint8 (R, G, B planes), labels under `label_key`."""
    batch = read_pickle(path)
    if b"data" not in batch or label_key not in batch:
        raise _bad(path, f"keys {sorted(map(repr, batch))} lack b'data' or {label_key!r}")
    try:
        data = np.asarray(batch[b"data"], np.uint8)
        labels = np.asarray(batch[label_key], np.int64)
    except (ValueError, TypeError, OverflowError) as e:
        raise _bad(path, f"its data or labels are not arrays of numbers ({e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise _bad(path, f"data shape {data.shape} with {len(labels)} labels, expected N x 3072 and N labels")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar(paths: list[Path], label_key: bytes = b"labels") -> Arrays:
    """CIFAR batches in either version: '.bin' files are binary, anything else the python pickle."""
    return concat([read_cifar_bin(p) if p.suffix == ".bin" else read_cifar_pickle(p, label_key) for p in paths])


def read_lines(path: Path) -> tuple[str, ...]:
    return tuple(line.strip() for line in path.read_text("ascii").splitlines() if line.strip())


# --- SVHN -------------------------------------------------------------------------------------


def read_svhn(path: Path) -> Arrays:
    """SVHN cropped-digits .mat: X is H x W x C x N, y is N x 1 with 10 standing for the digit 0."""
    from scipy.io import loadmat  # scipy is slow to import and only SVHN needs it

    try:
        mat = loadmat(path)
    except (OSError, ValueError, NotImplementedError) as e:
        raise _bad(path, f"cannot read it as a .mat file ({e})") from e
    if "X" not in mat or "y" not in mat or mat["X"].ndim != 4:
        raise _bad(path, "it lacks the 4-d X array or y")
    images = np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1), np.uint8)
    labels = mat["y"].reshape(-1).astype(np.int64) % 10
    return images, labels


def read_svhn_files(paths: list[Path]) -> Arrays:
    return concat([read_svhn(p) for p in paths])
