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


# ---- each consistency check, isolated ----------------------------------------------------------
# The fixture: cnn_small on 3 x 16 x 16, magnitude 90% with 4-bit uniform levels. Its conv1.weight
# entry is {"shape": [16, 3, 4, 4], "scheme": "uniform", "bits": 4, "rows": 1, "kept": 77,
# "table": 1, "positions": ["gaps", 4, 98]}: 49 bytes of gaps, 39 of codes and 4 of scale, 92 in all.
# Every case edits one field (and, where a check reads two fields, keeps the other consistent), the
# checksum recomputed, so that only the named check can refuse the file.

def _entry(h, name="conv1.weight"):
    return next(t for t in h["tensors"] if t["name"] == name)


def _drop_other(h, a, name):
    """Remove `name` from the `other` list and its values from the `other` tensor."""
    sizes = [int(np.prod(shape)) for _, shape in h["other"]]
    index = [n for n, _ in h["other"]].index(name)
    start = sum(sizes[:index])
    a["other"] = np.delete(a["other"], np.arange(start, start + sizes[index]))
    del h["other"][index]


def _declared(h):
    return 4 * sum(int(np.prod(t["shape"])) for t in h["tensors"]) + 4 * sum(int(np.prod(s)) for _, s in h["other"])


ISOLATED = {
    "format": (lambda h, a: h.update(format="other"), r"is not a cardkit artifact \(format 'other'\)"),
    "version malformed": (lambda h, a: h.update(version=0), r"has a malformed format version 0 \(an integer >= 1"),
    "version newer": (lambda h, a: h.update(version=2), r"has format version 2, newer than this cardkit reads \(1\)"),
    "no arch": (lambda h, a: h.pop("arch"), r"its header lacks the tensors, other or arch entries"),
    "tensors not a list": (lambda h, a: h.update(tensors={}), r"its header lacks the tensors, other or arch entries"),
    "entry without a name": (lambda h, a: _entry(h).pop("name"), r"the header entry of None has no name"),
    "entry without its tensor": (lambda h, a: a.update({"conv9.weight": a.pop("conv1.weight")}),
                                 r"the header entry of 'conv1.weight' has no matching tensor"),
    "entry lacks a field": (lambda h, a: _entry(h).pop("rows"), r"of 'conv1.weight' is malformed \('rows'\)"),
    "shape not a list": (lambda h, a: _entry(h).update(shape="16x3"),
                         r"gives conv1.weight the shape '16x3', not a list of at most 8 non-negative integers"),
    "shape of 9 dims": (lambda h, a: _entry(h).update(shape=[16, 3, 4, 4, 1, 1, 1, 1, 1]),
                        r"gives conv1.weight the shape \[16, 3, 4, 4, 1, 1, 1, 1, 1\], not a list of at most 8"),
    "unknown scheme": (lambda h, a: _entry(h).update(scheme="zip"),
                       r"of 'conv1.weight' has an unknown scheme 'zip' or positions format 'gaps'"),
    "unknown positions format": (lambda h, a: _entry(h)["positions"].__setitem__(0, "runs"),
                                 r"has an unknown scheme 'uniform' or positions format 'runs'"),
    "negative count": (lambda h, a: _entry(h).update(kept=-1),
                       r"of 'conv1.weight' has a count, width or size that is not a non-negative integer"),
    "boolean width": (lambda h, a: _entry(h)["positions"].__setitem__(1, True),
                      r"has a count, width or size that is not a non-negative integer"),
    "bits below the scheme's": (lambda h, a: _entry(h).update(bits=1), r"gives uniform values 1 bits, outside 2\.\.8"),
    "bits above the scheme's": (lambda h, a: _entry(h).update(bits=9), r"gives uniform values 9 bits, outside 2\.\.8"),
    "kept beyond the weights": (lambda h, a: _entry(h).update(kept=769), r"keeps 769 of 768 weights in gaps positions"),
    "dense but not all kept": (lambda h, a: _entry(h).update(positions=["dense", 0, 0]),
                               r"keeps 77 of 768 weights in dense positions"),
    "table rows": (lambda h, a: _entry(h).update(rows=2),
                   r"has 2 table rows; 1 or the 16 output channels are valid"),
    "gap width 0": (lambda h, a: _entry(h)["positions"].__setitem__(1, 0),
                    r"has 98 gap entries of 0 bits for 77 kept of 768 weights"),
    "fewer gap entries than kept": (lambda h, a: _entry(h)["positions"].__setitem__(2, 76),
                                    r"has 76 gap entries of 4 bits for 77 kept of 768 weights"),
    # 768 // 15 escapes at most, plus one: 77 + 51 + 1 = 129 entries
    "too many gap entries": (lambda h, a: _entry(h)["positions"].__setitem__(2, 130),
                             r"has 130 gap entries of 4 bits for 77 kept of 768 weights"),
    "bitmap with a width": (lambda h, a: _entry(h).update(positions=["bitmap", 4, 0]),
                            r"has bitmap positions with a width or entries"),
    # 49 + ceil(77 * 5 / 8) + 4 = 102 bytes for 5-bit codes; 92 stored
    "stream length": (lambda h, a: _entry(h).update(bits=5),
                      (r"the header and the tensor of conv1\.weight disagree \(77 kept values of 5 bits need "
                       r"102 bytes, 92 are stored\)")),
    # two scales where one table row is declared: the lengths agree (96 bytes) but not the table
    "table size": (lambda h, a: (_entry(h).update(table=2),
                                 a.update({"conv1.weight": np.concatenate([a["conv1.weight"], np.zeros(4, np.uint8)])})),
                   r"77 kept values of 4 bits need 96 bytes, 96 are stored"),
    "other entry not a pair": (lambda h, a: h["other"].__setitem__(0, "conv1.bias"),
                               r"the header's other entry 'conv1\.bias' is not \[name, shape\]"),
    "other shape negative": (lambda h, a: h["other"][0].__setitem__(1, [-16]),
                             r"gives conv1\.bias the shape \[-16\], not a list"),
    "listed twice": (lambda h, a: h["other"].append(["conv1.weight", [0]]), r"its header lists a tensor twice"),
    "a tensor named other": (lambda h, a: h["other"].append(["other", [0]]), r"its header lists a tensor twice"),
    "unlisted tensor": (lambda h, a: a.update(extra=np.zeros(3, np.uint8)),
                        r"stores tensors its header does not list \(extra\)"),
    "no other tensor": (lambda h, a: (a.pop("other"), h.update(other=[])),
                        r"stores tensors its header does not list \(no 'other'\)"),
    "record not a mapping": (lambda h, a: h.update(arch=["cnn_small"]),
                             r"its architecture record is a list, not a mapping"),
    "record lacks a field": (lambda h, a: h["arch"].pop("input_size"), r"its architecture record lacks input_size"),
    "mean per channel": (lambda h, a: h["arch"].update(mean=[0.0, 0.0]),
                         r"gives mean=\[0\.0, 0\.0\] for in_channels=3; one number per channel"),
    "a layer without a weight": (lambda h, a: (h["tensors"].remove(_entry(h, "fc2.weight")), a.pop("fc2.weight")),
                                 r"stores no weight for layer fc2 of the cnn_small architecture"),
    "a missing bias": (lambda h, a: _drop_other(h, a, "fc2.bias"),
                       r"its tensors do not fit the cnn_small architecture \(missing \['fc2\.bias'\], unexpected \[\]\)"),
    "an extra bias": (lambda h, a: (h["other"].append(["fc3.bias", [1]]),
                                    a.update(other=np.append(a["other"], np.float32(0)))),
                      r"\(missing \[\], unexpected \['fc3\.bias'\]\)"),
    "a bias of another shape": (lambda h, a: h["other"][0].__setitem__(1, [4, 4]),
                                r"conv1\.bias is \(4, 4\) in the file but \(16,\) in the cnn_small architecture"),
    "a weight of another shape": (lambda h, a: _entry(h).update(shape=[16, 3, 2, 8]),
                                  r"conv1\.weight is \(16, 3, 2, 8\) in the file but \(16, 3, 4, 4\)"),
    "other values": (lambda h, a: a.update(other=np.append(a["other"], np.float32(0))),
                     r"the header and the tensor 'other' disagree \(164 values listed, 165 stored\)"),
    "other dtype": (lambda h, a: a.update(other=a["other"].astype(np.float64)),
                    r"the header and the tensor 'other' disagree"),
}


