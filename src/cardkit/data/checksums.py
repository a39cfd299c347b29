"""Official md5 sums of dataset files, and verification with an in-memory cache.

A file is matched to the table by "<parent folder>/<name>" first, then by its name alone, so the
generic CIFAR-100 names (train, test, meta) are only checked inside `cifar-100-python/`. Files
with no known md5 (such as a hand-made subset of a test batch) are read unchecked, with a debug log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cardkit.errors import CardkitError
from cardkit.fileio import file_digest

log = logging.getLogger(__name__)

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
CIFAR10_BIN_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_PY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"


@dataclass(frozen=True)
class KnownFile:
    md5: str
    dataset: str
    url: str  # where a fresh copy comes from


def _known(dataset: str, url: str, md5s: dict[str, str], per_file_url: bool = False) -> dict[str, KnownFile]:
    def source(key: str) -> str:
        return url + key.rsplit("/", 1)[-1] if per_file_url else url

    return {key: KnownFile(md5, dataset, source(key)) for key, md5 in md5s.items()}


KNOWN_FILES: dict[str, KnownFile] = {
    **_known("mnist", MNIST_URL, {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }, per_file_url=True),
    **_known("cifar10", CIFAR10_BIN_URL, {
        "cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530",
        "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
        "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
        "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
        "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
        "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
        "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
        "batches.meta.txt": "728051cd483f366e254dddb25bead8b3",
    }),
    **_known("cifar10", CIFAR10_PY_URL, {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    }),
    **_known("cifar100", CIFAR100_URL, {
        "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
        "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "cifar-100-python/meta": "7973b15100ade9c7d40fb424638fde48",
    }),
    **_known("svhn", SVHN_URL, {
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b69d56d2f5",
    }, per_file_url=True),
}

# Keyed by (resolved path, size, mtime) so a rewritten file is hashed again.
_md5_cache: dict[tuple[str, int, int], str] = {}


def known_file(path: Path) -> KnownFile | None:
    """The official entry for `path`, if there is one."""
    return KNOWN_FILES.get(f"{path.parent.name}/{path.name}") or KNOWN_FILES.get(path.name)


def md5_of(path: Path) -> str:
    return file_digest(path, "md5")


def cached_md5(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _md5_cache:
        _md5_cache[key] = md5_of(path)
    return _md5_cache[key]


def verify_file(path: Path) -> None:
    """Raise CardkitError when `path` has a known official md5 and does not match it."""
    known = known_file(path)
    if known is None:
        log.debug("%s: no official md5 known; reading it unchecked", path)
        return
    actual = cached_md5(path)
    if actual != known.md5:
        raise CardkitError(
            f"{path}: md5 is {actual}, expected {known.md5} (official {known.dataset} file); the file is "
            f"corrupt or truncated: delete it and download again from {known.url}"
        )
