"""Which files a load needs, making sure they are present (downloading them) and official."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cardkit.data.checksums import verify_file
from cardkit.data.download import ArchiveSource, DownloadFailed, FileSource
from cardkit.errors import CardkitError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Layout:
    """A dataset's default files: `folder` under data_dir and the names in it per split."""

    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    source: FileSource | ArchiveSource

    def default_files(self, split: str) -> list[str]:
        """Paths relative to data_dir; no split has default validation files."""
        names = {"train": self.train, "test": self.test}.get(split, ())
        return [f"{self.folder}/{name}" for name in names]


@dataclass(frozen=True)
class FileRequest:
    """A load's settings that decide the files: user-given files win over a layout's defaults."""

    dataset: str
    data_dir: Path
    download: bool
    files: dict[str, list[str] | None]  # split -> files given by the user, relative to data_dir
    only: str | None = None  # the one split the caller needs: the others' files are not required

    def any_given(self) -> bool:
        return any(v is not None for v in self.files.values())

    def resolve(self, layout: Layout) -> dict[str, list[Path]]:
        """Paths per split (val only when given), all present and md5-checked before any is read."""
        chosen = {split: self._chosen(split, layout) for split in SPLITS}
        paths = {split: [self.path(f) for f in names] for split, names in chosen.items() if names}
        everything = [p for split_paths in paths.values() for p in split_paths]
        self._ensure_present(layout, everything)
        for path in dict.fromkeys(everything):
            verify_file(path)
        return paths

    def path(self, name: str | os.PathLike) -> Path:
        return self.data_dir / Path(name).expanduser()  # an absolute name replaces data_dir

    def _chosen(self, split: str, layout: Layout) -> list[str]:
        if self.only is not None and split != self.only:
            # readers return every split: the needed split's files stand in for the others
            return [] if split == "val" else self._chosen(self.only, layout)
        given = self.files.get(split)
        if given is None:
            return layout.default_files(split)
        if not given:
            raise CardkitError(f"{self.dataset}: {split}_files is empty; give at least one file or leave it unset")
        return list(given)

    def _ensure_present(self, layout: Layout, paths: list[Path]) -> None:
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            return
        reason = ""
        if self.download:
            reason = self._try_download(layout, missing)
            missing = [p for p in missing if not p.is_file()]
        if missing:
            raise self._missing_error(layout, missing, reason)

    def _try_download(self, layout: Layout, missing: list[Path]) -> str:
        """Download the layout's files; returns why that could not help, '' when it did."""
        folder = (self.data_dir / layout.folder).resolve()
        if any(p.resolve().parent != folder for p in missing):
            return "not all of them are in the default download; "
        try:
            layout.source.fetch(self.data_dir, layout.folder, [p.name for p in missing])
        except DownloadFailed as e:
            return f"download failed ({e}); "
        return ""

    def _missing_error(self, layout: Layout, missing: list[Path], reason: str) -> CardkitError:
        folder = Path(os.path.commonpath([p.parent for p in missing]))
        names = ", ".join(str(p.relative_to(folder)) for p in missing)
        return CardkitError(
            f"{self.dataset}: missing {names} in {folder}; {reason}download them from {layout.source.url} "
            f"and place them there (or set data.data_dir)"
        )


def optional_file(path: Path) -> Path | None:
    """`path` md5-checked when it exists (metadata such as class names), else None."""
    if not path.is_file():
        return None
    verify_file(path)
    return path
