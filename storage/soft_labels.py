"""Teacher soft labels in Parquet: schema, shard writer, manifest and streaming reader.

One row per sequence. Per response position the row holds the teacher's top-k
token ids and log-probabilities (sorted descending), the realised token's
log-probability and `tail_logmass`, the log of the probability outside the
top-k. How those arrays are laid out in columns is the shard's codec
(storage/codec.py); `read` decodes every codec to the same numpy records.
The format, its metadata and its invariants: storage/FORMAT.md.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.atomic import read_json, sha256_file, sha256_json, tmp_path_for, write_json
from storage.codec import CODECS, DEFAULT_CODEC, FlatLabels, column_width, get_codec
from storage.errors import UserError
from storage.location import Location, locate

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
METADATA_KEY = b"stillhouse"
RESPONSE_SOURCES = ("teacher_sample", "reference", "student_rollout", "mixup")
ZSTD_LEVEL = 6
# Metadata fields whose value is fixed per capture; a shard written with other values is stale.
IDENTITY_FIELDS = ("schema_version", "codec", "teacher_key", "tokenizer_hash", "k", "split", "response_source")

COMMON_FIELDS = [
    pa.field("sample_id", pa.string()),
    pa.field("example_id", pa.string()),
    pa.field("split", pa.string()),
    pa.field("response_source", pa.string()),
    pa.field("prompt_ids", pa.list_(pa.int32())),
    pa.field("response_ids", pa.list_(pa.int32())),
]


def schema_for(codec: str) -> pa.Schema:
    return pa.schema(COMMON_FIELDS + get_codec(codec).schema_fields())


SCHEMA = schema_for(DEFAULT_CODEC)


class SoftLabelError(UserError):
    """A soft-label file is missing, corrupt or incompatible; the message names it (a UserError, so a ValueError)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def label_key(metadata: dict[str, Any]) -> str:
    """What a finished shard must have been written with to be reused by a capture."""
    full = {**metadata, "codec": metadata.get("codec", DEFAULT_CODEC), "schema_version": SCHEMA_VERSION}
    return sha256_json({f: full.get(f) for f in IDENTITY_FIELDS})[:16]


# --- writing ---------------------------------------------------------------------------

def _flatten_rows(rows: list[dict[str, Any]], k: int, where: str) -> FlatLabels:
    lengths = np.array([len(r["response_ids"]) for r in rows], dtype=np.int64)
    for r, t in zip(rows, lengths):
        name = f"{where}: sample {r.get('sample_id')} (example {r.get('example_id')})"
        if t == 0:
            raise SoftLabelError(f"{name}: field response_ids is empty; every stored sequence needs at least one response token")
        if r.get("response_source") not in RESPONSE_SOURCES:
            raise SoftLabelError(f"{name}: field response_source {r.get('response_source')!r} is not one of {RESPONSE_SOURCES}")
        for field, width in (("topk_ids", k), ("topk_logprobs", k), ("token_logprob", 1), ("tail_logmass", 1)):
            size = np.size(r[field])
            if size != t * width:
                raise SoftLabelError(
                    f"{name}: field {field} has {size} values, expected {t * width} (one label row per response token, k={k})"
                )

    def cat(field, dtype, width=None):
        if not rows:
            return np.zeros((0, width) if width else 0, dtype=dtype)
        out = np.concatenate([np.asarray(r[field], dtype=dtype).reshape(-1) for r in rows])
        return out.reshape(-1, width) if width else out

    return FlatLabels(
        response_ids=cat("response_ids", np.int64),
        topk_ids=cat("topk_ids", np.int64, k),
        topk_logprobs=cat("topk_logprobs", np.float32, k),
        token_logprob=cat("token_logprob", np.float32),
        tail_logmass=cat("tail_logmass", np.float32),
        lengths=lengths,
    )


