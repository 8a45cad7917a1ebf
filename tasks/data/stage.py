"""Prepare stage: validate the prompt dataset, tokenise it in batches, write one prompt shard per split.

Order of work, cheapest failure first: where the rows come from (a single file
for both splits and one file in both splits are refused), the tokenizers (same
vocabulary, teacher.top_k within it), the layout and template against the first
file's columns, then every row in Arrow batches. Split leakage is counted on the
way and refused at the end (unless data.allow_eval_overlap); shards are written
under temporary names and renamed only when every check has passed, the
manifest last.
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import sha256_file, tmp_path_for, write_json
from tasks.config import DataConfig
from tasks.data.checks import (
    SplitHashes,
    check_top_k,
    duplicates,
    held_out,
    id_hash,
    model_vocab_size,
    overlap_counts,
    refuse_leakage,
    text_hash,
)
from tasks.data.formats import Layout, resolve_layout
from tasks.data.reading import (
    BATCH_ROWS,
    Part,
    Sources,
    iter_batches,
    local_split_parts,
    open_part,
    resolve_sources,
)
from tasks.data.schema import PROMPT_SCHEMA, DataError
from tasks.models import load_tokenizer, tokenizer_hash

WRITE_ROWS = 65536  # rows per Parquet row group


class SplitWriter:
    """Rows of one split into `<split>.parquet` under a temporary name; `commit` renames it."""

    def __init__(self, split: str, out_dir: Path, limit: int | None):
        self.split, self.limit, self.rows = split, limit, 0
        self.path = out_dir / f"{split}.parquet"
        self.tmp = tmp_path_for(self.path)
        self._prompt_hashes, self._id_hashes = array("Q"), array("Q")
        self._buffer: dict[str, list[Any]] = {name: [] for name in PROMPT_SCHEMA.names}
        self._writer: pq.ParquetWriter | None = None

    @property
    def full(self) -> bool:
        return self.limit is not None and self.rows >= self.limit

    def add(self, example_id: str | None, prompt: str, ids: list[int], refs: list[str], prompt_hash: int) -> None:
        example_id = example_id if example_id is not None else f"{self.split}-{self.rows:07d}"
        for name, value in zip(PROMPT_SCHEMA.names, (example_id, prompt, ids, refs)):
            self._buffer[name].append(value)
        self._prompt_hashes.append(prompt_hash)
        self._id_hashes.append(id_hash(example_id))
        self.rows += 1
        if len(self._buffer["example_id"]) >= WRITE_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer["example_id"]:
            return
        if self._writer is None:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp, PROMPT_SCHEMA)
        self._writer.write_table(pa.Table.from_pydict(self._buffer, schema=PROMPT_SCHEMA))
        self._buffer = {name: [] for name in PROMPT_SCHEMA.names}

    def hashes(self) -> SplitHashes:
        out = SplitHashes()
        out.add(np.frombuffer(self._prompt_hashes, dtype=np.uint64), np.frombuffer(self._id_hashes, dtype=np.uint64))
        return out

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def commit(self) -> dict[str, Any]:
        self.tmp.replace(self.path)
        return {"path": str(self.path), "rows": self.rows, "sha256": sha256_file(self.path)}

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)


class _Tokenised:
    """Convert, tokenise and length-check one batch; hand each row to the writer chosen by `route`."""

    def __init__(self, layout: Layout, tokenizer, max_prompt_tokens: int):
        self.layout, self.tokenizer, self.max_prompt_tokens = layout, tokenizer, max_prompt_tokens
        self._backend: bool | None = None

    def encode(self, texts: list[str]) -> list[list[int]]:
        """`tokenizer(texts)["input_ids"]`. The Rust backend's `encode_batch` skips transformers' per-row Python
        conversion (about half the stage's time on short prompts); it is used only when it gives the same ids as the
        tokenizer itself on the first batch (a tokenizer class that changes text in Python keeps the slow path)."""
        add = not self.layout.chat
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if self._backend is None:
            probe = texts[:256]
            self._backend = backend is not None and hasattr(backend, "encode_batch") and \
                [e.ids for e in backend.encode_batch(probe, add_special_tokens=add)] == self.tokenizer(probe, add_special_tokens=add)["input_ids"]
        if self._backend:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add)]
        return self.tokenizer(texts, add_special_tokens=add)["input_ids"]

    def rows(self, batch: dict[str, list[Any]], part: Part, start: int):
        conv = self.layout.convert(batch, part, start, self.tokenizer)
        encoded = self.encode(conv.texts)
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_prompt_tokens:
                raise DataError(f"{part.where(start + i)}: prompt has {len(ids)} tokens, more than the {self.max_prompt_tokens} "
                                "the models' context leaves for it (context minus teacher.max_new_tokens); shorten or drop it")
            yield conv.ids[i], conv.prompts[i], ids, conv.references[i], text_hash(conv.keys[i])


def prepare(cfg: DataConfig, source: str, teacher_dir: str, student_dir: str, out_dir: Path, max_new_tokens: int,
            *, top_k: int | None = None, batch_rows: int = BATCH_ROWS) -> dict[str, Any]:
    """Validate inputs, check tokenizer compatibility, write prompt shards and their manifest (returned)."""
    sources = resolve_sources(source, cfg.train_split, cfg.eval_split, cfg.eval_fraction)
    teacher_tok, student_tok = load_tokenizer(teacher_dir), load_tokenizer(student_dir)
    t_hash, s_hash = tokenizer_hash(teacher_tok), tokenizer_hash(student_tok)
    if t_hash != s_hash:
        raise DataError(
            f"teacher tokenizer ({teacher_dir}, {len(teacher_tok)} tokens) differs from student tokenizer "
            f"({student_dir}, {len(student_tok)} tokens); stored soft labels need a shared vocabulary"
        )
    teacher_config = _model_config(teacher_dir)
    check_top_k(top_k, model_vocab_size(teacher_config, len(teacher_tok)), teacher_dir)
    context = min(int(teacher_config.get("max_position_embeddings", 2048)), int(_model_config(student_dir).get("max_position_embeddings", 2048)))
    max_prompt_tokens = context - max_new_tokens

    out_dir = Path(out_dir)
    writers = {cfg.train_split: SplitWriter(cfg.train_split, out_dir, cfg.max_train_examples),
               cfg.eval_split: SplitWriter(cfg.eval_split, out_dir, cfg.max_eval_examples)}
    try:
        layout = _read_all(cfg, source, sources, writers, teacher_tok, teacher_dir, max_prompt_tokens, batch_rows)
        for writer in writers.values():
            writer.close()
        train, evaluation = writers[cfg.train_split], writers[cfg.eval_split]
        for writer in (train, evaluation):
            if writer.rows == 0:
                if sources.pool is not None:
                    raise DataError(f"data.source {source}: data.eval_fraction={cfg.eval_fraction} leaves split {writer.split!r} "
                                    "empty; it needs at least one row (change data.eval_fraction or add rows)")
                raise DataError(f"data.source {source}: split {writer.split!r} is empty; it needs at least one row")
        train_hashes, eval_hashes = train.hashes(), evaluation.hashes()
        checks: dict[str, Any] = {
            "format": layout.format,
            "split_by": "eval_fraction" if sources.pool is not None else "files",
            "train_duplicates": duplicates(train_hashes.prompt_array()),
            "eval_duplicates": duplicates(eval_hashes.prompt_array()),
            **overlap_counts(train_hashes, eval_hashes),
            "train_duplicate_ids": duplicates(train_hashes.id_array()),
            "eval_duplicate_ids": duplicates(eval_hashes.id_array()),
            "eval_overlap_allowed": cfg.allow_eval_overlap,
        }
        if not cfg.allow_eval_overlap:
            refuse_leakage(checks, evaluation.rows, cfg.train_split, cfg.eval_split)
        splits = {name: writer.commit() for name, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    manifest = {
        "source": source,
        "splits": splits,
        "train_split": cfg.train_split,
        "eval_split": cfg.eval_split,
        "tokenizer_hash": t_hash,
        "vocab_size": len(teacher_tok),
        "teacher_dir": teacher_dir,
        "student_dir": student_dir,
        "checks": checks,
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _read_all(cfg: DataConfig, source: str, sources: Sources, writers: dict[str, SplitWriter], tokenizer, tokenizer_dir: str,
              max_prompt_tokens: int, batch_rows: int) -> Layout:
    """Stream every part into its writer(s); returns the layout used. Stops reading a split once its cap is reached."""
    layout: Layout | None = None
    tokenised: _Tokenised | None = None
    plan = [(None, sources.pool)] if sources.pool is not None else list(sources.splits.items())
    for split, parts in plan:
        for part in parts:
            targets = list(writers.values()) if split is None else [writers[split]]
            if all(w.full for w in targets):
                break
            ds = open_part(part, source)
            if ds is None:
                continue
            if layout is None:
                layout = resolve_layout(cfg, list(ds.column_names), part.label, tokenizer, tokenizer_dir)
                tokenised = _Tokenised(layout, tokenizer, max_prompt_tokens)
            else:
                layout.check_columns(list(ds.column_names), part.label)
            for start, batch in iter_batches(ds, part, batch_rows):
                for example_id, prompt, ids, refs, prompt_hash in tokenised.rows(batch, part, start):
                    if split is None:
                        writer = writers[cfg.eval_split] if held_out(prompt_hash, cfg.eval_fraction) else writers[cfg.train_split]
                    else:
                        writer = writers[split]
                    if not writer.full:
                        writer.add(example_id, prompt, ids, refs, prompt_hash)
                if all(w.full for w in targets):
                    break
    if layout is None:
        empty = cfg.train_split if sources.pool is None else "pool"
        raise DataError(f"data.source {source}: split {empty!r} is empty; it needs at least one row")
    return layout


def _model_config(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def load_rows(source: str, split: str) -> list[dict[str, Any]]:
    """Every row of one split as dicts (for benches and small data; the stage itself streams batches)."""
    parts = local_split_parts(Path(source), split) if Path(source).is_dir() else resolve_sources(source, split, "", 0.5).pool
    rows: list[dict[str, Any]] = []
    for part in parts:
        ds = open_part(part, source)
        if ds is not None:
            rows.extend(dict(r) for r in ds)
    return rows

