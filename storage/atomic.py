"""Write-then-rename helpers, so nothing half-written is ever taken for finished."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any


def tmp_path_for(path: Path) -> Path:
    """A sibling temporary name; readers never list names containing '.tmp-'."""
    return path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def write_json(path: Path, payload: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    with tmp.open("w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_parquet(table, path: Path, **options) -> Path:
    """Write a pyarrow Table under a temporary name, then rename: a reader never sees half a file."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        pq.write_table(table, tmp, **options)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_json(path: Path) -> Any:
    with Path(path).open() as f:
        return json.load(f)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(payload: Any) -> str:
    """Hash of a JSON-able value, independent of key order."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def sha256_dir(path: Path, pattern: str = "*") -> str:
    """Content hash of the files in a folder (names and bytes), for model identity."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).glob(pattern) if p.is_file() and ".tmp-" not in p.name):
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()
