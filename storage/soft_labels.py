"""Teacher soft labels in Parquet: schema, shard writer, manifest and streaming reader.

One row per sequence. Per response position the row holds the teacher's top-k
token ids and log-probabilities (sorted descending), the realised token's
log-probability and `tail_logmass`, the log of the probability outside the
top-k. Per-position arrays are stored flattened (T*k) because pyarrow, Ray
Data, HF datasets and DuckDB all read flat lists fast; k is in the metadata.
See storage/FORMAT.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import read_json, sha256_file, tmp_path_for, write_json

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
METADATA_KEY = b"stillhouse"
RESPONSE_SOURCES = ("teacher_sample", "reference", "student_rollout")

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("example_id", pa.string()),
        ("split", pa.string()),
        ("response_source", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("topk_ids", pa.list_(pa.int32())),
        ("topk_logprobs", pa.list_(pa.float32())),
        ("token_logprob", pa.list_(pa.float32())),
        ("tail_logmass", pa.list_(pa.float32())),
    ]
)


class SoftLabelError(ValueError):
    """A soft-label file is missing, corrupt or incompatible; the message names it."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def write_shard(out_dir: Path, index: int, rows: list[dict[str, Any]], metadata: dict[str, Any]) -> dict[str, Any]:
    """Write one shard atomically and a sidecar record of its checksum; return that record.

    The sidecar is written after the rename, so a shard with a valid sidecar is
    complete; a crash leaves at most a temporary file that no reader lists.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / shard_name(index)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    tmp = tmp_path_for(path)
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)
    record = {
        "path": path.name,
        "rows": len(rows),
        "tokens": int(sum(len(r["response_ids"]) for r in rows)),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }
    write_json(path.with_suffix(".json"), record)
    return record


def finished_shard(out_dir: Path, index: int) -> dict[str, Any] | None:
    """The sidecar record of a shard whose bytes still match it, else None (to be redone)."""
    path = out_dir / shard_name(index)
    sidecar = path.with_suffix(".json")
    if not (path.exists() and sidecar.exists()):
        return None
    record = read_json(sidecar)
    if record.get("sha256") != sha256_file(path):
        return None
    return record


def write_manifest(out_dir: Path, shards: list[dict[str, Any]], metadata: dict[str, Any]) -> Path:
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "shards": shards,
        "num_rows": int(sum(s["rows"] for s in shards)),
        "num_tokens": int(sum(s["tokens"] for s in shards)),
        "metadata": metadata,
    }
    return write_json(out_dir / MANIFEST_NAME, manifest)


def load_manifest(manifest_path: Path) -> dict[str, Any]:
    manifest_path = Path(manifest_path)
    if manifest_path.is_dir():
        manifest_path = manifest_path / MANIFEST_NAME
    if not manifest_path.exists():
        raise SoftLabelError(f"{manifest_path}: soft-label manifest not found; run the teacher stage first")
    manifest = read_json(manifest_path)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise SoftLabelError(
            f"{manifest_path}: schema_version {manifest.get('schema_version')!r}, this code reads {SCHEMA_VERSION}; "
            "recapture the labels with this version"
        )
    manifest["_dir"] = str(manifest_path.parent)
    return manifest


def shard_paths(manifest: dict[str, Any]) -> list[Path]:
    return [Path(manifest["_dir"]) / s["path"] for s in manifest["shards"]]


def _verify_shard(path: Path, record: dict[str, Any]) -> None:
    if not path.exists():
        raise SoftLabelError(f"{path}: shard listed in the manifest is missing; rerun the teacher stage")
    if sha256_file(path) != record["sha256"]:
        raise SoftLabelError(f"{path}: checksum mismatch (truncated or modified); rerun the teacher stage to regenerate it")


def _decode_row(row: dict[str, Any], k: int, shard: Path, vocab_size: int | None) -> dict[str, Any]:
    t = len(row["response_ids"])
    out = {
        "sample_id": row["sample_id"],
        "example_id": row["example_id"],
        "split": row["split"],
        "response_source": row["response_source"],
        "prompt_ids": np.asarray(row["prompt_ids"], dtype=np.int64),
        "response_ids": np.asarray(row["response_ids"], dtype=np.int64),
        "topk_ids": np.asarray(row["topk_ids"], dtype=np.int64),
        "topk_logprobs": np.asarray(row["topk_logprobs"], dtype=np.float32),
        "token_logprob": np.asarray(row["token_logprob"], dtype=np.float32),
        "tail_logmass": np.asarray(row["tail_logmass"], dtype=np.float32),
    }
    for field, expected in (("topk_ids", t * k), ("topk_logprobs", t * k), ("token_logprob", t), ("tail_logmass", t)):
        if out[field].size != expected:
            raise SoftLabelError(
                f"{shard}: sample {row['sample_id']} field {field} has {out[field].size} values, "
                f"expected {expected} (one label row per response token, k={k})"
            )
    out["topk_ids"] = out["topk_ids"].reshape(t, k)
    out["topk_logprobs"] = out["topk_logprobs"].reshape(t, k)
    if vocab_size is not None and t and int(out["topk_ids"].max()) >= vocab_size:
        raise SoftLabelError(f"{shard}: sample {row['sample_id']} field topk_ids holds ids >= vocab size {vocab_size}")
    return out


def read(
    manifest_path: Path,
    *,
    expected_tokenizer_hash: str | None = None,
    vocab_size: int | None = None,
    shards: list[int] | None = None,
    verify: bool = True,
) -> Iterator[dict[str, Any]]:
    """Stream decoded per-sequence records, one shard and one row group at a time.

    `shards` selects shard indices (e.g. a data-parallel worker's share).
    """
    manifest = load_manifest(manifest_path)
    meta = manifest["metadata"]
    if expected_tokenizer_hash is not None and meta.get("tokenizer_hash") != expected_tokenizer_hash:
        raise SoftLabelError(
            f"{manifest_path}: field tokenizer_hash {meta.get('tokenizer_hash')} does not match the student's "
            f"tokenizer {expected_tokenizer_hash}; teacher and student must share a tokenizer"
        )
    k = int(meta["k"])
    records = manifest["shards"]
    selected = range(len(records)) if shards is None else shards
    for index in selected:
        record = records[index]
        path = Path(manifest["_dir"]) / record["path"]
        if verify:
            _verify_shard(path, record)
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield _decode_row(row, k, path, vocab_size)
