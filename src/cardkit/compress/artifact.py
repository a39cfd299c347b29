"""The compressed model file (`.card`): one safetensors file whose bytes are the accounted size.

Tensors: one uint8 tensor per stored weight tensor (see `encode.py`), named like it, holding
    positions   the bitmap or gap-coded indices of the kept weights (nothing if dense),
    values      codes packed at `bits` bits each (binary: signs, 8 per byte), or the kept values
                of an unquantized tensor as little-endian float32,
    table       scales, alphas or the k-means codebook, little-endian float32 (nothing if none),
one after the other; and one float32 tensor `other` with every other parameter and buffer
(biases, normalization), flattened and concatenated in the order the header lists them.
The JSON header (safetensors metadata key "cardkit") holds the format version, the architecture,
what each tensor encodes (from which every length follows), and the sha256 of all tensor bytes.
The architecture is a registry model's `arch` record, from which the file alone rebuilds it, or,
for any other model, a record of kind "user": the class's qualified name and a fingerprint of the
names and shapes of the tensors a freshly built instance holds; such a file loads into an
instance the caller builds (`load_artifact(path, model=MyNet())`), checked against both.
Loading parses only JSON and raw arrays: nothing is ever unpickled. A file is not trusted: every
header field is type- and range-checked, the architecture is built on the meta device (shapes, no
storage) and compared with the header's tensors before anything is allocated, and the model a
file describes may take at most `max_bytes` (default `MAX_BYTES`) as float32 tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays
from torch import nn

from cardkit.compress.encode import FLOAT_BITS, EncodedTensor, decode_tensor
from cardkit.compress.packing import FORMATS, MAX_WIDTH, Positions
from cardkit.compress.quantize import MAX_BITS
from cardkit.compress.size import encode_model, other_tensors
from cardkit.compress.stored import factorized_weight
from cardkit.errors import CardkitError
from cardkit.fileio import check_format, output_file, write_bytes_atomic
from cardkit.models.arch import model_from_arch
from cardkit.models.layers import prunable_layers

FORMAT = "cardkit-artifact"
VERSION = 1
OTHER = "other"
MAX_BYTES = 1 << 30  # the default limit of load_artifact: a model of 2^28 float32 values
MAX_HEADER_BYTES = 8 << 20  # a header lists ~150 bytes per tensor: 50,000 tensors
_BITS = {"float": (FLOAT_BITS, FLOAT_BITS), "binary": (1, 1), "uniform": (2, MAX_BITS), "kmeans": (1, MAX_BITS)}
_MAX_DIMS = 8
USER = "user"  # the kind of architecture record of a model no registry knows
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def save_artifact(model: nn.Module, path: str | Path) -> int:
    """Write `model` (masked, quantized, factorized or plain; a registry model or any other
    `nn.Module`) compressed; returns the file's bytes."""
    if not isinstance(model, nn.Module):
        raise CardkitError(f"save_artifact takes an nn.Module, got {type(model).__name__}")
    arch = architecture_record(model)
    encoded, other = encode_model(model)
    arrays: dict[str, np.ndarray] = {}
    entries = []
    for e in encoded:
        entries.append({"name": e.name, "shape": list(e.shape), "scheme": e.scheme, "bits": e.value_bits,
                        "rows": e.rows, "kept": e.kept, "table": e.table.size,
                        "positions": [e.positions.format, e.positions.width, e.positions.entries]})
        parts = [e.positions.data, e.values.astype("<f4") if e.scheme == "float" else e.values,
                 e.table.astype("<f4")]
        arrays[e.name] = np.concatenate([np.ascontiguousarray(a).view(np.uint8) for a in parts])
    names = sorted(other)
    arrays[OTHER] = np.concatenate([np.zeros(0, np.float32)] + [
        other[n].detach().cpu().float().reshape(-1).numpy() for n in names])
    header = {"format": FORMAT, "version": VERSION, "arch": arch, "tensors": entries,
              "other": [[n, list(other[n].shape)] for n in names], "sha256": _digest(arrays)}
    data = save_arrays(arrays, metadata={"cardkit": json.dumps(header, separators=(",", ":"))})
    write_bytes_atomic(output_file(path), data)
    return len(data)


def architecture_record(model: nn.Module) -> dict:
    """What a file records to rebuild `model`: a registry model's `arch`; for any other model,
    its class's qualified name and the fingerprint of its tensors' names and shapes."""
    arch = getattr(model, "arch", None)
    if isinstance(arch, dict):
        return arch
    cls = type(model)
    return {"kind": USER, "name": f"{cls.__module__}.{cls.__qualname__}", "fingerprint": fingerprint(model)}