def _list_array(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def encode_table(rows: list[dict[str, Any]], metadata: dict[str, Any], where: str = "shard") -> pa.Table:
    """The Parquet table of `rows` (decoded labels) in the codec named by metadata['codec']."""
    codec = get_codec(metadata.get("codec", DEFAULT_CODEC))
    k = int(metadata["k"])
    flat = _flatten_rows(rows, k, where)
    schema = schema_for(codec.name)
    prompt_lengths = np.array([len(r["prompt_ids"]) for r in rows], dtype=np.int64)
    prompts = np.concatenate([np.asarray(r["prompt_ids"], dtype=np.int32) for r in rows]) if rows else np.zeros(0, np.int32)
    columns = {
        "sample_id": pa.array([r["sample_id"] for r in rows], pa.string()),
        "example_id": pa.array([r["example_id"] for r in rows], pa.string()),
        "split": pa.array([r["split"] for r in rows], pa.string()),
        "response_source": pa.array([r["response_source"] for r in rows], pa.string()),
        "prompt_ids": _list_array(prompts, prompt_lengths, pa.int32()),
        "response_ids": _list_array(flat.response_ids.astype(np.int32), flat.lengths, pa.int32()),
    }
    try:
        encoded = codec.encode(flat)
    except ValueError as exc:
        raise SoftLabelError(f"{where}: {exc}") from exc
    for field in codec.fields:
        values, lengths = encoded[field.name]
        if pa.types.is_list(field.type):
            columns[field.name] = _list_array(values, lengths, field.type.value_type)
        else:
            columns[field.name] = pa.array(values, field.type)
    table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
    meta = {**metadata, "codec": codec.name, "schema_version": SCHEMA_VERSION}
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def write_parquet(table: pa.Table, path: Path, codec: str) -> None:
    spec = get_codec(codec)
    pq.write_table(
        table, path, compression="zstd", compression_level=ZSTD_LEVEL,
        use_dictionary=["split", "response_source"],
        column_encoding={f"{name}.list.element": "BYTE_STREAM_SPLIT" for name in spec.byte_stream_split},
    )


def write_shard(out_dir: Path, index: int, rows: list[dict[str, Any]], metadata: dict[str, Any],
                inputs_key: str | None = None) -> dict[str, Any]:
    """Write one shard atomically, then a sidecar record of its checksum; return that record.

    The shard is written under a temporary name and renamed; the sidecar comes
    after the rename, so a shard with a matching sidecar is complete. A crash
    leaves at most a temporary file that no reader lists. `inputs_key` (a hash
    of the prompts the shard covers) lets a resumed capture check it is reusing
    the shard for the same inputs.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / shard_name(index)
    codec = metadata.get("codec", DEFAULT_CODEC)
    table = encode_table(rows, metadata, where=str(path))
    tmp = tmp_path_for(path)
    try:
        write_parquet(table, tmp, codec)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    record = {
        "path": path.name,
        "rows": len(rows),
        "tokens": int(sum(len(r["response_ids"]) for r in rows)),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "codec": codec,
        "label_key": label_key(metadata),
        "inputs_key": inputs_key,
    }
    write_json(path.with_suffix(".json"), record)
    return record


def finished_shard(out_dir: Path, index: int, metadata: dict[str, Any] | None = None,
                   inputs_key: str | None = None) -> dict[str, Any] | None:
    """The sidecar record of a reusable shard, else None (to be redone).

    Reusable: the shard's bytes match its checksum and, when given, it was
    written with the same labelling setup (metadata) for the same inputs.
    """
    path = Path(out_dir) / shard_name(index)
    sidecar = path.with_suffix(".json")
    if not (path.exists() and sidecar.exists()):
        return None
    try:
        record = read_json(sidecar)
    except (OSError, ValueError):
        return None
    if record.get("sha256") != sha256_file(path):
        return None
    if metadata is not None and record.get("label_key") != label_key(metadata):
        return None
    if inputs_key is not None and record.get("inputs_key") != inputs_key:
        return None
    return record


def write_manifest(out_dir: Path, shards: list[dict[str, Any]], metadata: dict[str, Any]) -> Path:
    """Write the manifest atomically; an identical existing manifest is left untouched (a rerun writes nothing)."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "shards": shards,
        "num_rows": int(sum(s["rows"] for s in shards)),
        "num_tokens": int(sum(s["tokens"] for s in shards)),
        "bytes": int(sum(s.get("bytes", 0) for s in shards)),
        "metadata": {**metadata, "codec": metadata.get("codec", DEFAULT_CODEC), "schema_version": SCHEMA_VERSION},
    }
    path = Path(out_dir) / MANIFEST_NAME
    if path.exists():
        try:
            if read_json(path) == json.loads(json.dumps(manifest, default=str)):
                return path
        except ValueError:
            pass
    return write_json(path, manifest)


