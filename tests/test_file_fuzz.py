"""Files from strangers: truncated, bit-flipped and crafted `.card` files, checkpoints and dataset
files give one-line CardkitErrors (never another exception type), and loading them allocates no
more than their stored tensors justify.

The fuzzing runs in a child process under an address-space limit (RLIMIT_AS), so a loader that
trusted a claimed width fails there quickly instead of exhausting this machine, and the child
reports its peak memory growth (ru_maxrss).
"""

import gzip
import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cardkit.errors import CardkitError

SEED = 0
ADDRESS_SPACE_SLACK = 3 << 30  # the child may map this much beyond what it uses after warm-up
REFUSAL_GROWTH = 64 << 20  # refusing every crafted file may grow the peak memory by this much

HUGE = [10 ** 6, 10 ** 9, 2 ** 31, 2 ** 32 + 1, 2 ** 62, 2 ** 63, 10 ** 30, 1e6, 1e300, float("nan"),
        float("inf")]
ODD = [-1, -(2 ** 63), 0, 1, 2, 1.5, True, False, None, "1", "", "x" * 100, [], {}, [1], [10 ** 9] * 4,
       [[[]]], {"a": 1}]


# --- building the files (in the parent) --------------------------------------------------------


def _cards(folder: Path) -> dict[str, Path]:
    from cardkit.compress.artifact import save_artifact
    from cardkit.models import create_model
    from cardkit.prune import method_config, prune_model
    from cardkit.prune.structured import channel_masks, rebuild

    cards = {}
    for name, method, settings in [
        ("uniform", "magnitude", {"sparsity": 0.8, "quantize": {"bits": 4, "per_channel": True}}),
        ("kmeans", "hydra", {"sparsity": 0.9, "quantize": {"bits": 3, "scheme": "kmeans"}}),
        ("binary", "biprop", {"sparsity": 0.9}),
        ("atmc", "atmc", {"sparsity": 0.9, "bits": 4}),
    ]:
        torch.manual_seed(0)
        setup = prune_model(create_model("cnn_small", 10, 1, 8), method_config(method, **settings))
        if method == "atmc":
            setup.after_step(1, 1)
        save_artifact(setup.model.eval(), folder / f"{name}.card")
        cards[name] = folder / f"{name}.card"
    dense = create_model("cnn_small", 10, 1, 8)
    save_artifact(dense.eval(), folder / "dense.card")
    save_artifact(rebuild(dense, channel_masks(dense, 0.5)).eval(), folder / "structured.card")
    cards.update(dense=folder / "dense.card", structured=folder / "structured.card")
    return cards


def _empty_card(path: Path) -> int:
    """A legitimate card whose weights are all zero: a few kilobytes that declare ~85 MB of
    float32 weights. Returns the declared bytes."""
    from cardkit.compress.artifact import save_artifact
    from cardkit.models import create_model
    from cardkit.prune import prunable_layers

    model = create_model("cnn_small", 10, 3, 32, width=10)
    with torch.no_grad():
        for _, layer in prunable_layers(model):
            layer.weight.zero_()
    save_artifact(model.eval(), path)
    return 4 * sum(p.numel() for p in model.parameters()) + 4 * 6  # + the normalization buffers


# --- the child ---------------------------------------------------------------------------------


def _split(data: bytes) -> tuple[dict, dict]:
    from safetensors.numpy import load as load_arrays

    length = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8:8 + length])["__metadata__"]["cardkit"]), dict(load_arrays(data))


def _join(header: dict, arrays: dict) -> bytes:
    """A file with the checksum recomputed, so that a crafted header reaches the checks behind it."""
    from safetensors.numpy import save as save_arrays

    from cardkit.compress.artifact import _digest

    if isinstance(header, dict):
        header = {**header, "sha256": _digest(arrays)}
    return save_arrays(arrays, metadata={"cardkit": header if isinstance(header, str) else json.dumps(header)})


