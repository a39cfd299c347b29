"""Checkpoints on disk, written atomically and loaded without unpickling code.

A checkpoint is a folder: `model.safetensors` (weights and buffers), `optimizer.pt` (optimizer
state, loadable with `torch.load(weights_only=True)`), `rng.safetensors` (mid-epoch only) and
`meta.json`, which records the size and sha256 of the other files. The folder is written under a
temporary name and renamed; `last.json` / `best.json` point at folders and are replaced atomically,
so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cardkit.errors import CardkitError
from cardkit.fileio import file_digest

FORMAT = "cardkit-checkpoint"
VERSION = 1


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
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CardkitError(f"checkpoint '{path}': meta.json is not valid JSON (truncated?); "
                           f"delete the folder to restart this stage") from None
    if meta.get("format") != FORMAT:
        raise CardkitError(f"'{path}' is not a cardkit checkpoint (format {meta.get('format')!r})")
    if meta.get("version", 0) > VERSION:
        raise CardkitError(f"checkpoint '{path}' has format version {meta['version']}, newer than "
                           f"this cardkit reads ({VERSION}); upgrade cardkit")
    _verify_files(path, meta.get("files", {}))
    return Checkpoint(path, meta)


def _verify_files(path: Path, files: dict) -> None:
    for name, expected in files.items():
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


def _remove_unreferenced(folder: Path) -> None:
    """Delete checkpoint folders no pointer (last, best, an epoch kept for rewinding) names."""
    keep = set()
    for file in folder.glob("*.json"):
        keep.add(json.loads(file.read_text())["checkpoint"])
    for child in folder.iterdir():
        if child.is_dir() and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)
