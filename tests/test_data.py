"""Dataset reading, subsets, augmentation and batching."""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from cardkit.data import (
    ArrayDataset,
    Augmentation,
    BatchLoader,
    DatasetInfo,
    list_datasets,
    load_dataset,
)
from cardkit.data import checksums, download, registry
from cardkit.data.registry import RawSplits
from cardkit.errors import CardkitError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR_BIN = "cifar-10-batches-bin"
SHARED_PROTOCOL = dict(
    train_files=[f"{CIFAR_BIN}/data_batch_{i}.bin" for i in range(1, 5)],
    val_files=[f"{CIFAR_BIN}/data_batch_5.bin"],
    test_files=["cifar-10-test-1k/test_batch_first1000.bin"],
)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir() or not (SHARED_DATA / CIFAR_BIN).is_dir():
        pytest.skip(f"real dataset files not found at {SHARED_DATA} (the shared data folder next to the repository)")
    return SHARED_DATA


@pytest.fixture
def no_known_md5(monkeypatch):
    """Files the tests write carry official names but not official contents."""
    monkeypatch.setattr(checksums, "KNOWN_FILES", {})


@pytest.fixture
def offline(monkeypatch):
    def refuse(url):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(download, "open_url", refuse)


def random_images(n: int, seed: int = 0) -> np.ndarray:
    """Random uint8 RGB 32x32 images; image 0 is red only, to catch a wrong channel order."""
    images = np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    images[0, 0], images[0, 1:] = 200, 0
    return images


