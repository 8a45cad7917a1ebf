"""Content keys for stage outputs and identities of model folders.

A key hashes what determines a stage's output: its config, the identity of its
inputs (model folders, prompt shards, upstream keys) and the stage's code
version, bumped when the stage's code changes its output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from storage.atomic import read_json, sha256_dir, sha256_json, write_json


def model_identity(model_dir: str) -> str:
    """Cheap identity of a model folder: config plus weight file names, sizes and mtimes.

    Hashing every weight byte of a 7B model on each run would cost tens of
    seconds; a changed checkpoint changes size or mtime.
    """
    root = Path(model_dir)
    files = sorted(p for p in root.glob("*.safetensors"))
    payload = {
        "config": json.loads((root / "config.json").read_text()),
        "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
    }
    return sha256_json(payload)[:16]


def model_content_hash(model_dir: str, memo_dir: Path | None = None) -> str:
    """sha256 of a model's weight files (names and bytes), for label lineage.

    Costly for large models, so it is memoised under `memo_dir` by the cheap
    identity: computed once per model version, not once per run.
    """
    memo = Path(memo_dir) / f"{model_identity(model_dir)}.json" if memo_dir is not None else None
    if memo is not None and memo.exists():
        return read_json(memo)["sha256"]
    digest = sha256_dir(Path(model_dir), "*.safetensors")[:16]
    if memo is not None:
        write_json(memo, {"sha256": digest, "model_dir": str(model_dir)})
    return digest


def stage_key(stage: str, version: int, **parts: Any) -> str:
    return f"{stage}-{sha256_json({'stage': stage, 'version': version, **parts})[:16]}"


def code_version() -> str:
    """The git commit of this checkout, or the installed package version outside a checkout (lineage, result files)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent,
                              check=True).stdout.strip()
    except Exception:
        from importlib.metadata import version

        return version("stillhouse")
