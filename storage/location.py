"""Read soft labels from a local or shared-filesystem path, or from a URI (s3://, gs://, hdfs://, file://, or any
fsspec protocol such as memory://), through one pyarrow filesystem interface.

Training workers on a cluster read labels where the teacher stage left them,
e.g. an object store. Writing stays on a filesystem with atomic rename (local
or shared): object stores have no rename, and a half-uploaded shard must never
look finished; upload a finished capture as a whole (manifest last).
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # inside fs
    shown: str  # the path or URI as the user wrote it (for messages)

    def __str__(self) -> str:
        return self.shown

    def join(self, name: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, name), self.shown.rstrip("/") + "/" + name)

    def parent(self) -> "Location":
        shown = self.shown.rstrip("/")
        parent_shown = shown.rsplit("/", 1)[0] if "/" in shown.split("://", 1)[-1] else "."
        return Location(self.fs, posixpath.dirname(self.path.rstrip("/")), parent_shown)

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def open(self):
        return self.fs.open_input_file(self.path)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def sha256(self, chunk: int = 1 << 20) -> str:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(self.path) as f:
            while block := f.read(chunk):
                digest.update(block)
        return digest.hexdigest()


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def locate(path_or_uri: str | Path) -> Location:
    """A Location for a local path or a URI (pyarrow's own filesystems first, then fsspec's)."""
    shown = str(path_or_uri)
    if not is_uri(shown):
        return Location(pafs.LocalFileSystem(), str(Path(shown).absolute()), shown)
    try:
        fs, path = pafs.FileSystem.from_uri(shown)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        import fsspec

        try:
            spec_fs, path = fsspec.core.url_to_fs(shown)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"{shown}: no filesystem for this URI ({exc}); install the fsspec package for its scheme") from exc
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(spec_fs))
    return Location(fs, path, shown)
