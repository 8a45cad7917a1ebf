"""Run folders: a user-given run name stays inside <data_dir>/runs, never overwrites another run, and every run
ends with a run.json, finished or failed."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

from storage.atomic import read_json, write_json
from storage.errors import UserError

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
OWNER_FILE = "owner.json"


def claim_run_dir(runs_root: Path, run_name: str | None, owner: str) -> Path:
    """A new folder for this run under `runs_root`. `owner` (the Prefect flow run id) lets a retried flow run continue
    in its own folder; a name another run holds gets a numbered suffix (name-2, name-3, ...)."""
    runs_root = Path(runs_root).resolve()
    base = run_name or dt.datetime.now(dt.timezone.utc).strftime("run-%Y%m%d-%H%M%S")
    if not _PLAIN_NAME.match(base):
        raise UserError(f"run_name {base!r}: use letters, digits, '.', '_' and '-' only (a name, not a path)")
    runs_root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 10_000):
        candidate = runs_root / (base if attempt == 1 else f"{base}-{attempt}")
        if candidate.resolve().parent != runs_root:
            raise UserError(f"run_name {base!r} leaves {runs_root}; use a plain name")
        try:
            candidate.mkdir()
        except FileExistsError:
            owner_file = candidate / OWNER_FILE
            if owner_file.exists() and read_json(owner_file).get("owner") == owner:
                return candidate  # the same flow run, retried: continue where it stopped
            continue
        write_json(candidate / OWNER_FILE, {"owner": owner})
        return candidate
    raise UserError(f"run_name {base!r}: too many runs with this name under {runs_root}; choose another name")


def write_failure(run_dir: Path, stage: str, exc: BaseException) -> Path:
    """run.json for a failed run: which stage, and the one-line cause."""
    message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    return write_json(Path(run_dir) / "run.json", {"run_name": Path(run_dir).name, "run_dir": str(run_dir), "status": "failed",
                                                  "failed_stage": stage, "error": message.strip().splitlines()[0] if message.strip() else type(exc).__name__,
                                                  "error_type": type(exc).__name__, "user_error": isinstance(exc, UserError)})


def write_success(run_dir: Path, record: dict[str, Any]) -> Path:
    return write_json(Path(run_dir) / "run.json", {"status": "completed", **record})