@pytest.mark.parametrize("case", sorted(ISOLATED))
def test_each_consistency_check_refuses_a_file_that_fails_only_it(artifact, case):
    edit, message = ISOLATED[case]
    data = artifact.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8:8 + length])["__metadata__"]["cardkit"])
    arrays = dict(load_arrays(data))
    edit(header, arrays)
    header["sha256"] = _digest(arrays)
    artifact.write_bytes(save_arrays(arrays, metadata={"cardkit": json.dumps(header)}))
    with pytest.raises(CardkitError, match=message) as error:
        cardkit.load_artifact(artifact)
    assert "\n" not in str(error.value)


def test_the_unedited_fixture_passes_every_check(artifact):
    """The isolated cases above start from a file that loads; rewriting it unchanged keeps it so."""
    rewrite(artifact)
    cardkit.load_artifact(artifact)


def test_a_checksum_that_does_not_match_is_refused_before_any_other_check(artifact):
    rewrite(artifact, edit_header=lambda h: h.update(format="other"),
            edit_arrays=lambda a: a["other"].__setitem__(0, a["other"][0] + 1), digest=False)
    with pytest.raises(CardkitError, match="is not a cardkit artifact"):  # the format is read first
        cardkit.load_artifact(artifact)
    rewrite(artifact, edit_header=lambda h: h.update(format="cardkit-artifact"), digest=False)
    with pytest.raises(CardkitError, match=r"its tensors do not match the checksum in its header"):
        cardkit.load_artifact(artifact)


