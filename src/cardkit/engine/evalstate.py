"""The resume state of a robustness evaluation on disk: the per-point robust flags (safetensors)
and where the attack sequence stands (JSON metadata), replaced atomically after every batch. A state
is used only by the evaluation it was written for (same checkpoint, points, threat and attacks)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)
FLAGS = ("robust", "start")


def evaluation_key(settings: dict[str, Any]) -> str:
    """A short digest of what makes two evaluations the same."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_state(path: Path, key: str) -> Optional[dict]:
    """The saved state of evaluation `key`, or None (none saved, another evaluation's, unreadable)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        meta = json.loads(header["__metadata__"]["state"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        log.warning("%s cannot be read; the evaluation starts over", path)
        return None
    if meta.get("key") != key:
        return None
    state = meta["state"]
    for name in FLAGS:
        state[name] = tensors[name].bool() if name in tensors else None
    log.info("resuming the evaluation at attack stage %d, batch %d", state["stage"] + 1, state["batch"] + 1)
    return state


def save_state(path: Path, key: str, state: dict) -> None:
    tensors = {name: state[name].to(torch.uint8).contiguous() for name in FLAGS if state.get(name) is not None}
    rest = {k: v for k, v in state.items() if k not in FLAGS}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps({"key": key, "state": rest})})
    os.replace(tmp, path)
