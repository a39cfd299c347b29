"""The official CIFAR-10-C layout (written and read), corruption evaluation and its error measures."""

import numpy as np
import pytest
import torch

from cardkit.corrupt import corrupt, expand_names
from cardkit.corrupt.files import CorruptedSuite, GeneratedSuite, write_suite
from cardkit.data import ArrayDataset
from cardkit.errors import CardkitError
from cardkit.eval.corruption import CorruptionResult, evaluate_corruptions, with_baseline


def official_folder(tmp_path, n=4, shape=(32, 32, 3), names=("gaussian_noise", "fog")):
    """A folder exactly as CIFAR-10-C ships: uint8 (5 n) x H x W x C per corruption, uint8 labels."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    np.save(tmp_path / "labels.npy", np.tile(labels, 5))
    arrays = {}
    for name in names:
        arrays[name] = rng.integers(0, 256, (5 * n, *shape), dtype=np.uint8)
        np.save(tmp_path / f"{name}.npy", arrays[name])
    return labels, arrays


def test_reads_the_official_layout_by_severity(tmp_path):
    labels, arrays = official_folder(tmp_path)
    suite = CorruptedSuite(tmp_path)
    assert suite.size == 4 and suite.names == ["gaussian_noise", "fog"]
    data = suite.load("fog", 3)
    assert data.images.shape == (4, 3, 32, 32) and data.images.dtype == torch.uint8
    np.testing.assert_array_equal(data.images.permute(0, 2, 3, 1).numpy(), arrays["fog"][8:12])
    np.testing.assert_array_equal(data.labels.numpy(), labels)


def test_official_folder_errors(tmp_path):
    official_folder(tmp_path)
    with pytest.raises(CardkitError, match="lacks snow.npy"):
        CorruptedSuite(tmp_path).check(["snow"])
    np.save(tmp_path / "fog.npy", np.zeros((19, 32, 32, 3), np.uint8))
    with pytest.raises(CardkitError, match="expected uint8 20 x H x W x C"):
        CorruptedSuite(tmp_path).load("fog", 1)
    np.save(tmp_path / "fog.npy", np.zeros((20, 32, 32, 3), np.float32))
    with pytest.raises(CardkitError, match="holds float32"):
        CorruptedSuite(tmp_path).load("fog", 1)
    np.save(tmp_path / "fog.npy", np.array([{"payload": 1}] * 20, dtype=object), allow_pickle=True)
    with pytest.raises(CardkitError, match="not a readable .npy"):
        CorruptedSuite(tmp_path).load("fog", 1)  # object arrays would unpickle: refused
    with pytest.raises(CardkitError, match="from 1 to 5"):
        CorruptedSuite(tmp_path).load("gaussian_noise", 6)
    (tmp_path / "labels.npy").unlink()
    with pytest.raises(CardkitError, match="labels.npy' is missing"):
        CorruptedSuite(tmp_path)
    with pytest.raises(CardkitError, match="does not exist"):
        CorruptedSuite(tmp_path / "nowhere")


def test_unknown_names_and_severities_are_user_errors():
    images = np.zeros((2, 8, 8, 1), np.uint8)
    with pytest.raises(CardkitError, match=r"unknown corruption 'fgo'; did you mean 'fog' or 'frost'\?.*valid: gaussian_noise"):
        corrupt(images, "fgo", 1)
    for severity in (0, 6, 2.5, True):
        with pytest.raises(CardkitError, match="from 1 to 5"):
            corrupt(images, "fog", severity)
    assert len(expand_names(["benchmark"])) == 15 and len(expand_names(["all"])) == 19
    assert expand_names(["fog", "extras", "fog"]) == ["fog", "speckle_noise", "gaussian_blur", "spatter", "saturate"]


def test_written_suite_reads_back_as_the_corruptions(tmp_path):
    generator = torch.Generator().manual_seed(0)
    dataset = ArrayDataset(torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8, generator=generator),
                           torch.arange(6))
    write_suite(dataset, tmp_path, ["brightness", "gaussian_noise"], seed=3)
    assert np.load(tmp_path / "gaussian_noise.npy").shape == (30, 28, 28, 1)
    suite = CorruptedSuite(tmp_path)
    nhwc = dataset.images.permute(0, 2, 3, 1).numpy()
    for name in ("brightness", "gaussian_noise"):
        loaded = suite.load(name, 2)
        np.testing.assert_array_equal(loaded.images.permute(0, 2, 3, 1).numpy(), corrupt(nhwc, name, 2, seed=3))
        assert loaded.labels.tolist() == list(range(6))
    generated = GeneratedSuite(dataset, seed=3).load("gaussian_noise", 2)
    assert torch.equal(generated.images, suite.load("gaussian_noise", 2).images)


def test_evaluation_counts_per_corruption_and_severity():
    labels = torch.tensor([0, 0, 0, 1])
    dataset = ArrayDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), labels)
    always_zero = lambda x: torch.tensor([[1.0, 0.0]]).expand(len(x), 2)  # noqa: E731
    results = evaluate_corruptions({"zero": always_zero}, GeneratedSuite(dataset), source="test",
                                   names=["fog", "gaussian_noise"], severities=[1, 5], clean=dataset,
                                   batch_size=3)
    result = results["zero"]
    assert result.accuracy == {"fog": [0.75, 0.75], "gaussian_noise": [0.75, 0.75]}
    assert result.clean_accuracy == 0.75 and result.mean_accuracy == 0.75
    assert result.to_dict()["heatmap"]["rows"] == ["fog", "gaussian_noise"]


def test_mce_and_relative_mce_against_a_baseline():
    baseline = CorruptionResult("b", 10, 0.9, [1, 2], {"fog": [0.8, 0.6], "speckle_noise": [0.5, 0.5]}, 0.7)
    model = CorruptionResult("m", 10, 0.8, [1, 2], {"fog": [0.7, 0.7], "speckle_noise": [0.9, 0.9]}, 0.7)
    scored = with_baseline(model, baseline)
    assert scored.corruption_error["fog"] == pytest.approx(0.6 / 0.6)
    assert scored.corruption_error["speckle_noise"] == pytest.approx(0.2 / 1.0)
    assert scored.mce == pytest.approx(1.0)  # the extra (speckle_noise) stays out of the mean
    assert scored.relative_mce == pytest.approx((0.6 - 0.4) / (0.6 - 0.2))
    assert CorruptionResult.from_dict(scored.to_dict()) == scored
    other = CorruptionResult("o", 10, 0.8, [3], {"fog": [0.7]}, 0.7)
    with pytest.raises(CardkitError, match="other corruptions or severities"):
        with_baseline(other, baseline)
