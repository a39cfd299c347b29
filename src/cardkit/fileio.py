"""Small file helpers shared by the dataset checks and the checkpoint store."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in 1 MiB chunks (dataset files and checkpoints can be large)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def output_file(path: Path, *, overwrite: bool = True, option: str = "the output path") -> Path:
    """`path` checked as a file about to be written, before any work: refused in one line if it
    is a folder, lies below something that is not a folder, or exists and `overwrite` is False."""
    from cardkit.errors import CardkitError

    path = Path(path)
    if path.is_dir():
        raise CardkitError(f"{option} '{path}' is a folder; give a file path, e.g. '{path / 'model.card'}'")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise CardkitError(f"{option} '{path}' already exists and is not overwritten; pass --force "
                           f"(overwrite=True) to replace it, or give another path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CardkitError(f"{option} '{path}' cannot be written: '{parent}' is a file, not a folder; "
                                   f"give a path inside a folder")
            break
    return path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a hidden file beside `path` and rename it into place; on any failure the
    hidden file is removed, so `path` is either untouched or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise



def check_format(record, *, expected: str, reads: int, what: str, fix: str) -> int:
    """The format version of a file's JSON record (a .card header, a checkpoint's meta.json),
    refused in one line when the record is of another format, malformed, or newer than `reads`.
    `what` names the file in messages, e.g. "artifact 'model.card'"."""
    from cardkit.errors import CardkitError

    if not isinstance(record, dict) or record.get("format") != expected:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CardkitError(f"{what} is not a {expected.replace('-', ' ')} (format {_short(found)})")
    version = record.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CardkitError(f"{what} has a malformed format version {_short(version)} (an integer >= 1 is "
                           f"expected); {fix}")
    if version > reads:
        raise CardkitError(f"{what} has format version {version}, newer than this cardkit reads ({reads}); "
                           f"upgrade cardkit")
    return version


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
