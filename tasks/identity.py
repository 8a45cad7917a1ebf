"""Content keys for stage outputs, so a new run with the same inputs reuses finished work.

A key hashes what determines a stage's output: its config, the identity of its
inputs (model folders, prompt shards, upstream keys) and a per-stage version
that is bumped when the stage's code changes its output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from storage.atomic import sha256_json

STAGE_VERSIONS = {"labels": 1, "train": 1, "eval": 2}  # eval 2: teacher perplexity and sampled ROUGE-L


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


def stage_key(stage: str, **parts: Any) -> str:
    return f"{stage}-{sha256_json({'stage': stage, 'version': STAGE_VERSIONS[stage], **parts})[:16]}"


def code_version() -> str:
    """The git commit of this checkout, or the installed package version outside a checkout (lineage, result files)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent,
                              check=True).stdout.strip()
    except Exception:
        from importlib.metadata import version

        return version("stillhouse")
