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
Loading parses only JSON and raw arrays: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays
from torch import nn

from cardkit.compress.encode import EncodedTensor, decode_tensor
from cardkit.compress.packing import Positions
from cardkit.compress.size import encode_model
from cardkit.compress.stored import factorized_weight
from cardkit.errors import CardkitError

FORMAT = "cardkit-artifact"
VERSION = 1
OTHER = "other"


def save_artifact(model: nn.Module, path: str | Path) -> int:
    """Write `model` (masked, quantized, factorized or plain) compressed; returns the file's bytes."""
    if not isinstance(getattr(model, "arch", None), dict):
        raise CardkitError("only models built by cardkit (create_model, or loaded from a checkpoint) can "
                           "be saved as artifacts: the file records the architecture to rebuild")
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
    header = {"format": FORMAT, "version": VERSION, "arch": model.arch, "tensors": entries,
              "other": [[n, list(other[n].shape)] for n in names], "sha256": _digest(arrays)}
    data = save_arrays(arrays, metadata={"cardkit": json.dumps(header, separators=(",", ":"))})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def load_artifact(path: str | Path) -> nn.Module:
    """The model stored in a `.card` file, as a plain torch model in eval mode."""
    path = Path(path)
    header, arrays = read_artifact(path)
    model = _build(header["arch"], path)
    weights = {}
    for entry in header["tensors"]:
        try:
            weights[entry["name"]] = decode_tensor(_encoded(entry, arrays, path))
        except ValueError as err:
            raise CardkitError(f"artifact '{path}': the header and the tensors of {entry['name']} disagree "
                               f"({err}); the file is corrupt or was edited") from None
    state = _other_tensors(header["other"], arrays.get(OTHER), path)
    from cardkit.prune.masked import prunable_layers

    for name, module in prunable_layers(model):
        state[f"{name}.weight"] = _layer_weight(name, module, weights, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if model.state_dict()[k].is_floating_point()]
    if missing or unexpected:
        raise CardkitError(f"artifact '{path}': its tensors do not fit the {header['arch'].get('name')} "
                           f"architecture (missing {missing[:3]}, unexpected {unexpected[:3]}); the file is "
                           f"corrupt or was edited")
    return model.eval()


def read_artifact(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON header and the raw arrays, verified against the header's checksum."""
    if not path.is_file():
        raise CardkitError(f"artifact '{path}' does not exist; write one with `cardkit export`")
    data = path.read_bytes()
    _check_container(data, path)
    try:
        arrays = load_arrays(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as err:
        raise CardkitError(f"artifact '{path}' cannot be read ({err}); it is truncated or corrupt") from None
    try:
        header = json.loads(metadata["cardkit"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CardkitError(f"'{path}' is a safetensors file but not a cardkit artifact (no cardkit header)") from None
    if header.get("format") != FORMAT:
        raise CardkitError(f"'{path}' is not a cardkit artifact (format {header.get('format')!r})")
    if not isinstance(header.get("version"), int) or header["version"] > VERSION:
        raise CardkitError(f"artifact '{path}' has format version {header.get('version')}, newer than this "
                           f"cardkit reads ({VERSION}); upgrade cardkit")
    if _digest(arrays) != header.get("sha256"):
        raise CardkitError(f"artifact '{path}': its tensors do not match the checksum in its header "
                           f"(tampered or corrupt); export it again")
    return header, arrays


def _check_container(data: bytes, path: Path) -> None:
    """Refuse anything that is not a safetensors container before any parser sees it."""
    length = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if 0 < length and 8 + length <= len(data) and data[8:9] == b"{":
        return
    if (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or data[:4] == b"PK\x03\x04":
        raise CardkitError(f"'{path}' is a pickle or torch.save file, not a cardkit artifact; cardkit "
                           f"never unpickles files: export the model with `cardkit export`")
    raise CardkitError(f"'{path}' is not a cardkit artifact (no safetensors header: truncated or another format)")


def _metadata(data: bytes) -> dict:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]).get("__metadata__") or {}


def _digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).view(np.uint8).tobytes())
    return digest.hexdigest()


def _build(arch: dict, path: Path) -> nn.Module:
    from cardkit.models import create_model
    from cardkit.prune.structured import create_structured

    try:
        if "structured" in arch:
            return create_structured(arch)
        return create_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                            input_size=arch["input_size"], mean=arch["mean"], std=arch["std"],
                            **arch.get("kwargs", {}))
    except (KeyError, TypeError) as err:
        raise CardkitError(f"artifact '{path}': its architecture record is incomplete ({err}); export it again") from None


def _encoded(entry: dict, arrays: dict[str, np.ndarray], path: Path) -> EncodedTensor:
    """An EncodedTensor from a header entry, its bytes split at the lengths the entry implies."""
    name = entry.get("name")
    try:
        form, width, count = entry["positions"]
        shape, bits, kept, rows = tuple(entry["shape"]), int(entry["bits"]), int(entry["kept"]), int(entry["rows"])
        scheme, blob, table_size = entry["scheme"], arrays[name], int(entry["table"])
        n = int(np.prod(shape))
    except (KeyError, TypeError, ValueError) as err:
        raise CardkitError(f"artifact '{path}': the header entry of {name} has no matching tensor or is "
                           f"malformed ({err}); the file is corrupt or was edited") from None
    position_bits = {"dense": 0, "bitmap": n}.get(form, count * width)
    lengths = [-(-position_bits // 8), 4 * kept if scheme == "float" else -(-kept * bits // 8), 4 * table_size]
    expected_table = {"float": 0, "kmeans": table_size if 0 < table_size <= 2 ** bits or not kept else -1}
    if blob.dtype != np.uint8 or blob.size != sum(lengths) or table_size != expected_table.get(scheme, rows):
        raise CardkitError(f"artifact '{path}': the header and the tensor of {name} disagree ({kept} kept "
                           f"values of {bits} bits need {sum(lengths)} bytes, {blob.nbytes} are stored); the "
                           f"file is corrupt or was edited")
    positions, values, table = np.split(blob, np.cumsum(lengths)[:2])
    if scheme == "float":
        values = values.view("<f4").astype(np.float32)
    encoded = EncodedTensor(name, shape, scheme, bits, rows, kept, Positions(form, n, positions, width, count),
                            values, table.view("<f4").astype(np.float32))
    return encoded


def _other_tensors(listed: list, flat: np.ndarray | None, path: Path) -> dict[str, torch.Tensor]:
    """The biases and normalization tensors, cut from the `other` tensor at the listed shapes."""
    try:
        sizes = [int(np.prod(shape)) for _, shape in listed]
        if flat is None or flat.dtype != np.float32 or flat.size != sum(sizes):
            raise ValueError(f"{sum(sizes)} values listed, {0 if flat is None else flat.size} stored")
    except (TypeError, ValueError) as err:
        raise CardkitError(f"artifact '{path}': the header and the tensor '{OTHER}' disagree ({err}); the "
                           f"file is corrupt or was edited") from None
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