def plain_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the tensors a file stores, as the plain (uncompressed) model holds
    them: every Conv2d / Linear weight, and every other floating-point parameter and buffer.
    The same for a model and its pruned, quantized or factorized version."""
    shapes = {f"{name}.weight": tuple(getattr(module, "weight_shape", None) or module.weight.shape)
              for name, module in prunable_layers(model)}
    shapes.update({name: tuple(t.shape) for name, t in other_tensors(model).items()})
    return dict(sorted(shapes.items()))


def fingerprint(model: nn.Module) -> str:
    """sha256 of `plain_shapes(model)`: equal for two instances of the same architecture."""
    text = json.dumps([[name, list(shape)] for name, shape in plain_shapes(model).items()], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def load_artifact(path: str | Path, *, model: nn.Module | None = None,
                  max_bytes: int | None = MAX_BYTES) -> nn.Module:
    """The model stored in a `.card` file, in eval mode, with outputs equal bitwise to those of
    the model that was exported.

    Without `model`, a registry model is rebuilt from the file alone as a plain torch model. With
    `model`, a freshly built (uncompressed) instance of the exported architecture, the file's
    tensors are loaded into it and it is returned: this is how a user-defined model comes back
    (its file records only the class name and a fingerprint of its tensors' names and shapes,
    which must match the instance's). A file whose model would take more than `max_bytes` as
    float32 tensors (default 1 GiB) is refused before anything is built; pass a larger limit, or
    None, for a larger model you trust.
    """
    path = Path(path)
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise CardkitError(f"max_bytes={max_bytes!r} is invalid; give a number of bytes (an integer >= 0) or None")
    limit = (1 << 62) if max_bytes is None else max_bytes
    header, arrays = read_artifact(path, limit)
    entries, listed = _parse_header(header, arrays, path)
    declared = sum(4 * math.prod(e.shape) for e in entries) + sum(4 * math.prod(shape) for _, shape in listed)
    if declared > limit:
        raise CardkitError(f"artifact '{path}' describes a model of {declared:,} bytes, more than the limit of "
                           f"{limit:,}; if you trust the file, load it with load_artifact(path, max_bytes=...)")
    if model is None:
        arch = _check_architecture(header["arch"], entries, listed, declared, path, limit)
        model = _build(arch, path)
    else:
        _check_instance(header["arch"], model, entries, listed, path)
    weights = {}
    for entry in entries:
        try:
            weights[entry.name] = decode_tensor(entry)
        except (ValueError, IndexError, RuntimeError) as err:
            raise CardkitError(f"artifact '{path}': the header and the tensors of {entry.name} disagree "
                               f"({str(err).splitlines()[0]}); the file is corrupt or was edited") from None
    state = _other_tensors(listed, arrays[OTHER], path)
    for name, module in prunable_layers(model):
        state[f"{name}.weight"] = _layer_weight(name, module, weights, path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape the checks above let through (a structured record)
        raise CardkitError(f"artifact '{path}': its tensors do not fit its architecture "
                           f"({str(err).splitlines()[-1].strip()}); the file is corrupt or was edited") from None
    missing = [k for k in missing if model.state_dict()[k].is_floating_point()]
    if missing or unexpected:
        raise CardkitError(f"artifact '{path}': its tensors do not fit the {_record_name(header['arch'])} "
                           f"architecture (missing {missing[:3]}, unexpected {unexpected[:3]}); the file is "
                           f"corrupt or was edited")
    return model.eval()


def read_artifact(path: Path, max_bytes: int = MAX_BYTES) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON header and the raw arrays, verified against the header's checksum."""
    if not path.is_file():
        kind = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise CardkitError(f"artifact '{path}' {kind}; give a .card file written by `cardkit export`")
    size = path.stat().st_size
    if size > 2 * max_bytes + MAX_HEADER_BYTES + 8:  # the streams of a tensor never exceed twice its float32 size
        raise CardkitError(f"artifact '{path}' has {size:,} bytes, more than any model within the limit of "
                           f"{max_bytes:,} bytes needs; if you trust the file, load it with "
                           f"load_artifact(path, max_bytes=...)")
    data = path.read_bytes()
    _check_container(data, path)
    try:
        arrays = load_arrays(data)
        metadata = _metadata(data)
        header = json.loads(metadata["cardkit"])
    except (SafetensorError, ValueError, TypeError, UnicodeDecodeError, OverflowError, RecursionError) as err:
        raise CardkitError(f"artifact '{path}' cannot be read ({_first_line(err)}); it is truncated or "
                           f"corrupt") from None
    except KeyError:
        raise CardkitError(f"'{path}' is a safetensors file but not a cardkit artifact (no cardkit header)") from None
    check_format(header, expected=FORMAT, reads=VERSION, what=f"artifact '{path}'",
                 fix="the file is corrupt or was edited")
    if _digest(arrays) != header.get("sha256"):
        raise CardkitError(f"artifact '{path}': its tensors do not match the checksum in its header "
                           f"(tampered or corrupt); export it again")
    return header, arrays


def _check_container(data: bytes, path: Path) -> None:
    """Refuse anything that is not a safetensors container before any parser sees it."""
    length = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if 0 < length and 8 + length <= len(data) and data[8:9] == b"{":
        if length > MAX_HEADER_BYTES:
            raise CardkitError(f"artifact '{path}' has a header of {length:,} bytes, more than a cardkit "
                               f"artifact writes ({MAX_HEADER_BYTES:,}); the file is corrupt or was edited")
        return
    if (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or data[:4] == b"PK\x03\x04":
        raise CardkitError(f"'{path}' is a pickle or torch.save file, not a cardkit artifact; cardkit "
                           f"never unpickles files: export the model with `cardkit export`")
    raise CardkitError(f"'{path}' is not a cardkit artifact (no safetensors header: truncated or another format)")


def _metadata(data: bytes) -> dict:
    length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + length]).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("the safetensors metadata is not a mapping")
    return metadata