def write_cifar_bin(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
    records.tofile(path)


def write_cifar_pickle(path: Path, images: np.ndarray, labels: np.ndarray, label_key: bytes = b"labels") -> None:
    """The python version's layout: a protocol-2 pickle of a dict with bytes keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {
        b"batch_label": b"training batch 1 of 5",
        label_key: labels.tolist(),
        b"data": images.reshape(len(images), 3072),
        b"filenames": [b"img.png"] * len(images),
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def assert_round_trip(dataset: ArrayDataset, images: np.ndarray, labels: np.ndarray) -> None:
    assert dataset.images.dtype == torch.uint8 and dataset.labels.dtype == torch.int64
    np.testing.assert_array_equal(dataset.images.numpy(), images)
    np.testing.assert_array_equal(dataset.labels.numpy(), labels)
    red_only = dataset.images[0]
    assert (red_only[0] == 200).all() and (red_only[1:] == 0).all()


# --- real files ---------------------------------------------------------------------------------


def test_mnist_real_files(shared_data):
    splits = load_dataset("mnist", shared_data, download=False)
    assert splits.train.images.shape == (60000, 1, 28, 28) and splits.test.images.shape == (10000, 1, 28, 28)
    assert splits.train.images.dtype == torch.uint8
    assert int(splits.train.labels[0]) == 5
    assert int(splits.train.images.min()) == 0 and int(splits.train.images.max()) == 255
    assert splits.val is None and splits.info.in_channels == 1 and splits.info.input_size == 28


def test_cifar10_training_batches_are_balanced(shared_data):
    splits = load_dataset(
        "cifar10", shared_data, download=False,
        train_files=[f"{CIFAR_BIN}/data_batch_{i}.bin" for i in range(1, 6)],
        test_files=SHARED_PROTOCOL["test_files"],
    )
    assert splits.train.images.shape == (50000, 3, 32, 32)
    assert torch.bincount(splits.train.labels).tolist() == [5000] * 10
    assert splits.info.class_names[0] == "airplane" and splits.info.class_names[9] == "truck"


def test_cifar10_shared_protocol_sizes(shared_data):
    splits = load_dataset("cifar10", shared_data, download=False, **SHARED_PROTOCOL)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40000, 10000, 1000)
    batch5 = np.fromfile(shared_data / CIFAR_BIN / "data_batch_5.bin", np.uint8).reshape(-1, 3073)
    np.testing.assert_array_equal(splits.val.labels.numpy(), batch5[:, 0])
    np.testing.assert_array_equal(splits.val.images[7].numpy().reshape(-1), batch5[7, 1:])


def test_md5_catches_a_corrupted_copy(shared_data, tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    copy = tmp_path / "mnist" / name
    copy.parent.mkdir()
    shutil.copy(shared_data / "mnist" / name, copy)
    copy.chmod(0o644)
    files = dict(
        train_files=[str(shared_data / "mnist" / f"train-{k}-ubyte.gz") for k in ("images-idx3", "labels-idx1")],
        test_files=[str(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz"), f"mnist/{name}"],
    )
    assert len(load_dataset("mnist", tmp_path, download=False, **files).test) == 10000
    data = bytearray(copy.read_bytes())
    data[100] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(CardkitError, match=r"md5 is [0-9a-f]{32}, expected ec29112dd5afa0611ce80d1b7f02629c"):
        load_dataset("mnist", tmp_path, download=False, **files)


# --- official formats written by the tests -----------------------------------------------------------


def test_cifar10_python_layout_round_trips(tmp_path, no_known_md5):
    folder = tmp_path / "cifar-10-batches-py"
    images, labels = random_images(60), np.arange(60) % 10
    for i in range(5):
        write_cifar_pickle(folder / f"data_batch_{i + 1}", images[10 * i: 10 * i + 10], labels[10 * i: 10 * i + 10])
    test_images = random_images(7, seed=1)
    write_cifar_pickle(folder / "test_batch", test_images, np.arange(7))
    splits = load_dataset("cifar10", tmp_path, download=False)
    assert_round_trip(splits.train, images[:50], labels[:50])
    assert_round_trip(splits.test, test_images, np.arange(7))


def test_cifar10_binary_test_batch_round_trips(tmp_path, no_known_md5):
    folder = tmp_path / CIFAR_BIN
    for i in range(1, 6):
        write_cifar_bin(folder / f"data_batch_{i}.bin", random_images(4, seed=i), np.arange(4))
    images, labels = random_images(9, seed=9), np.arange(9) % 10
    write_cifar_bin(folder / "test_batch.bin", images, labels)
    splits = load_dataset("cifar10", tmp_path, download=False)
    assert len(splits.train) == 20
    assert_round_trip(splits.test, images, labels)
    assert splits.info.class_names[3] == "cat"  # the standard names when batches.meta.txt is absent


def test_official_name_with_wrong_contents_fails_md5(tmp_path):
    write_cifar_bin(tmp_path / "mine.bin", random_images(2), np.arange(2))  # no known md5: read unchecked
    write_cifar_bin(tmp_path / CIFAR_BIN / "test_batch.bin", random_images(2), np.arange(2))
    with pytest.raises(CardkitError, match=r"test_batch.bin: md5 .*\(official cifar10 file\)"):
        load_dataset("cifar10", tmp_path, download=False, train_files=["mine.bin"])


def test_cifar100_round_trips_fine_labels_and_names(tmp_path, no_known_md5):
    folder = tmp_path / "cifar-100-python"
    images, fine = random_images(12), np.arange(12) * 8
    write_cifar_pickle(folder / "train", images, fine, label_key=b"fine_labels")
    write_cifar_pickle(folder / "test", random_images(3, seed=3), np.array([99, 0, 1]), label_key=b"fine_labels")
    names = [f"name{i}".encode() for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names, b"coarse_label_names": []}, protocol=2))
    splits = load_dataset("cifar100", tmp_path, download=False)
    assert_round_trip(splits.train, images, fine)
    assert splits.test.labels.tolist() == [99, 0, 1]
    assert splits.info.num_classes == 100 and splits.info.class_names[42] == "name42"


def test_svhn_round_trips_and_maps_label_10_to_0(tmp_path, no_known_md5):
    folder = tmp_path / "svhn"
    folder.mkdir()
    images = random_images(6)
    digits = np.array([10, 1, 2, 3, 9, 10])
    for name in ("train_32x32.mat", "test_32x32.mat"):  # official layout: X is H x W x C x N, y is N x 1
        scipy.io.savemat(folder / name, {"X": images.transpose(2, 3, 1, 0), "y": digits[:, None].astype(np.uint8)})
    splits = load_dataset("svhn", tmp_path, download=False)
    assert_round_trip(splits.train, images, np.array([0, 1, 2, 3, 9, 0]))


def test_pickle_that_would_run_code_is_refused(tmp_path, no_known_md5):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps({b"data": Payload()}, protocol=2))
    with pytest.raises(CardkitError, match="open is not allowed in a dataset file"):
        load_dataset("cifar100", tmp_path, download=False)
    assert not marker.exists()


# --- missing files and downloads ----------------------------------------------------------------


def test_missing_files_without_download_name_file_folder_and_url(tmp_path):
    with pytest.raises(CardkitError) as info:
        load_dataset("mnist", tmp_path, download=False)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert str(tmp_path / "mnist") in message and "https://ossci-datasets.s3.amazonaws.com/mnist/" in message


def test_missing_files_with_failed_download_are_reported_clearly(tmp_path, offline):
    with pytest.raises(CardkitError) as info:
        load_dataset("cifar10", tmp_path, download=True)
    message = str(info.value)
    assert "download failed" in message and "no network in tests" in message
    assert "test_batch.bin" in message and str(tmp_path / CIFAR_BIN) in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in message
    assert not list(tmp_path.rglob("*.part"))


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def _serve(monkeypatch, payload: bytes) -> list[str]:
    requested = []

    def fake_open(url):
        requested.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(download, "open_url", fake_open)
    return requested


def _cifar_bin_archive() -> bytes:
    record = lambda label: bytes([label]) + bytes(range(256)) * 12  # noqa: E731
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    return _tar_gz({f"{CIFAR_BIN}/{name}": record(3) * 2 for name in names})


def test_download_extracts_the_official_archive(tmp_path, monkeypatch):
    archive = _cifar_bin_archive()
    official = checksums.KnownFile(hashlib.md5(archive).hexdigest(), "cifar10", "url")
    monkeypatch.setattr(checksums, "KNOWN_FILES", {"cifar-10-binary.tar.gz": official})
    requested = _serve(monkeypatch, archive)
    splits = load_dataset("cifar10", tmp_path)
    assert requested == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert (len(splits.train), len(splits.test)) == (10, 2) and splits.test.labels.tolist() == [3, 3]
    assert (tmp_path / "cifar-10-binary.tar.gz").is_file()


def test_download_with_wrong_md5_is_discarded(tmp_path, monkeypatch):
    _serve(monkeypatch, _cifar_bin_archive())  # not the official archive, so its md5 differs
    with pytest.raises(CardkitError, match="download failed .*has md5 [0-9a-f]{32}, expected c32a1d4ab5"):
        load_dataset("cifar10", tmp_path)
    assert not list(tmp_path.iterdir())


def test_archive_member_escaping_data_dir_is_refused(tmp_path, monkeypatch, no_known_md5):
    data_dir = tmp_path / "data"
    _serve(monkeypatch, _tar_gz({"../evil.txt": b"x", f"{CIFAR_BIN}/test_batch.bin": b""}))
    with pytest.raises(CardkitError, match="unsafe member '../evil.txt'"):
        load_dataset("cifar10", data_dir)
    assert not (tmp_path / "evil.txt").exists()


# --- names ------------------------------------------------------------------------------------------


def test_list_datasets():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "mnist", "svhn"]


def test_unknown_name_suggests_close_one():
    with pytest.raises(CardkitError, match=r"did you mean 'mnist'\? valid: mnist, cifar10, cifar100, svhn, digits$"):
        load_dataset("mnsit")
    assert len(load_dataset(" Digits ").test) == 360

# --- subsets ----------------------------------------------------------------------------------------


@pytest.fixture
def ids_dataset(monkeypatch) -> str:
    """A registered dataset whose labels are the image ids 0..999 (test ids 1000..1499, val ids 2000..2299)."""

    def arrays(ids: np.ndarray):
        images = np.stack([ids % 256, ids // 256], axis=1).astype(np.uint8).reshape(-1, 1, 1, 2)
        return images, ids.astype(np.int64)

    def read(request) -> RawSplits:
        info = DatasetInfo("ids", 3000, 1, 1, (0.5,), (0.5,), ())
        val = arrays(np.arange(2000, 2300)) if request.files["val"] else None
        return RawSplits(info, train=arrays(np.arange(1000)), test=arrays(np.arange(1000, 1500)), val=val)

    monkeypatch.setitem(registry.DATASETS._entries, "ids", read)
    return "ids"


def _ids(dataset: ArrayDataset | None) -> set[int]:
    return set(dataset.labels.tolist())


def test_subsets_have_exact_sizes_and_are_disjoint(ids_dataset):
    splits = load_dataset(ids_dataset, train_size=300, val_size=100, test_size=50)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (300, 100, 50)
    assert not _ids(splits.train) & _ids(splits.val)
    assert _ids(splits.train) | _ids(splits.val) <= set(range(1000)) and _ids(splits.test) <= set(range(1000, 1500))
    assert len(_ids(splits.train)) == 300  # no repeats
    full = load_dataset(ids_dataset, val_size=100)
    assert len(full.train) == 900 and _ids(full.val) == _ids(splits.val)  # the val carve ignores train_size


def test_subsets_depend_only_on_the_seed(ids_dataset):
    sizes = dict(train_size=200, val_size=100, test_size=50)
    a, b = load_dataset(ids_dataset, seed=1, **sizes), load_dataset(ids_dataset, seed=1, **sizes)
    c = load_dataset(ids_dataset, seed=2, **sizes)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).images, getattr(b, split).images)
        assert _ids(getattr(a, split)) != _ids(getattr(c, split))


def test_val_files_are_used_and_subsampled(ids_dataset):
    splits = load_dataset(ids_dataset, val_files=["anything"], val_size=30)
    assert len(splits.train) == 1000 and len(splits.val) == 30 and _ids(splits.val) <= set(range(2000, 2300))


@pytest.mark.parametrize(
    "sizes, named",
    [
        (dict(train_size=1001), "train_size=1001 is larger than the 1000"),
        (dict(val_size=200, train_size=900), "train_size=900 is larger than the 800"),
        (dict(val_size=1000), "val_size=1000 leaves no training images"),
        (dict(test_size=501), "test_size=501 is larger than the 500"),
        (dict(val_files=["v"], val_size=301), "val_size=301 is larger than the 300"),
        (dict(train_size=0), "train_size=0 is not valid"),
        (dict(val_size=-1), "val_size=-1 is not valid"),
    ],
)
def test_impossible_sizes_are_refused(ids_dataset, sizes, named):
    with pytest.raises(CardkitError, match=named):
        load_dataset(ids_dataset, **sizes)


# --- digits -------------------------------------------------------------------------------------


def test_digits_fixed_test_set_and_pixel_range():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=7, train_size=100, val_size=50)
    assert a.train.images.shape[1:] == (1, 8, 8) and a.info.in_channels == 1 and a.info.input_size == 8
    assert len(a.test) == 360 and len(a.train) == 1797 - 360
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert int(a.train.images.min()) == 0 and int(a.train.images.max()) == 255
    assert 0 < a.info.mean[0] < 1 and 0 < a.info.std[0] < 1


# --- augmentation ---------------------------------------------------------------------------------


def _batch(n: int = 64, size: int = 8) -> torch.Tensor:
    """Strictly positive values, so zero fill is told apart from image content."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.1


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved down by dy and right by dx, zero filled."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = x[
        ..., max(-dy, 0): h + min(-dy, 0), max(-dx, 0): w + min(-dx, 0)
    ]
    return out