# --- reading ---------------------------------------------------------------------------

def _corrupt(where: Location, problem: str) -> SoftLabelError:
    return SoftLabelError(
        f"{where}: {problem}; the manifest is truncated or corrupt: delete the folder {where.parent()} to relabel, "
        "or rerun: the teacher stage rewrites it from the finished shards (an uploaded copy: upload the capture again, manifest last)"
    )


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_structure(where: Location, manifest: Any) -> None:
    """The keys and types every reader relies on, so a damaged manifest fails here, naming the field, not with a KeyError."""
    if not isinstance(manifest, dict):
        raise _corrupt(where, f"holds a JSON {type(manifest).__name__}, expected an object")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise SoftLabelError(
            f"{where}: field schema_version is {manifest.get('schema_version')!r}, this code reads {SCHEMA_VERSION}; "
            "recapture the labels with this version"
        )
    if not isinstance(manifest.get("shards"), list):
        raise _corrupt(where, "field shards is missing or not a list")
    if not isinstance(manifest.get("metadata"), dict):
        raise _corrupt(where, "field metadata is missing or not an object")
    for i, record in enumerate(manifest["shards"]):
        if not isinstance(record, dict):
            raise _corrupt(where, f"field shards[{i}] is not an object")
        for field, ok, wanted in (("path", lambda x: isinstance(x, str) and x, "a file name"),
                                  ("rows", _is_count, "a count"), ("sha256", lambda x: isinstance(x, str) and x, "a checksum")):
            if not ok(record.get(field)):
                raise _corrupt(where, f"field shards[{i}].{field} is {record.get(field)!r}, expected {wanted}")
        if record.get("tokens") is not None and not _is_count(record["tokens"]):
            raise _corrupt(where, f"field shards[{i}].tokens is {record['tokens']!r}, expected a count")
    for total, field in (("num_rows", "rows"), ("num_tokens", "tokens")):
        if total in manifest and all(r.get(field) is not None for r in manifest["shards"]):
            summed = sum(r[field] for r in manifest["shards"])
            if manifest[total] != summed:
                raise _corrupt(where, f"field {total} is {manifest[total]!r} but its shards hold {summed} {field}")


def _confine(where: Location, folder: Location, index: int, name: str) -> None:
    """A shard path must name a file inside the manifest's folder: relative, no '..', no symlink leading out."""
    field = f"field shards[{index}].path {name!r}"
    fix = f"a manifest may only list shards inside its own folder {folder}; rerun the teacher stage to rewrite it"
    if "\\" in name or "://" in name or posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise SoftLabelError(f"{where}: {field} is absolute; {fix}")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise SoftLabelError(f"{where}: {field} is not a plain relative path (empty, '.' or '..' component); {fix}")
    if isinstance(folder.fs, pafs.LocalFileSystem):  # object stores have no symlinks
        root = os.path.realpath(folder.path)
        target = os.path.realpath(os.path.join(folder.path, *parts))
        if os.path.commonpath([root, target]) != root:
            raise SoftLabelError(f"{where}: {field} resolves to {target} through a symlink, outside the folder; {fix}")


def load_manifest(manifest_path: Path | str) -> dict[str, Any]:
    """The manifest of a capture: a manifest file or its folder, as a local path or a URI (storage.location).

    Checked before any shard is opened: the structure (keys, types, totals) and that every shard path stays
    inside the manifest's folder.
    """
    where = locate(manifest_path)
    if where.is_dir():
        where = where.join(MANIFEST_NAME)
    if not where.exists():
        raise SoftLabelError(f"{where}: soft-label manifest not found; run the teacher stage first")
    try:
        raw = where.read_bytes()
    except OSError as exc:
        raise SoftLabelError(f"{where}: cannot read the soft-label manifest ({exc}); check its permissions") from exc
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise _corrupt(where, f"not valid JSON ({exc})") from exc
    _check_structure(where, manifest)
    folder = where.parent()
    for index, record in enumerate(manifest["shards"]):
        _confine(where, folder, index, record["path"])
    manifest["_dir"] = str(folder)
    manifest["_manifest"] = str(where)
    return manifest