def _digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).view(np.uint8).tobytes())
    return digest.hexdigest()


def _build(arch: dict, path: Path) -> nn.Module:
    try:
        return model_from_arch(arch)
    except CardkitError as err:  # a structured record the checks before could not see, e.g. a kept count
        raise CardkitError(f"artifact '{path}': its architecture record is invalid ({err})") from None


def _check_architecture(arch, entries: list[EncodedTensor], listed: list, declared: int, path: Path,
                        limit: int) -> dict:
    """Build the architecture on the meta device and compare it with the header, before anything is
    allocated. A plain record must make exactly the listed tensors, at the listed shapes. A
    structured record is built from its full-size base, which must fit `limit`; its tensors must
    have the base's names and no dimension larger than the base's."""
    from cardkit.models import create_model
    from cardkit.models.bounded import base_arch, build_on_meta, check_arch_record
    from cardkit.models.registry import is_user_factory

    what = f"artifact '{path}'"
    if isinstance(arch, dict) and (arch.get("kind") == USER or is_user_factory(str(arch.get("name")))):
        # a user's factory is code outside cardkit: a file from a stranger does not get to call it
        raise CardkitError(f"{what} holds a user-defined model ({_record_name(arch)}), which the file alone "
                           f"cannot rebuild; build it and pass it: load_artifact(path, model=MyNet())")
    arch = check_arch_record(arch, what)
    structured = "structured" in arch
    base = build_on_meta(lambda: create_model(**base_arch(arch)), entries=2 * (len(entries) + len(listed)),
                         nbytes=limit if structured else declared, what=what)
    _check_tensors(base, entries, listed, structured, what,
                   f"the {arch.get('name')} architecture", "the file is corrupt or was edited")
    base_bytes = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()])
    if base_bytes > limit:
        raise CardkitError(f"artifact '{path}': its architecture needs {base_bytes:,} bytes to build, more than "
                           f"the limit of {limit:,}; if you trust the file, load it with "
                           f"load_artifact(path, max_bytes=...)")
    return arch


def _check_instance(arch, model: nn.Module, entries: list[EncodedTensor], listed: list, path: Path) -> None:
    """The given instance must be plain and hold exactly the tensors the file stores, at their
    shapes; a user record's fingerprint must also be the instance's."""
    what = f"artifact '{path}'"
    if not isinstance(model, nn.Module):
        raise CardkitError(f"load_artifact(model=...) takes an nn.Module instance, got {type(model).__name__}")
    given = type(model).__qualname__
    if any(hasattr(module, "stored_tensors") for _, module in prunable_layers(model)):
        raise CardkitError(f"the {given} given to load_artifact is pruned or factorized already; pass a "
                           f"freshly built instance: load_artifact(path, model=MyNet())")
    user = isinstance(arch, dict) and arch.get("kind") == USER
    if user and not (isinstance(arch.get("name"), str) and isinstance(arch.get("fingerprint"), str)
                     and _FINGERPRINT.fullmatch(arch["fingerprint"])):
        raise CardkitError(f"{what}: its user architecture record lacks a class name or a valid fingerprint; "
                           f"the file is corrupt or was edited")
    saved = _record_name(arch)
    fix = f"the file holds a {saved}: pass a freshly built instance of that architecture"
    _check_tensors(model, entries, listed, False, what, f"the given {given}", fix)
    if user and fingerprint(model) != arch["fingerprint"]:
        raise CardkitError(f"{what}: the given {given} has other tensors than the exported {saved} (their "
                           f"names and shapes differ); {fix}")


