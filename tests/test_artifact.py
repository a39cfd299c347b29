"""The compressed file: exact round trips for every pruner and quantizer, bytes close to the
accounted size, and clear errors for truncated, tampered, pickled, newer or inconsistent files."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

import cardkit
from cardkit.compress import model_size
from cardkit.compress.artifact import _digest, save_artifact
from cardkit.errors import CardkitError
from cardkit.models import create_model
from cardkit.prune import method_config, prune_model

METHODS = [
    ("dense", {}),
    ("magnitude", {"sparsity": 0.9}),
    ("magnitude", {"sparsity": 0.8, "quantize": {"bits": 4, "per_channel": True}}),
    ("magnitude", {"sparsity": 0.5, "quantize": {"bits": 1, "per_channel": True}}),
    ("hydra", {"sparsity": 0.9, "quantize": {"bits": 3, "scheme": "kmeans"}}),
    ("hydra", {"sparsity": 0.95, "scope": "global", "quantize": {"bits": 8}}),
    ("biprop", {"sparsity": 0.9}),
    ("edge_popup", {"sparsity": 0.7}),
    ("atmc", {"sparsity": 0.9, "bits": 4}),
    ("atmc", {"size_ratio": 0.05, "bits": 2, "rank": 0.5}),
]


def compressed(method: str, settings: dict, size: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("cnn_small", 10, 3, size)
    if method != "dense":
        setup = prune_model(model, method_config(method, **settings))
        model = setup.model
        if method == "atmc":
            setup.after_step(1, 1)  # the stage's last step: final projection and quantization
    return model.eval()


@pytest.mark.parametrize("method,settings", METHODS)
def test_round_trip_reproduces_the_outputs_exactly(tmp_path, method, settings):
    model = compressed(method, settings)
    written = save_artifact(model, tmp_path / "m.card")
    loaded = cardkit.load_artifact(tmp_path / "m.card")
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not any(hasattr(m, "mask") for m in loaded.modules())  # a plain model
    accounted = model_size(model).bytes
    assert accounted <= written <= accounted + 4096  # the streams, byte padding and the headers


def test_quantized_layers_hold_at_most_2_to_the_bits_values(tmp_path):
    for bits, scheme in [(2, "uniform"), (3, "kmeans"), (4, "uniform")]:
        model = compressed("magnitude", {"sparsity": 0.5, "quantize": {"bits": bits, "scheme": scheme}})
        save_artifact(model, tmp_path / "m.card")
        loaded = cardkit.load_artifact(tmp_path / "m.card")
        for name in ("conv1", "conv2", "fc1", "fc2"):
            assert getattr(loaded, name).weight.unique().numel() <= 2 ** bits  # zero included


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / "m.card"
    save_artifact(compressed("magnitude", {"sparsity": 0.9, "quantize": {"bits": 4}}), path)
    return path


def rewrite(path, edit_header=None, edit_arrays=None, digest=True):
    """Re-save an artifact with its header or arrays changed (the checksum recomputed if asked)."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8:8 + length])["__metadata__"]["cardkit"])
    arrays = dict(load_arrays(data))
    if edit_arrays:
        edit_arrays(arrays)
    if edit_header:
        edit_header(header)
    if digest:
        header["sha256"] = _digest(arrays)
    path.write_bytes(save_arrays(arrays, metadata={"cardkit": json.dumps(header)}))


def test_truncated_artifact_is_a_clear_error(artifact):
    data = artifact.read_bytes()
    for cut in (4, 100, len(data) - 10):
        artifact.write_bytes(data[:cut])
        with pytest.raises(CardkitError, match="truncated"):
            cardkit.load_artifact(artifact)


def test_tampered_tensor_bytes_fail_the_checksum(artifact):
    data = bytearray(artifact.read_bytes())
    data[-3] ^= 0xFF
    artifact.write_bytes(bytes(data))
    with pytest.raises(CardkitError, match="checksum"):
        cardkit.load_artifact(artifact)


def test_newer_format_version_asks_for_an_upgrade(artifact):
    rewrite(artifact, edit_header=lambda h: h.update(version=h["version"] + 1))
    with pytest.raises(CardkitError, match="newer than this cardkit"):
        cardkit.load_artifact(artifact)


@pytest.mark.parametrize("edit", [
    lambda h: h["tensors"][1].update(kept=h["tensors"][1]["kept"] + 1),
    lambda h: h["tensors"][0].update(shape=[8, 3, 4, 4]),
    lambda h: h["tensors"][2].update(bits=5),
    lambda h: h["tensors"][0]["positions"].__setitem__(2, 3),
    lambda h: h["other"].append(["conv9.bias", [3]]),
    lambda h: h["other"][0].__setitem__(1, [2, 2]),
    lambda h: h["tensors"].pop(),
])
def test_header_and_tensors_that_disagree_are_refused(artifact, edit):
    rewrite(artifact, edit_header=edit)
    with pytest.raises(CardkitError, match="corrupt or (was )?edited"):
        cardkit.load_artifact(artifact)


def test_missing_tensor_is_refused(artifact):
    rewrite(artifact, edit_arrays=lambda a: a.pop("fc1.weight"))
    with pytest.raises(CardkitError, match="no matching tensor"):
        cardkit.load_artifact(artifact)


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payload_is_refused_without_executing_it(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.card"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    with pytest.raises(CardkitError, match="never unpickles"):
        cardkit.load_artifact(path)
    torch.save({"weights": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CardkitError, match="never unpickles"):
        cardkit.load_artifact(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_safetensors_file_without_a_cardkit_header_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    path.write_bytes(save_arrays({"w": np.zeros(3, np.float32)}))
    with pytest.raises(CardkitError, match="not a cardkit artifact"):
        cardkit.load_artifact(path)


def test_onnx_export_runs_in_onnxruntime_with_the_same_outputs(tmp_path):
    pytest.importorskip("onnxruntime")
    from cardkit.compress.onnx import onnx_outputs, save_onnx

    model = compressed("hydra", {"sparsity": 0.9, "quantize": {"bits": 4, "scheme": "kmeans"}})
    save_artifact(model, tmp_path / "m.card")
    loaded = cardkit.load_artifact(tmp_path / "m.card")
    save_onnx(loaded, torch.rand(2, 3, 16, 16), tmp_path / "m.onnx")
    x = torch.rand(5, 3, 16, 16)  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(onnx_outputs(tmp_path / "m.onnx", x) - expected).max() < 1e-5


def test_a_model_no_registry_knows_loads_only_into_an_instance(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    save_artifact(model, tmp_path / "m.card")
    with pytest.raises(CardkitError, match=r"user-defined model \(torch.nn.modules.container.Sequential\).*"
                                           r"load_artifact\(path, model=MyNet\(\)\)"):
        cardkit.load_artifact(tmp_path / "m.card")
    loaded = cardkit.load_artifact(tmp_path / "m.card", model=torch.nn.Sequential(torch.nn.Linear(3, 2)))
    x = torch.rand(4, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
