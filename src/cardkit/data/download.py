"""Fetching official dataset files: atomic writes, md5 checks and safe tar extraction."""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cardkit.data import checksums

log = logging.getLogger(__name__)

TIMEOUT_S = 20


class DownloadFailed(Exception):
    """A download or extraction did not produce the official files; the caller reports it."""


def open_url(url: str):
    """Open `url` for reading; a separate function so tests can stand in for the network."""
    return urllib.request.urlopen(url, timeout=TIMEOUT_S)


def download_file(url: str, dest: Path) -> None:
    """Download `url` to `dest` through a temporary name, so an interrupted download leaves no file."""
    created = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]
    part = dest.with_name(dest.name + ".part")
    log.info("downloading %s to %s", url, dest)
    try:
        with open_url(url) as response:  # folders are made only once the server answers
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        _check_download(part, dest)
        os.replace(part, dest)
    except (OSError, ValueError, DownloadFailed) as e:  # URLError and timeouts are OSErrors
        part.unlink(missing_ok=True)
        _remove_empty(created)
        if isinstance(e, DownloadFailed):
            raise
        raise DownloadFailed(f"{url}: {e}") from e


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed download created (deepest first), as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _check_download(part: Path, dest: Path) -> None:
    known = checksums.known_file(dest)
    if known is not None and (actual := checksums.md5_of(part)) != known.md5:
        raise DownloadFailed(f"downloaded {dest.name} has md5 {actual}, expected {known.md5}")


def extract_tar(archive: Path, dest: Path) -> None:
    """Extract a .tar.gz into `dest`, refusing members that could write outside it."""
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            _check_member(archive, member)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:
            tar.extractall(dest, members=members)


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
        raise DownloadFailed(f"{archive}: unsafe member {member.name!r} (absolute path, '..' or link)")


@dataclass(frozen=True)
class FileSource:
    """Files downloaded one by one from `url` + name into the dataset folder."""

    url: str

    def fetch(self, data_dir: Path, folder: str, names: list[str]) -> None:
        for name in names:
            download_file(self.url + name, data_dir / folder / name)


@dataclass(frozen=True)
class ArchiveSource:
    """One .tar.gz at `url` that unpacks into the dataset folder under data_dir; the archive is kept."""

    url: str

    def fetch(self, data_dir: Path, folder: str, names: list[str]) -> None:
        archive = data_dir / self.url.rsplit("/", 1)[-1]
        if not archive.is_file() or not _matches_official(archive):
            download_file(self.url, archive)
        try:
            extract_tar(archive, data_dir)
        except (OSError, tarfile.TarError) as e:
            raise DownloadFailed(f"{archive}: cannot extract ({e})") from e


def _matches_official(path: Path) -> bool:
    known = checksums.known_file(path)
    return known is None or checksums.cached_md5(path) == known.md5
