"""The built-in datasets. Default files, relative to data_dir:

- mnist: `mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`; explicit files are idx files (an images
  file and its labels file per split, told apart by their header).
- cifar10: `cifar-10-batches-bin/data_batch_{1..5}.bin` and `test_batch.bin` (binary version), or, when only
  `cifar-10-batches-py/` exists, its `data_batch_{1..5}` and `test_batch` (python version). Explicit files may
  be of either version: a `.bin` suffix means binary.
- cifar100: `cifar-100-python/{train,test}` (fine labels).
- svhn: `svhn/{train,test}_32x32.mat`.
- digits: scikit-learn's 8x8 digits; no files.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from cardkit.data import checksums
from cardkit.data.download import ArchiveSource, FileSource
from cardkit.data.files import FileRequest, Layout, optional_file
from cardkit.data.formats import read_cifar, read_lines, read_mnist, read_pickle, read_svhn_files
from cardkit.data.registry import DatasetInfo, RawSplits, register_dataset
from cardkit.errors import CardkitError

DIGIT_NAMES = tuple(str(d) for d in range(10))
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))

MNIST = Layout(
    "mnist",
    train=("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    test=("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    source=FileSource(checksums.MNIST_URL),
)
CIFAR10_BIN = Layout(
    "cifar-10-batches-bin",
    train=tuple(f"{b}.bin" for b in CIFAR10_BATCHES),
    test=("test_batch.bin",),
    source=ArchiveSource(checksums.CIFAR10_BIN_URL),
)
CIFAR10_PY = Layout(
    "cifar-10-batches-py", train=CIFAR10_BATCHES, test=("test_batch",), source=ArchiveSource(checksums.CIFAR10_PY_URL)
)
CIFAR100 = Layout("cifar-100-python", train=("train",), test=("test",), source=ArchiveSource(checksums.CIFAR100_URL))
SVHN = Layout("svhn", train=("train_32x32.mat",), test=("test_32x32.mat",), source=FileSource(checksums.SVHN_URL))


def _read_all(info: DatasetInfo, paths: dict[str, list[Path]], read) -> RawSplits:
    return RawSplits(info, **{split: read(split_paths) for split, split_paths in paths.items()})


@register_dataset("mnist")
def mnist(request: FileRequest) -> RawSplits:
    info = DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), DIGIT_NAMES)
    return _read_all(info, request.resolve(MNIST), read_mnist)


@register_dataset("cifar10")
def cifar10(request: FileRequest) -> RawSplits:
    paths = request.resolve(_cifar10_layout(request.data_dir))
    names = _cifar10_names(paths["train"][0].parent)
    info = DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), names)
    return _read_all(info, paths, read_cifar)


def _cifar10_layout(data_dir: Path) -> Layout:
    """The binary version unless only the python version's folder exists."""
    if (data_dir / CIFAR10_PY.folder).is_dir() and not (data_dir / CIFAR10_BIN.folder).is_dir():
        return CIFAR10_PY
    return CIFAR10_BIN


def _cifar10_names(folder: Path) -> tuple[str, ...]:
    meta = optional_file(folder / "batches.meta.txt")
    names = read_lines(meta) if meta else CIFAR10_NAMES
    return names if len(names) == 10 else CIFAR10_NAMES


@register_dataset("cifar100")
def cifar100(request: FileRequest) -> RawSplits:
    paths = request.resolve(CIFAR100)
    names = _cifar100_names(paths["train"][0].parent)
    info = DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), names)
    return _read_all(info, paths, functools.partial(read_cifar, label_key=b"fine_labels"))


def _cifar100_names(folder: Path) -> tuple[str, ...]:
    meta = optional_file(folder / "meta")
    names = read_pickle(meta).get(b"fine_label_names", []) if meta else []
    if len(names) != 100:
        return tuple(f"class_{i}" for i in range(100))
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


@register_dataset("svhn")
def svhn(request: FileRequest) -> RawSplits:
    info = DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197), DIGIT_NAMES)
    return _read_all(info, request.resolve(SVHN), read_svhn_files)


DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0  # fixed, so the test set never depends on the caller's seed


@register_dataset("digits")
def digits(request: FileRequest) -> RawSplits:
    if request.any_given():
        raise CardkitError("digits: takes no files (it comes with scikit-learn); remove train/val/test_files")
    train, test = _digits_split()
    mean, std = train[0].mean() / 255.0, train[0].std() / 255.0
    info = DatasetInfo("digits", 10, 1, 8, (float(mean),), (float(std),), DIGIT_NAMES)
    return RawSplits(info, train=train, test=test)


@functools.lru_cache(maxsize=1)
def _digits_split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits  # scikit-learn is slow to import and only digits needs it
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    for a in (x_tr, x_te, y_tr, y_te):
        a.setflags(write=False)  # cached and shared between loads
    return (x_tr, y_tr), (x_te, y_te)