def _paths(value, prefix=()):
    """Every place in a JSON value, as a tuple of keys and indices."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:6]):
            yield from _paths(item, (*prefix, index))


def _replace(value, path, new):
    if not path:
        return new
    value = json.loads(json.dumps(value))
    holder = value
    for key in path[:-1]:
        holder = holder[key]
    if new is _DELETE:
        del holder[path[-1]]
    else:
        holder[path[-1]] = new
    return value


_DELETE = object()


def _card_cases(cards: dict[str, Path], rng: random.Random):
    """(label, file bytes) of truncated, bit-flipped and crafted cards."""
    for name, path in cards.items():
        data = path.read_bytes()
        header_end = 8 + int.from_bytes(data[:8], "little")
        for cut in sorted({0, 7, 8, 9, header_end - 1, header_end, header_end + 1, len(data) - 1,
                           *rng.sample(range(len(data)), 6)}):
            yield f"{name}: cut at {cut}", data[:cut]
        for _ in range(10):
            flipped = bytearray(data)
            bit = rng.randrange(8 * (header_end if rng.random() < 0.7 else len(data)))
            flipped[bit // 8] ^= 1 << (bit % 8)
            yield f"{name}: bit {bit} flipped", bytes(flipped)
        header, arrays = _split(data)
        places = [p for p in _paths(header) if p and p[0] != "sha256"]
        for _ in range(40 if name in ("uniform", "atmc", "structured") else 15):
            place = rng.choice(places)
            new = rng.choice([_DELETE, *HUGE, *ODD])
            if place[-1] == "mean" or place[-1] == "std":
                new = [0.0] * rng.choice([0, 2, 10 ** 5])
            shown = "deleted" if new is _DELETE else str(new)[:30]
            yield f"{name}: header{list(place)} = {shown}", _join(_replace(header, place, new), arrays)
        yield f"{name}: header is a list", _join([header], arrays)
        yield f"{name}: an extra tensor", _join(header, {**arrays, "extra": np.zeros(3, np.uint8)})
        yield f"{name}: a 2-d tensor", _join(header, {**arrays, "other": arrays["other"].reshape(1, -1)})
        nested = json.dumps({**header, "arch": None}).replace("null", "[" * 100000 + "]" * 100000)
        yield f"{name}: nested header", _join(nested, arrays)


def _crafted_cards(cards: dict[str, Path]):
    """(label, file bytes, a fragment the error must contain) of files made to allocate."""
    header, arrays = _split(cards["uniform"].read_bytes())
    arch = header["arch"]
    for width in (1e6, 10 ** 6, 10 ** 4, 30, 2):  # 3e16 bytes ... a slightly wider model
        yield f"width {width}", _join({**header, "arch": {**arch, "kwargs": {"width": width}}}, arrays), "corrupt"
    channels = 10 ** 5  # consistent mean and std: in_channels is bounded by the header's length
    yield "in_channels 1e5", _join({**header, "arch": {**arch, "in_channels": channels, "mean": [0.0] * channels,
                                                       "std": [1.0] * channels}}, arrays), "corrupt"
    yield "in_channels 1e12", _join({**header, "arch": {**arch, "in_channels": 10 ** 12}}, arrays), "one number per"
    yield "input_size 1e9", _join({**header, "arch": {**arch, "input_size": 10 ** 9}}, arrays), "corrupt"
    yield "num_classes 1e9", _join({**header, "arch": {**arch, "num_classes": 10 ** 9}}, arrays), "corrupt"
    wrn = {**arch, "name": "wrn", "kwargs": {"depth": 6 * 10 ** 8 + 4, "width": 1, "dropout": 0.0}}
    yield "wrn depth 6e8+4", _join({**header, "arch": wrn}, arrays), "larger model"
    yield "version '1'", _join({**header, "version": "1"}, arrays), "malformed format version '1'"
    yield "version 1.0", _join({**header, "version": 1.0}, arrays), "malformed format version 1.0"
    yield "version -1", _join({**header, "version": -1}, arrays), "malformed"
    yield "version 2", _join({**header, "version": 2}, arrays), "newer than this cardkit"
    # consistent but huge: every weight pruned, so the positions take no bytes at all
    empty = {**header["tensors"][2], "shape": [10 ** 5, 10 ** 5], "kept": 0, "positions": ["gaps", 1, 0],
             "scheme": "float", "bits": 32, "rows": 1, "table": 0}
    tensors = [empty if i == 2 else t for i, t in enumerate(header["tensors"])]
    yield "a 1e10-weight empty layer", _join({**header, "tensors": tensors},
                                             {**arrays, empty["name"]: np.zeros(0, np.uint8)}), "limit"
    listed = [[n, [10 ** 5, 10 ** 5]] if i == 0 else [n, s] for i, (n, s) in enumerate(header["other"])]
    yield "a 1e10-value bias", _join({**header, "other": listed}, arrays), "limit"
    gaps = {**header["tensors"][0], "positions": ["gaps", 1, 10 ** 12]}
    yield "1e12 gap entries", _join({**header, "tensors": [gaps, *header["tensors"][1:]]}, arrays), "corrupt"
    structured, s_arrays = _split(cards["structured"].read_bytes())
    first = next(iter(structured["arch"]["structured"]))
    s_arch = {**structured["arch"], "kwargs": {"width": 10 ** 3}}
    yield "structured base of width 1e3", _join({**structured, "arch": s_arch}, s_arrays), "larger model"
    s_arch = {**structured["arch"], "structured": {first: 10 ** 9}}
    yield "structured kept 1e9", _join({**structured, "arch": s_arch}, s_arrays), "invalid"


def _checkpoint_cases(folder: Path):
    """(label, text of meta.json, fragment) for a checkpoint folder; model.safetensors is kept, so
    its recorded size and sha256 stay valid."""
    meta = json.loads((folder / "meta.json").read_text())
    arch = meta["arch"]
    edits = [
        ("width 1e6", {**meta, "arch": {**arch, "kwargs": {"width": 10 ** 6}}}, "corrupt"),
        ("width 2", {**meta, "arch": {**arch, "kwargs": {"width": 2}}}, "corrupt"),
        ("in_channels 1e12", {**meta, "arch": {**arch, "in_channels": 10 ** 12}}, "one number per"),
        ("wrn depth 6e8+4", {**meta, "arch": {**arch, "name": "wrn", "kwargs": {
            "depth": 6 * 10 ** 8 + 4, "width": 1, "dropout": 0.0}}}, "larger model"),
        ("arch a list", {**meta, "arch": [1, 2]}, "not a mapping"),
        ("arch without a name", {**meta, "arch": {k: v for k, v in arch.items() if k != "name"}}, "lacks"),
        ("version '1'", {**meta, "version": "1"}, "malformed format version '1'"),
        ("version 2", {**meta, "version": 2}, "newer than this cardkit"),
        ("meta a list", [meta], "not a cardkit checkpoint"),
        ("a file outside the folder", {**meta, "files": {"/dev/zero": {"bytes": 0, "sha256": ""}}}, "outside"),
        ("files malformed", {**meta, "files": {"model.safetensors": 3}}, "malformed"),
    ]
    for label, edited, fragment in edits:
        yield f"checkpoint {label}", json.dumps(edited), fragment
    yield "checkpoint nested JSON", "[" * 100000 + "]" * 100000, "not valid JSON"


def _dataset_cases(folder: Path):
    """(label, reader, path, fragment) of idx, CIFAR and pickle files that claim more than they hold."""
    def idx(name, magic, dims, body=b"", gz=False):
        data = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + body
        return _write(folder / (name + (".gz" if gz else "")), gzip.compress(data) if gz else data)

    yield "idx 4e9 images", "idx", idx("a", 2051, [2 ** 32 - 1, 28, 28], bytes(100)), "declares"
    yield "idx 7e28 images, gzip", "idx", idx("b", 2051, [2 ** 32 - 1] * 3, bytes(100), gz=True), "declares"
    yield "idx 1e6 labels in 1 MB of zeros, gzip", "idx", idx("b2", 2049, [10 ** 9], bytes(10 ** 6), gz=True), "declares"
    yield "idx dims past the end", "idx", idx("c", 2051, [1]), "cut short"
    yield "idx 255 dims", "idx", idx("d", 0x08FF, [1] * 255), "magic"
    yield "idx truncated body", "idx", idx("e", 2049, [10], bytes(5)), "declares"
    yield "idx gzip garbage", "idx", _write(folder / "f.gz", b"\x1f\x8b\x08\x00" + bytes(30)), "cannot read"
    yield "cifar bin odd size", "cifar", _write(folder / "g.bin", bytes(3073 * 2 + 5)), "multiple"
    memo = b"\x80\x04}r" + struct.pack("<I", 0x7FFFFFF0) + b"."  # a memo slot at index 2^31
    yield "pickle memo at 2^31", "pickle", _write(folder / "h", memo), "lack b'data'"
    bytes8 = b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"abc"  # 1 TB of bytes announced
    yield "pickle 1 TB bytes", "pickle", _write(folder / "i", bytes8), "cannot unpickle"
    yield "pickle array at 1e12", "pickle", _write(folder / "j", _reconstruct_pickle((10 ** 6, 10 ** 6))), "cannot unpickle"
    yield "pickle of a list", "pickle", _write(folder / "k", b"\x80\x04]."), "not a dict"
    yield "pickle of other keys", "pickle", _write(folder / "l", b"\x80\x04}K\x01K\x02s."), "lack b'data'"


def _reconstruct_pickle(shape) -> bytes:
    """A pickle that calls numpy's _reconstruct(ndarray, shape, b'b') itself (numpy writes (0,))."""
    dims = b"(" + b"".join(b"I%d\n" % d for d in shape) + b"t"
    return (b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + dims + b"U\x01b\x87R"
            b"}\x8c\x04dataK\x00s.")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _child(folder: Path) -> dict:
    import resource

    torch.set_num_threads(1)
    import cardkit
    from cardkit.data.formats import read_cifar, read_cifar_pickle, read_idx
    from cardkit.engine.checkpoint import load_checkpoint

    cards = {p.stem: p for p in sorted((folder / "cards").glob("*.card"))}
    for path in cards.values():  # warm up every code path once
        cardkit.load_artifact(path)
    load_checkpoint(folder / "checkpoint", "last")
    status = Path("/proc/self/status").read_text()
    mapped = int(next(line for line in status.splitlines() if line.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mapped + ADDRESS_SPACE_SLACK, resource.RLIM_INFINITY))
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    failures, outcomes, target = [], {"refused": 0, "loaded": 0}, folder / "case.card"

    def attempt(label, call, fragment=None, must_refuse=False):
        try:
            call()
        except CardkitError as err:
            message = str(err)
            if "\n" in message or (fragment and fragment not in message):
                failures.append(f"{label}: message {message!r} (expected one line with {fragment!r})")
            outcomes["refused"] += 1
            return
        except BaseException as err:  # noqa: B902  (what the test is about: no other exception type)
            failures.append(f"{label}: {type(err).__name__}: {str(err)[:200]}")
            return
        outcomes["loaded"] += 1
        if must_refuse:
            failures.append(f"{label}: loaded without an error")

    def load(data):
        target.write_bytes(data)
        return lambda: cardkit.load_artifact(target)

    rng = random.Random(SEED)
    for label, data in _card_cases(cards, rng):
        attempt(label, load(data))
    for label, data, fragment in _crafted_cards(cards):
        attempt(label, load(data), fragment, must_refuse=True)
    checkpoint = next((folder / "checkpoint").glob("epoch*"))
    original = (checkpoint / "meta.json").read_text()
    for label, text, fragment in _checkpoint_cases(checkpoint):
        (checkpoint / "meta.json").write_text(text)
        attempt(label, lambda: load_checkpoint(checkpoint.parent, "last"), fragment, must_refuse=True)
    (checkpoint / "meta.json").write_text(original)
    readers = {"idx": read_idx, "cifar": lambda p: read_cifar([p]), "pickle": lambda p: read_cifar_pickle(p, b"labels")}
    for label, reader, path, fragment in _dataset_cases(folder / "data"):
        attempt(label, lambda: readers[reader](path), fragment, must_refuse=True)
    refusals = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start

    empty = folder / "empty.card"
    declared = json.loads((folder / "empty.json").read_text())["declared"]
    attempt("an empty card over max_bytes", lambda: cardkit.load_artifact(empty, max_bytes=declared - 1),
            "limit", must_refuse=True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    model = cardkit.load_artifact(empty)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    assert sum(p.numel() for p in model.parameters()) * 4 + 24 == declared
    return {"failures": failures, "outcomes": outcomes, "refusal_growth": refusals, "limit_growth": after,
            "load_growth": loaded, "declared": declared}


# --- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    from cardkit.engine.checkpoint import save_checkpoint
    from cardkit.models import create_model

    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "cards").mkdir()
    (folder / "data").mkdir()
    _cards(folder / "cards")
    declared = _empty_card(folder / "empty.card")
    (folder / "empty.json").write_text(json.dumps({"declared": declared}))
    model = create_model("cnn_small", 10, 1, 8)
    save_checkpoint(folder / "checkpoint", model_state=model.state_dict(),
                    meta={"stage": "pretrain", "state": {"epoch": 1, "step": 1}, "arch": model.arch})
    result = subprocess.run([sys.executable, __file__, str(folder)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_every_damaged_or_crafted_file_is_a_one_line_cardkit_error(fuzzed):
    assert fuzzed["failures"] == []
    assert fuzzed["outcomes"]["refused"] > 300


def test_refusing_crafted_files_allocates_nothing_they_claim(fuzzed):
    assert fuzzed["refusal_growth"] < REFUSAL_GROWTH, fuzzed
    assert fuzzed["limit_growth"] < REFUSAL_GROWTH, fuzzed


def test_a_file_within_the_limit_takes_memory_in_proportion_to_what_it_declares(fuzzed):
    # ~85 MB declared by a file of a few kilobytes: the model, the decoded weights and the
    # per-tensor decoding buffers stay within a small multiple of it
    assert fuzzed["load_growth"] < 4 * fuzzed["declared"], fuzzed


def test_the_default_limit_holds_for_a_consistent_file(tmp_path):
    """A header that agrees with its tensors, its checksum and its architecture, but declares a
    model beyond the limit, is refused before the architecture is built."""
    import cardkit
    from cardkit.compress.artifact import MAX_BYTES

    source = tmp_path / "empty.card"
    declared = _empty_card(source)
    with pytest.raises(CardkitError, match="more than the limit"):
        cardkit.load_artifact(source, max_bytes=declared // 2)
    assert declared < MAX_BYTES
    with pytest.raises(CardkitError, match="max_bytes"):
        cardkit.load_artifact(source, max_bytes=-1)


def test_a_widened_checkpoint_is_refused_before_its_model_is_built(tmp_path):
    from cardkit.engine.checkpoint import save_checkpoint
    from cardkit.engine.pipeline import _find_checkpoint, model_from_checkpoint
    from cardkit.models import create_model

    model = create_model("cnn_small", 10, 1, 8)
    folder = save_checkpoint(tmp_path / "checkpoints", model_state=model.state_dict(),
                             meta={"stage": "pretrain", "state": {"epoch": 1, "step": 1}, "arch": model.arch})
    meta = json.loads((folder / "meta.json").read_text())
    for width, fragment in [(10 ** 6, "larger model"), (2, "stores it as")]:
        meta["arch"]["kwargs"]["width"] = width  # the weights' recorded size and sha256 still match
        (folder / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(CardkitError, match=fragment):
            model_from_checkpoint(_find_checkpoint(tmp_path, "last"))


@pytest.mark.parametrize("rewrite", ["deflated", "legacy"])
def test_an_optimizer_state_torch_save_never_writes_is_refused_before_torch_load(tmp_path, rewrite):
    """A deflated zip entry makes torch allocate the size it claims before inflating it, and
    the legacy format allocates storages at sizes its pickle claims."""
    import zipfile

    from cardkit.engine.checkpoint import _sha256, load_checkpoint, save_checkpoint
    from cardkit.models import create_model

    model = create_model("cnn_small", 10, 1, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    folder = save_checkpoint(tmp_path / "checkpoints", model_state=model.state_dict(),
                             optimizer_state=optimizer.state_dict(),
                             meta={"stage": "pretrain", "state": {"epoch": 1, "step": 1}, "arch": model.arch})
    assert load_checkpoint(tmp_path / "checkpoints").optimizer_state() is not None
    file = folder / "optimizer.pt"
    if rewrite == "deflated":
        with zipfile.ZipFile(file) as source:
            records = [(info.filename, source.read(info)) for info in source.infolist()]
        with zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED) as target:
            for name, data in records:
                target.writestr(name, data)
    else:
        torch.save(optimizer.state_dict(), file, _use_new_zipfile_serialization=False)
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"]["optimizer.pt"] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CardkitError, match="torch.save"):
        load_checkpoint(tmp_path / "checkpoints").optimizer_state()


def test_checking_an_architecture_draws_no_random_numbers():
    from cardkit.models import create_model
    from cardkit.models.bounded import build_on_meta

    state = torch.random.get_rng_state()
    model = build_on_meta(lambda: create_model("wrn_28_10", 10, 3, 32), entries=200, nbytes=200 << 20, what="x")
    assert torch.equal(state, torch.random.get_rng_state())
    assert next(model.parameters()).is_meta


if __name__ == "__main__":
    print(json.dumps(_child(Path(sys.argv[1]))))