def shard_paths(manifest: dict[str, Any]) -> list[Path]:
    """Local shard paths (for tools that need files; `read` also takes URIs)."""
    return [Path(manifest["_dir"]) / s["path"] for s in manifest["shards"]]


def shard_metadata(path: Path | str | Location) -> dict[str, Any]:
    where = path if isinstance(path, Location) else locate(path)
    with where.open() as f:
        raw = (pq.read_schema(f).metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise SoftLabelError(f"{where}: no '{METADATA_KEY.decode()}' metadata; not a stillhouse soft-label shard")
    return json.loads(raw)


def _verify_shard(where: Location, record: dict[str, Any]) -> None:
    if not where.exists():
        raise SoftLabelError(f"{where}: shard listed in the manifest is missing; rerun the teacher stage")
    if where.sha256() != record["sha256"]:
        raise SoftLabelError(f"{where}: checksum mismatch (truncated or modified); rerun the teacher stage to regenerate it")


def _check_counts(where: Location, parquet: pq.ParquetFile, record: dict[str, Any], manifest_name: str) -> None:
    """The shard holds the rows (and response tokens, where recorded) its manifest record says, before any row is used."""
    rows = parquet.metadata.num_rows
    if rows != record["rows"]:
        raise SoftLabelError(
            f"{where}: holds {rows} rows but {manifest_name} records {record['rows']} (field rows); the manifest does not "
            "describe this shard: rerun the teacher stage to rewrite both"
        )
    if record.get("tokens") is None:
        return
    tokens = sum(int(pc.sum(batch.column(0).value_lengths()).as_py() or 0)
                 for batch in parquet.iter_batches(columns=["response_ids"], batch_size=4096))
    if tokens != record["tokens"]:
        raise SoftLabelError(
            f"{where}: holds {tokens} response tokens but {manifest_name} records {record['tokens']} (field tokens); "
            "the manifest does not describe this shard: rerun the teacher stage to rewrite both"
        )


def _check_shard_metadata(path: Path, meta: dict[str, Any], manifest_meta: dict[str, Any],
                          expected_tokenizer_hash: str | None) -> None:
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise SoftLabelError(
            f"{path}: field schema_version is {meta.get('schema_version')!r}, this code reads {SCHEMA_VERSION}; "
            "recapture the labels with this version"
        )
    if meta.get("codec", DEFAULT_CODEC) not in CODECS:
        raise SoftLabelError(f"{path}: field codec {meta.get('codec')!r} is unknown; known: {', '.join(CODECS)}")
    for field in ("tokenizer_hash", "k"):
        if field in manifest_meta and meta.get(field) != manifest_meta[field]:
            raise SoftLabelError(
                f"{path}: field {field} is {meta.get(field)!r} but the manifest says {manifest_meta[field]!r}; "
                "the shard comes from another capture"
            )
    if expected_tokenizer_hash is not None and meta.get("tokenizer_hash") != expected_tokenizer_hash:
        raise SoftLabelError(
            f"{path}: field tokenizer_hash {meta.get('tokenizer_hash')} does not match the student's "
            f"tokenizer {expected_tokenizer_hash}; teacher and student must share a tokenizer"
        )


def _flat_list(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Values and per-row lengths of a list column (nulls count as empty)."""
    lengths = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values, lengths


def _decode_batch(batch: pa.RecordBatch, meta: dict[str, Any], path: Path, vocab_size: int | None) -> list[dict[str, Any]]:
    codec = get_codec(meta.get("codec", DEFAULT_CODEC))
    k = int(meta["k"])
    sample_ids = batch.column("sample_id").to_pylist()
    response, lengths = _flat_list(batch.column("response_ids"))
    cols = {}
    for field in codec.fields:
        if not pa.types.is_list(field.type):
            cols[field.name] = np.frombuffer(b"".join(v or b"" for v in batch.column(field.name).to_pylist()), dtype=np.uint8)
            continue
        values, got = _flat_list(batch.column(field.name))
        per_token = column_width(field.name, k)
        if per_token is not None:
            bad = np.flatnonzero(got != lengths * per_token)
            if bad.size:
                i = int(bad[0])
                raise SoftLabelError(
                    f"{path}: sample {sample_ids[i]} field {field.name} has {got[i]} values, "
                    f"expected {lengths[i] * per_token} (one label row per response token, k={k})"
                )
        cols[field.name] = values
    if np.any(lengths == 0):
        i = int(np.flatnonzero(lengths == 0)[0])
        raise SoftLabelError(f"{path}: sample {sample_ids[i]} field response_ids is empty")
    try:
        flat = codec.decode(cols, response.astype(np.int64), lengths, k)
    except ValueError as exc:
        raise SoftLabelError(f"{path}: {exc}") from exc
    if vocab_size is not None and flat.topk_ids.size and int(flat.topk_ids.max()) >= vocab_size:
        row = int(np.searchsorted(np.cumsum(lengths), int(np.flatnonzero(flat.topk_ids.max(axis=1) >= vocab_size)[0]), side="right"))
        raise SoftLabelError(f"{path}: sample {sample_ids[row]} field topk_ids holds ids >= vocab size {vocab_size}")
    if flat.topk_ids.size and int(flat.topk_ids.min()) < 0:
        raise SoftLabelError(f"{path}: field topk_ids holds negative ids")
    prompts, prompt_lengths = _flat_list(batch.column("prompt_ids"))
    prompt_rows = np.split(prompts.astype(np.int64), np.cumsum(prompt_lengths)[:-1])
    cuts = np.cumsum(lengths)[:-1]
    split = {name: np.split(getattr(flat, name), cuts) for name in
             ("response_ids", "topk_ids", "topk_logprobs", "token_logprob", "tail_logmass")}
    example_ids = batch.column("example_id").to_pylist()
    splits = batch.column("split").to_pylist()
    sources = batch.column("response_source").to_pylist()
    return [
        {
            "sample_id": sample_ids[i],
            "example_id": example_ids[i],
            "split": splits[i],
            "response_source": sources[i],
            "prompt_ids": prompt_rows[i],
            **{name: split[name][i] for name in split},
        }
        for i in range(batch.num_rows)
    ]


def read_shard(path: Path, *, vocab_size: int | None = None, batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """Decoded records of one shard file (no checksum check: see `read`)."""
    path = Path(path)
    meta = shard_metadata(path)
    _check_shard_metadata(path, meta, {}, None)
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        yield from _decode_batch(batch, meta, path, vocab_size)


def read(
    manifest_path: Path,
    *,
    expected_tokenizer_hash: str | None = None,
    vocab_size: int | None = None,
    shards: list[int] | None = None,
    verify: bool = True,
) -> Iterator[dict[str, Any]]:
    """Stream decoded per-sequence records, one shard and one record batch at a time.

    Each record: sample_id, example_id, split, response_source, prompt_ids [P],
    response_ids [T], topk_ids [T,k], topk_logprobs [T,k], token_logprob [T],
    tail_logmass [T] (numpy). `shards` selects shard indices (e.g. a
    data-parallel worker's share). With `verify` each shard's checksum is
    checked before it is decoded.
    """
    manifest = load_manifest(manifest_path)
    meta = manifest["metadata"]
    if expected_tokenizer_hash is not None and meta.get("tokenizer_hash") != expected_tokenizer_hash:
        raise SoftLabelError(
            f"{manifest_path}: field tokenizer_hash {meta.get('tokenizer_hash')} does not match the student's "
            f"tokenizer {expected_tokenizer_hash}; teacher and student must share a tokenizer"
        )
    records = manifest["shards"]
    selected = range(len(records)) if shards is None else shards
    for index in selected:
        record = records[index]
        where = locate(manifest["_dir"]).join(record["path"])  # confined to the folder by load_manifest
        if verify:
            _verify_shard(where, record)
        try:
            shard_meta = shard_metadata(where)
        except (OSError, pa.ArrowException) as exc:
            raise SoftLabelError(f"{where}: unreadable Parquet ({exc}); rerun the teacher stage to regenerate it") from exc
        _check_shard_metadata(where, shard_meta, meta, expected_tokenizer_hash)
        with where.open() as f:
            parquet = pq.ParquetFile(f)
            _check_counts(where, parquet, record, manifest["_manifest"])
            for batch in parquet.iter_batches(batch_size=256):
                yield from _decode_batch(batch, shard_meta, where, vocab_size)