def _matching_shifts(out: torch.Tensor, x: torch.Tensor, p: int) -> list[tuple[int, int]]:
    shifts = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)]
    return [s for s in shifts if torch.equal(out, _shift(x, *s))]


def test_augmentation_off_is_identity():
    x = _batch()
    assert torch.equal(Augmentation()(x, torch.Generator().manual_seed(0)), x)


def test_augmentation_is_deterministic_for_a_generator_seed():
    x, aug = _batch(), Augmentation(crop_padding=2, hflip=True)
    first = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(first, aug(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, aug(x, torch.Generator().manual_seed(4)))
    assert first.shape == x.shape and first.dtype == x.dtype and 0 <= first.min() and first.max() <= 1


def test_crop_gives_shifted_copies_with_zero_fill():
    x, p = _batch(), 2
    out = Augmentation(crop_padding=p)(x, torch.Generator().manual_seed(0))
    found = [_matching_shifts(out[i], x[i], p) for i in range(len(x))]
    assert all(len(f) == 1 for f in found)
    assert len({f[0] for f in found}) > 10  # offsets really vary across the batch


def test_hflip_flips_exactly_about_half():
    x = _batch()
    out = Augmentation(hflip=True)(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48


def test_crop_and_flip_together():
    x, p = _batch(), 3
    out = Augmentation(crop_padding=p, hflip=True)(x, torch.Generator().manual_seed(1))
    for i in range(len(x)):
        assert _matching_shifts(out[i], x[i], p) or _matching_shifts(out[i], x[i].flip(-1), p)


# --- batch loader -------------------------------------------------------------------------------------


def _id_dataset(n: int = 103) -> ArrayDataset:
    images = torch.arange(n * 12, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(n, 3, 2, 2)
    return ArrayDataset(images, torch.arange(n))


def test_shuffled_epoch_covers_every_sample_once():
    loader = BatchLoader(_id_dataset(), 10, shuffle=True)
    batches = list(loader.epoch(seed=0))
    assert len(loader) == len(batches) == 11 and len(batches[-1][1]) == 3
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(103)) and seen.tolist() != list(range(103))


def test_batches_carry_matching_images_as_floats():
    data = _id_dataset()
    x, y = next(BatchLoader(data, 16, shuffle=True).epoch(seed=5))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, data.images[y].float() / 255)


def test_same_seed_same_batches_and_other_seed_differs():
    loader = BatchLoader(_id_dataset(), 8, shuffle=True, augmentation=Augmentation(crop_padding=1, hflip=True))
    a, b, c = (list(loader.epoch(seed=s)) for s in (4, 4, 5))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in c]))


def test_start_batch_resumes_exactly():
    loader = BatchLoader(_id_dataset(), 8, shuffle=True, augmentation=Augmentation(crop_padding=1, hflip=True))
    full, resumed = list(loader.epoch(seed=9)), list(loader.epoch(seed=9, start_batch=5))
    assert len(resumed) == len(full) - 5
    assert all(torch.equal(xr, xf) and torch.equal(yr, yf) for (xr, yr), (xf, yf) in zip(resumed, full[5:]))


def test_unshuffled_order_and_drop_last():
    loader = BatchLoader(_id_dataset(), 10, drop_last=True)
    batches = list(loader.epoch())
    assert len(loader) == len(batches) == 10
    assert torch.cat([y for _, y in batches]).tolist() == list(range(100))


def test_plain_epoch_leaves_global_random_state_alone():
    state = torch.get_rng_state()
    list(BatchLoader(_id_dataset(), 10).epoch())
    assert torch.equal(torch.get_rng_state(), state)


def test_start_batch_out_of_range_is_refused():
    with pytest.raises(CardkitError, match="start_batch=12 is outside 0..11"):
        next(BatchLoader(_id_dataset(), 10).epoch(start_batch=12))
