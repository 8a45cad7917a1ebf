"""The stored mixup plan: per epoch, pairs (i, j) of training sequences and lambda ~ Beta(alpha, alpha).

Fixed in advance so that the teacher can score the mixed inputs offline and training can
resume mid-run: epoch e is drawn from its own generator, seeded from (seed, e), so any
epoch can be (re)written alone and comes out byte-identical. Format: storage/FORMAT.md,
"Mixup plan".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import read_json, sha256_file, sha256_json, write_json, write_parquet
from storage.errors import UserError

PLAN_VERSION = 1
MANIFEST_NAME = "manifest.json"
METADATA_KEY = b"stillhouse_mixup_plan"

PLAN_SCHEMA = pa.schema([
    ("plan_row_id", pa.string()),   # "e{epoch:04d}-r{row:06d}": the id mixed soft labels carry as example_id
    ("epoch", pa.int32()),
    ("row", pa.int32()),
    ("i", pa.int32()),              # index into the plan's source ids
    ("j", pa.int32()),
    ("id_i", pa.string()),          # source ids (sample_id of the original soft-label rows)
    ("id_j", pa.string()),
    ("lam", pa.float64()),          # weight of sequence i: e' = lam * E(x_i) + (1 - lam) * E(x_j)
])


class PlanError(UserError):
    """A mixup plan cannot be made or used as asked; the message names the file or setting."""


def epoch_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.parquet"


def plan_row_id(epoch: int, row: int) -> str:
    return f"e{epoch:04d}-r{row:06d}"


def plan_key(ids: list[str], *, alpha: float, seed: int, pairs_per_epoch: int | None) -> str:
    """What an epoch file must have been drawn with to be reused (not the epoch count: epochs are independent)."""
    return sha256_json({"version": PLAN_VERSION, "ids": sha256_json(list(ids)), "alpha": float(alpha), "seed": int(seed),
                        "pairs_per_epoch": pairs_per_epoch})[:16]


def draw_epoch(ids: list[str], epoch: int, *, alpha: float, seed: int, pairs_per_epoch: int | None = None) -> pa.Table:
    """Epoch `epoch` of the plan: i runs over a permutation of the ids (cycled when more pairs than ids are
    asked for), j = (i + offset) mod n with offset uniform in 1..n-1, so j != i; lam ~ Beta(alpha, alpha)."""
    n = len(ids)
    if n < 2:
        raise PlanError(f"a mixup plan needs at least 2 training sequences, got {n}")
    if not alpha > 0:
        raise PlanError(f"mixkd.alpha must be > 0, got {alpha}")
    pairs = pairs_per_epoch or n
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)])))
    reps = -(-pairs // n)
    i = np.concatenate([rng.permutation(n) for _ in range(reps)])[:pairs]
    j = (i + rng.integers(1, n, size=pairs)) % n
    lam = rng.beta(alpha, alpha, size=pairs)
    rows = np.arange(pairs)
    table = pa.Table.from_arrays([
        pa.array([plan_row_id(epoch, r) for r in rows], pa.string()),
        pa.array(np.full(pairs, epoch), pa.int32()),
        pa.array(rows, pa.int32()),
        pa.array(i, pa.int32()),
        pa.array(j, pa.int32()),
        pa.array([ids[k] for k in i], pa.string()),
        pa.array([ids[k] for k in j], pa.string()),
        pa.array(lam, pa.float64()),
    ], schema=PLAN_SCHEMA)
    meta = {"version": PLAN_VERSION, "epoch": int(epoch), "seed": int(seed), "alpha": float(alpha),
            "plan_key": plan_key(ids, alpha=alpha, seed=seed, pairs_per_epoch=pairs_per_epoch)}
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def _epoch_meta(path: Path) -> dict[str, Any] | None:
    try:
        raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
        return json.loads(raw) if raw else None
    except (OSError, pa.ArrowException, ValueError):
        return None


def write_plan(out_dir: str | Path, ids: list[str], *, epochs: int, alpha: float, seed: int,
               pairs_per_epoch: int | None = None, source: dict[str, Any] | None = None, log_fn=print) -> Path:
    """Write (or finish) the plan: one Parquet file per epoch, atomically, then the manifest last.

    An epoch file already drawn with the same ids and settings is kept (resume); any other is redrawn.
    `source` (e.g. the labels manifest path and its hash) is recorded in the manifest.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = plan_key(ids, alpha=alpha, seed=seed, pairs_per_epoch=pairs_per_epoch)
    records = []
    for epoch in range(epochs):
        path = out_dir / epoch_name(epoch)
        meta = _epoch_meta(path) if path.exists() else None
        if meta is not None and meta.get("plan_key") == key and meta.get("epoch") == epoch:
            log_fn(f"mixup plan: epoch {epoch} already drawn, kept")
        else:
            table = draw_epoch(ids, epoch, alpha=alpha, seed=seed, pairs_per_epoch=pairs_per_epoch)
            write_parquet(table, path, compression="zstd")
        records.append({"epoch": epoch, "path": path.name, "rows": pq.read_metadata(path).num_rows, "sha256": sha256_file(path)})
    manifest = {"version": PLAN_VERSION, "plan_key": key, "seed": int(seed), "alpha": float(alpha), "epochs": epochs,
                "pairs_per_epoch": pairs_per_epoch, "num_ids": len(ids), "ids_sha256": sha256_json(list(ids))[:16],
                "source": source or {}, "files": records}
    path = out_dir / MANIFEST_NAME
    if path.exists():
        try:
            if read_json(path) == json.loads(json.dumps(manifest)):
                return path
        except ValueError:
            pass
    return write_json(path, manifest)


def load_plan(plan_dir: str | Path) -> dict[str, Any]:
    path = Path(plan_dir) / MANIFEST_NAME
    if not path.exists():
        raise PlanError(f"{path}: mixup plan manifest not found; write the plan first (tasks.augment.write_plan)")
    manifest = read_json(path)
    if manifest.get("version") != PLAN_VERSION:
        raise PlanError(f"{path}: field version is {manifest.get('version')!r}, this code reads {PLAN_VERSION}; rewrite the plan")
    manifest["_dir"] = str(Path(plan_dir))
    return manifest


def read_epoch(plan: dict[str, Any], epoch: int, verify: bool = True) -> list[dict[str, Any]]:
    """Rows of one epoch (checksum checked against the manifest)."""
    records = {r["epoch"]: r for r in plan["files"]}
    if epoch not in records:
        raise PlanError(f"{plan['_dir']}: the plan has no epoch {epoch} (it has {len(records)}); write it with more epochs")
    path = Path(plan["_dir"]) / records[epoch]["path"]
    if verify and sha256_file(path) != records[epoch]["sha256"]:
        raise PlanError(f"{path}: checksum mismatch (truncated or modified); rewrite the plan")
    return pq.read_table(path).to_pylist()
