"""Run folders that cardkit owns: a marker says a folder is a run, a lock file says who runs it.

cardkit writes, deletes and resumes only inside folders that carry its marker (`.cardkit-run`),
so `--restart` can never remove a folder it did not create. One process at a time works in a run
folder: `.lock` holds the owner's pid; a second process is refused, a lock left by a dead
process is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from cardkit.errors import CardkitError

log = logging.getLogger(__name__)
MARKER = ".cardkit-run"
LOCK = ".lock"


def check_folder_path(folder: Path, what: str = "run folder") -> None:
    """A folder can be created at `folder`: no part of the path is a regular file."""
    for part in [folder, *folder.parents]:
        if part.exists() and not part.is_dir():
            raise CardkitError(f"{what} '{folder}': '{part}' is a file, not a folder; choose a path "
                               f"whose parents are folders")


def is_run_folder(folder: Path) -> bool:
    """Whether cardkit created `folder` as a run: its marker, or (runs written before the marker
    existed) a config.yaml that is a cardkit run config."""
    if (folder / MARKER).is_file():
        return True
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(saved, dict) and {"name", "pipeline", "data", "model"} <= set(saved)


def check_run_folder(folder: Path) -> None:
    """A run may live at `folder`: it is new, empty or a run folder. A folder of other files is
    refused, so that nothing of the user's is ever overwritten."""
    check_folder_path(folder)
    if folder.is_dir() and not is_run_folder(folder) and any(p.name != LOCK for p in folder.iterdir()):
        raise CardkitError(f"'{folder}' exists and is not a cardkit run folder (no {MARKER} in it); "
                           f"choose another run name (--set name=NEW) or output_dir")


def claim_run_folder(folder: Path) -> None:
    """Make `folder` a run folder (see `check_run_folder`) and mark it as cardkit's."""
    check_run_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if not marker.is_file():
        marker.write_text(json.dumps({"format": "cardkit-run", "version": 1}) + "\n")


def clear_run_folder(folder: Path) -> None:
    """`--restart`: empty a run folder (its lock, held by the caller, stays); refuses any other."""
    if not folder.exists():
        return
    if not is_run_folder(folder):
        raise CardkitError(f"--restart: '{folder}' is not a cardkit run folder (no {MARKER} in it), so it "
                           f"is left untouched; choose another run name (--set name=NEW)")
    for child in folder.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


_held: dict[Path, int] = {}  # locks this process holds, with their nesting depth


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold `folder/.lock` while the body runs: one process per run folder (re-entrant)."""
    check_folder_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = (folder / LOCK).resolve()
    if not _held.get(lock):
        _acquire(lock)
    _held[lock] = _held.get(lock, 0) + 1
    try:
        yield
    finally:
        _held[lock] -= 1
        if not _held[lock]:
            del _held[lock]
            if _owner(lock).get("pid") == os.getpid():
                lock.unlink(missing_ok=True)


def _acquire(lock: Path) -> None:
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(lock)
            pid, host = owner.get("pid"), owner.get("host")
            here = host in (None, socket.gethostname())
            if here and (not isinstance(pid, int) or not _alive(pid)):
                log.warning("%s: taking over a stale lock (process %s no longer runs)", lock.parent, pid)
                lock.unlink(missing_ok=True)
                continue
            where = "" if here else f" on {host}"
            raise CardkitError(f"'{lock.parent}' is in use by process {pid}{where}; wait for it to finish "
                               f"or stop it, or choose another run name (--set name=NEW); if no cardkit "
                               f"process runs there, delete {lock}") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(record)
        return
    raise CardkitError(f"could not take the lock {lock}: other processes keep taking it; try again")


def _owner(lock: Path) -> dict:
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A process that was killed but not yet reaped by its parent (e.g. a torchrun rank whose
    launcher was killed too): it still answers signals but no longer runs. Linux only."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")