def _record_name(arch) -> str:
    return str(arch.get("name")) if isinstance(arch, dict) else "unknown"


def _check_tensors(base: nn.Module, entries: list[EncodedTensor], listed: list, structured: bool, what: str,
                   target: str, fix: str) -> None:
    """The file's tensors must be exactly those of `base` (a plain model), at its shapes (for a
    structured record: no dimension larger); an ATMC layer's factors stand for its weight."""
    expected = {name: tuple(t.shape) for name, t in other_tensors(base).items()}
    layers = {name: tuple(module.weight.shape) for name, module in prunable_layers(base)}
    found = {e.name: e.shape for e in entries}
    for name, shape in layers.items():
        out, fan_in = shape[0], math.prod(shape[1:])
        if f"{name}.weight" in found:
            expected[f"{name}.weight"] = shape
        elif f"{name}.u" in found and len(found[f"{name}.u"]) == 2:  # an ATMC layer: U (out, r), V (r, fan_in), C
            rank = found[f"{name}.u"][1]
            if not 1 <= rank <= min(out, fan_in):
                raise CardkitError(f"{what}: layer {name} has factors of rank {rank}, outside 1..{min(out, fan_in)}; "
                                   f"the file is corrupt or was edited")
            expected.update({f"{name}.u": (out, rank), f"{name}.v": (rank, fan_in), f"{name}.c": (out, fan_in)})
        else:
            raise CardkitError(f"{what} stores no weight for layer {name} of {target}; {fix}")
    given = {**found, **{name: tuple(shape) for name, shape in listed}}
    if set(given) != set(expected):
        extra, lacking = sorted(set(given) - set(expected)), sorted(set(expected) - set(given))
        raise CardkitError(f"{what}: its tensors do not fit {target} (missing {lacking[:3]}, unexpected "
                           f"{extra[:3]}); {fix}")
    for name, shape in given.items():
        want = expected[name]
        fits = len(shape) == len(want) and all(s <= w for s, w in zip(shape, want)) if structured else shape == want
        if not fits:
            raise CardkitError(f"{what}: {name} is {shape} in the file but {want} in {target}; {fix}")


def _parse_header(header: dict, arrays: dict[str, np.ndarray], path: Path) -> tuple[list[EncodedTensor], list]:
    """The header's tensor entries (each checked against its stored bytes) and its `other` list."""
    tensors, listed = header.get("tensors"), header.get("other")
    if not isinstance(tensors, list) or not isinstance(listed, list) or "arch" not in header:
        raise CardkitError(f"artifact '{path}': its header lacks the tensors, other or arch entries; the file "
                           f"is corrupt or was edited")
    entries = [_encoded(entry, arrays, path) for entry in tensors]
    names = [e.name for e in entries]
    for item in listed:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise CardkitError(f"artifact '{path}': the header's other entry {_short(item)} is not [name, shape]; "
                               f"the file is corrupt or was edited")
        _shape(item[1], item[0], path)
        names.append(item[0])
    if len(set(names)) != len(names) or OTHER in names:
        raise CardkitError(f"artifact '{path}': its header lists a tensor twice; the file is corrupt or was edited")
    unlisted = sorted(set(arrays) - set(names) - {OTHER})
    if unlisted or OTHER not in arrays:
        raise CardkitError(f"artifact '{path}' stores tensors its header does not list "
                           f"({', '.join(unlisted[:3]) or 'no ' + repr(OTHER)}); the file is corrupt or was edited")
    return entries, [(name, tuple(shape)) for name, shape in listed]


