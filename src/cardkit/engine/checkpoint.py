"""Checkpoints on disk, written atomically and loaded without unpickling code.

A checkpoint is a folder: `model.safetensors` (weights and buffers), `optimizer.pt` (optimizer
state, loadable with `torch.load(weights_only=True)`), `rng.safetensors` (mid-epoch only) and
`meta.json`, which records the size and sha256 of the other files. The folder is written under a
temporary name and renamed; `last.json` / `best.json` point at folders and are replaced atomically,
so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cardkit.errors import CardkitError
from cardkit.fileio import check_format, file_digest

FORMAT = "cardkit-checkpoint"
VERSION = 1
# A structured (channel-pruned) model is built from its full-size base, which its checkpoint does
# not store; the base may need this much more than the stored tensors.
STRUCTURED_BASE_BYTES = 1 << 30
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]

    def model_state(self) -> dict[str, torch.Tensor]:
        return _load_tensors(self.path / "model.safetensors")

    def optimizer_state(self) -> Optional[dict]:
        file = self.path / "optimizer.pt"
        if not file.exists():
            return None
        _check_torch_archive(file, self.path)
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for damaged files
            raise CardkitError(f"checkpoint '{self.path}': optimizer.pt cannot be read ({err}); "
                               f"delete the checkpoint folder to restart this stage") from None

    def rng_state(self) -> Optional[dict[str, torch.Tensor]]:
        file = self.path / "rng.safetensors"
        return _load_tensors(file) if file.exists() else None


def save_checkpoint(folder: Path, *, model_state: dict[str, torch.Tensor], meta: dict,
                    optimizer_state: dict | None = None, rng: dict | None = None,
                    pointers: tuple[str, ...] = ("last",)) -> Path:
    """Write a checkpoint folder under `folder`, point `pointers` at it, drop unreferenced ones."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"epoch{meta['state']['epoch']:04d}-step{meta['state']['step']:07d}"
    tmp = folder / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    if rng is not None:
        save_file({k: v.cpu().contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
    meta = {"format": FORMAT, "version": VERSION, **meta, "files": files}
    _write_synced(tmp / "meta.json", json.dumps(meta, indent=1))
    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for pointer in pointers:
        _write_atomic(folder / f"{pointer}.json", json.dumps({"checkpoint": name}))
    _remove_unreferenced(folder)
    return final


def has_checkpoint(folder: Path, pointer: str = "last") -> bool:
    return (folder / f"{pointer}.json").is_file()


def load_checkpoint(path: str | Path, pointer: str = "last") -> Checkpoint:
    """Load from a checkpoint folder, or from a folder of checkpoints via its pointer file."""
    path = Path(path)
    if (path / f"{pointer}.json").is_file():
        try:
            name = json.loads((path / f"{pointer}.json").read_text())["checkpoint"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CardkitError(f"'{path / f'{pointer}.json'}' is corrupt; delete it and the run "
                               f"restarts this stage") from None
        path = path / name
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CardkitError(f"no checkpoint in '{path}': expected meta.json or {pointer}.json there; "
                           f"give a run folder, a stage's checkpoints folder or a checkpoint folder")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CardkitError(f"checkpoint '{path}': meta.json is not valid JSON (truncated?); "
                           f"delete the folder to restart this stage") from None
    check_format(meta, expected=FORMAT, reads=VERSION, what=f"checkpoint '{path}'",
                 fix="the checkpoint is corrupt or was edited")
    _verify_files(path, meta.get("files", {}))
    check_architecture(path, meta.get("arch"))
    return Checkpoint(path, meta)


def check_architecture(path: Path, arch: dict) -> None:
    """Refuse an architecture record that does not fit the tensors `model.safetensors` stores,
    before any model is built: the record is built on the meta device (no storage), stopped if it
    grows past the stored tensors, and every entry it shares with the file must have the file's
    shape. A structured record first builds its full-size base (as `model_from_arch` does), which may
    exceed the stored tensors by the removed channels, up to `STRUCTURED_BASE_BYTES`."""
    from cardkit.models import create_model
    from cardkit.models.bounded import base_arch, build_on_meta, check_arch_record, state_shapes

    what = f"checkpoint '{path}'"
    arch = check_arch_record(arch, what)
    stored = stored_shapes(path / "model.safetensors")
    stored_bytes = sum(nbytes for _, nbytes in stored.values())
    structured = "structured" in arch
    allowed = max(stored_bytes, STRUCTURED_BASE_BYTES) if structured else stored_bytes
    base = build_on_meta(lambda: create_model(**base_arch(arch)), entries=len(stored), nbytes=allowed, what=what)
    built = state_shapes(base)
    built_bytes = sum(nbytes for _, nbytes in built.values())
    for name, (shape, _) in built.items():
        fits = name not in stored or (
            len(shape) == len(stored[name][0]) and all(s <= b for s, b in zip(stored[name][0], shape))
            if structured else stored[name][0] == shape)
        if not fits:
            raise CardkitError(f"{what}: its architecture record makes {name} {shape}, but model.safetensors "
                               f"stores it as {stored[name][0]}; the checkpoint is corrupt or was edited")
    if built_bytes > allowed:
        raise CardkitError(f"{what}: its architecture record describes a model of {built_bytes:,} bytes, "
                           f"more than the {allowed:,} bytes model.safetensors justifies; the checkpoint "
                           f"is corrupt or was edited")


def stored_shapes(file: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """(shape, bytes) of every tensor in a safetensors file, from its header (no tensor is read;
    safetensors checks that the header's offsets cover the file exactly)."""
    try:
        with safe_open(file, framework="pt") as handle:
            shapes = {}
            for name in handle.keys():
                part = handle.get_slice(name)
                shape = tuple(part.get_shape())
                shapes[name] = (shape, math.prod(shape) * _DTYPE_BYTES.get(part.get_dtype(), 8))
            return shapes
    except (SafetensorError, OSError, ValueError) as err:
        raise CardkitError(f"'{file}' cannot be read ({err}); the checkpoint is damaged") from None


def _check_torch_archive(file: Path, path: Path) -> None:
    """Refuse what torch.save never writes before torch.load sees it: a zip archive with
    compressed entries (torch allocates each entry's claimed size before inflating it) or
    entries larger than the file, and the legacy format (it allocates storages at sizes the
    pickle claims)."""
    try:
        with zipfile.ZipFile(file) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise CardkitError(f"checkpoint '{path}': optimizer.pt is not a zip archive written by torch.save "
                           f"({err}); delete the checkpoint folder to restart this stage") from None
    if not archive_as_saved(entries, file.stat().st_size):
        raise CardkitError(f"checkpoint '{path}': optimizer.pt holds compressed or oversized entries, which "
                           f"torch.save never writes; the checkpoint is corrupt or was edited")


def archive_as_saved(entries: list[zipfile.ZipInfo], size: int) -> bool:
    """Whether zip entries are as torch.save writes them: stored uncompressed, together within
    the file's `size` bytes."""
    stored = all(e.compress_type == zipfile.ZIP_STORED and e.file_size == e.compress_size for e in entries)
    return stored and sum(e.file_size for e in entries) <= size


def _verify_files(path: Path, files: dict) -> None:
    if not isinstance(files, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
            for entry in files.values()):
        raise CardkitError(f"checkpoint '{path}': meta.json lists its files in a malformed way; the "
                           f"checkpoint is corrupt or was edited")
    for name, expected in files.items():
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise CardkitError(f"checkpoint '{path}': meta.json lists a file {name!r} outside the "
                               f"checkpoint folder; the checkpoint is corrupt or was edited")
        file = path / name
        if not file.is_file():
            raise CardkitError(f"checkpoint '{path}' is incomplete: {name} is missing; delete the "
                               f"folder to restart this stage")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CardkitError(f"checkpoint '{path}': {name} has {size} bytes, expected "
                               f"{expected['bytes']} (truncated?); delete the folder to restart this stage")
        if _sha256(file) != expected["sha256"]:
            raise CardkitError(f"checkpoint '{path}': {name} does not match its recorded sha256 "
                               f"(corrupt); delete the folder to restart this stage")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise CardkitError(f"'{file}' cannot be read ({err}); the checkpoint is damaged") from None


def _sha256(file: Path) -> str:
    return file_digest(file, "sha256")


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    _write_synced(tmp, text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(data, indent=2))


def record_result(path: Path, data: dict) -> Path:
    """Write a result file without losing the one it replaces: an earlier result moves to
    `history/NNNN-<name>` beside it first (numbered in order), then the new one is written."""
    data = {**data, "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if path.is_file():
        history = path.parent / "history"
        history.mkdir(parents=True, exist_ok=True)
        number = 1 + max((int(f.name.split("-", 1)[0]) for f in history.glob("[0-9]*-*")), default=0)
        os.replace(path, history / f"{number:04d}-{path.name}")
    write_json_atomic(path, data)
    return path


def _remove_unreferenced(folder: Path) -> None:
    """Delete checkpoint folders no pointer (last, best, an epoch kept for rewinding) names."""
    keep = set()
    for file in folder.glob("*.json"):
        keep.add(json.loads(file.read_text())["checkpoint"])
    for child in folder.iterdir():
        if child.is_dir() and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)