def test_a_model_larger_than_the_limit_is_refused_with_its_declared_size(artifact):
    data = artifact.read_bytes()
    length = int.from_bytes(data[:8], "little")
    declared = _declared(json.loads(json.loads(data[8:8 + length])["__metadata__"]["cardkit"]))
    assert declared == 4 * (768 + 8192 + 51200 + 1000) + 4 * 164  # cnn_small(3, 16): weights, then the rest
    with pytest.raises(CardkitError, match=rf"describes a model of {declared:,} bytes, more than the limit of "
                                           rf"{declared - 1:,}"):
        cardkit.load_artifact(artifact, max_bytes=declared - 1)
    cardkit.load_artifact(artifact, max_bytes=declared)  # exactly at the limit loads
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(CardkitError, match=rf"max_bytes={bad!r} is invalid"):
            cardkit.load_artifact(artifact, max_bytes=bad)


def test_gap_entries_past_the_last_weight_are_refused_when_decoded(artifact):
    """Every one of conv1's 98 4-bit gap entries set to 15, the escape: 98 x 15 positions skipped,
    the last at 1469, past the layer's 768 weights. Every length still agrees with the header."""
    def escapes(a):
        blob = a["conv1.weight"].copy()
        blob[:49] = 0xFF  # the 49 bytes of gaps
        a["conv1.weight"] = blob

    rewrite(artifact, edit_arrays=escapes)
    with pytest.raises(CardkitError, match=r"the header and the tensors of conv1\.weight disagree \(gap entries "
                                           r"reach position 1469, past the 768 weights\)"):
        cardkit.load_artifact(artifact)


def test_atmc_factors_of_a_rank_beyond_the_layer_are_refused(tmp_path):
    """conv1 is 16 x 48, so its factors' rank is at most 16. U declared 16 x 20, with its bitmap
    grown to 320 bits so that its stream length agrees."""
    path = tmp_path / "a.card"
    save_artifact(compressed("atmc", {"sparsity": 0.9, "bits": 4}), path)

    def wider(h):
        assert h["tensors"][0]["name"] == "conv1.u" and h["tensors"][0]["shape"] == [16, 4]
        assert h["tensors"][0]["positions"][0] == "bitmap"
        h["tensors"][0]["shape"] = [16, 20]

    rewrite(path, edit_header=wider, edit_arrays=lambda a: a.update(
        {"conv1.u": np.concatenate([a["conv1.u"][:8], np.zeros(32, np.uint8), a["conv1.u"][8:]])}))
    with pytest.raises(CardkitError, match=r"layer conv1 has factors of rank 20, outside 1\.\.16"):
        cardkit.load_artifact(path)