def _shape(shape, name, path: Path) -> tuple[int, ...]:
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(_count(s) for s in shape)):
        raise CardkitError(f"artifact '{path}': the header gives {name} the shape {_short(shape)}, not a list of "
                           f"at most {_MAX_DIMS} non-negative integers; the file is corrupt or was edited")
    return tuple(shape)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _encoded(entry: dict, arrays: dict[str, np.ndarray], path: Path) -> EncodedTensor:
    """An EncodedTensor from a header entry, its bytes split at the lengths the entry implies.
    Every field is checked first, so that no length, count or width comes from the file unchecked."""
    name = entry.get("name") if isinstance(entry, dict) else None

    def bad(problem: str) -> CardkitError:
        return CardkitError(f"artifact '{path}': the header entry of {_short(name)} {problem}; the file is "
                            f"corrupt or was edited")

    if not isinstance(name, str):
        raise bad("has no name")
    if name not in arrays:
        raise bad("has no matching tensor")
    try:
        form, width, count = entry["positions"]
        scheme, bits, kept, rows, table_size = (entry[k] for k in ("scheme", "bits", "kept", "rows", "table"))
    except (KeyError, TypeError, ValueError) as err:
        raise bad(f"is malformed ({_first_line(err)})") from None
    shape = _shape(entry.get("shape"), name, path)
    n = math.prod(shape)
    if not isinstance(scheme, str) or not isinstance(form, str) or scheme not in _BITS or form not in FORMATS:
        raise bad(f"has an unknown scheme {_short(scheme)} or positions format {_short(form)}")
    if not all(_count(v) for v in (bits, kept, rows, table_size, width, count)):
        raise bad("has a count, width or size that is not a non-negative integer")
    low, high = _BITS[scheme]
    if not low <= bits <= high:
        raise bad(f"gives {scheme} values {bits} bits, outside {low}..{high}")
    if kept > n or (form == "dense" and kept != n):
        raise bad(f"keeps {kept} of {n} weights in {form} positions")
    if rows != 1 and not (shape and rows == shape[0] and scheme in ("uniform", "binary")):
        raise bad(f"has {rows} table rows; 1 or the {shape[0] if shape else 1} output channels are valid")
    if form == "gaps":
        # each kept weight takes one entry and each escape skips 2^width - 1 positions
        if not 1 <= width <= MAX_WIDTH or not kept <= count <= kept + n // ((1 << width) - 1) + 1:
            raise bad(f"has {count} gap entries of {width} bits for {kept} kept of {n} weights")
    elif width or count:
        raise bad(f"has {form} positions with a width or entries")
    blob = arrays[name]
    position_bits = {"dense": 0, "bitmap": n}.get(form, count * width)
    lengths = [-(-position_bits // 8), 4 * kept if scheme == "float" else -(-kept * bits // 8), 4 * table_size]
    expected_table = {"float": 0, "kmeans": table_size if 0 < table_size <= 2 ** bits or not kept else -1}
    if blob.dtype != np.uint8 or blob.ndim != 1 or blob.size != sum(lengths) \
            or table_size != expected_table.get(scheme, rows):
        raise CardkitError(f"artifact '{path}': the header and the tensor of {name} disagree ({kept} kept "
                           f"values of {bits} bits need {sum(lengths)} bytes, {blob.nbytes} are stored); the "
                           f"file is corrupt or was edited")
    positions, values, table = np.split(blob, np.cumsum(lengths)[:2])
    if scheme == "float":
        values = values.view("<f4").astype(np.float32)
    encoded = EncodedTensor(name, shape, scheme, bits, rows, kept, Positions(form, n, positions, width, count),
                            values, table.view("<f4").astype(np.float32))
    return encoded


def _other_tensors(listed: list, flat: np.ndarray, path: Path) -> dict[str, torch.Tensor]:
    """The biases and normalization tensors, cut from the `other` tensor at the listed shapes."""
    sizes = [math.prod(shape) for _, shape in listed]
    if flat.dtype != np.float32 or flat.ndim != 1 or flat.size != sum(sizes):
        raise CardkitError(f"artifact '{path}': the header and the tensor '{OTHER}' disagree ({sum(sizes)} "
                           f"values listed, {flat.size} stored); the file is corrupt or was edited")
    parts = np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []
    return {name: torch.from_numpy(part.copy()).view(shape) for (name, shape), part in zip(listed, parts)}


def _layer_weight(name: str, module: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    if f"{name}.weight" in weights:
        weight = weights[f"{name}.weight"]
    elif f"{name}.u" in weights:  # an ATMC layer: W = U V + C, computed as in training
        weight = factorized_weight(weights[f"{name}.u"], weights[f"{name}.v"],
                                   weights[f"{name}.c"], module.weight.shape)
    else:
        raise CardkitError(f"artifact '{path}' stores no weight for layer {name}; the file is corrupt or was edited")
    if weight.shape != module.weight.shape:
        raise CardkitError(f"artifact '{path}': layer {name} is {tuple(weight.shape)} in the file but "
                           f"{tuple(module.weight.shape)} in the architecture; the file is corrupt or was edited")
    return weight


def _first_line(err: BaseException) -> str:
    text = str(err)
    return text.splitlines()[0] if text else type(err).__name__


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
