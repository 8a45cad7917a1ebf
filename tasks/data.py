"""Prepare stage: load and validate the prompt dataset, tokenise it, write prompt shards.

Everything that can be checked without loading a model is checked here, so bad
input fails in seconds with one message naming the field or file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import sha256_file, tmp_path_for, write_json
from tasks.config import DataConfig
from tasks.models import load_tokenizer, tokenizer_hash
from tasks.prompting import format_prompt

PROMPT_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("prompt", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("references", pa.list_(pa.string())),
    ]
)


class DataError(ValueError):
    """The dataset cannot be used; the message says which file or field and what to do."""


def _local_split_file(folder: Path, split: str) -> Path:
    for suffix in (".jsonl", ".json", ".parquet"):
        candidate = folder / f"{split}{suffix}"
        if candidate.exists():
            return candidate
    raise DataError(f"{folder}: no {split}.jsonl or {split}.parquet; name the split files after data.train_split / data.eval_split")


def load_rows(source: str, split: str) -> list[dict[str, Any]]:
    """Rows of one split from a local folder/file or a Hugging Face dataset id."""
    import datasets

    path = Path(source)
    if path.exists():
        file = _local_split_file(path, split) if path.is_dir() else path
        kind = "parquet" if file.suffix == ".parquet" else "json"
        if file.stat().st_size == 0:
            return []
        try:
            ds = datasets.load_dataset(kind, data_files={split: str(file)}, split=split)
        except Exception as exc:  # datasets raises many types for unreadable files
            raise DataError(f"{file}: cannot read as {kind} ({exc.__class__.__name__}: {exc})") from exc
    elif path.is_absolute() or source.startswith("."):
        raise DataError(f"data.source {source}: path does not exist")
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as exc:
            raise DataError(f"data.source {source!r}: not a local path and not loadable from the Hugging Face hub ({exc})") from exc
    return [dict(r) for r in ds]


def _references(row: dict[str, Any], field: str | None, where: str) -> list[str]:
    if field is None:
        return []
    if field not in row:
        raise DataError(f"{where}: field {field!r} (data.reference_field) missing; set data.reference_field to null if there are no references")
    value = row[field]
    refs = [value] if isinstance(value, str) else list(value or [])
    if not all(isinstance(r, str) for r in refs):
        raise DataError(f"{where}: field {field!r} must be a string or a list of strings")
    return refs


def prepare_split(cfg: DataConfig, source: str, split: str, tokenizer, out_dir: Path, limit: int | None, max_prompt_tokens: int) -> dict[str, Any]:
    rows = load_rows(source, split)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"data.source {source}: split {split!r} is empty; it needs at least one row")
    records = []
    for i, row in enumerate(rows):
        where = f"{source} [{split} row {i}]"
        prompt = row.get(cfg.prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: field {cfg.prompt_field!r} (data.prompt_field) is missing or empty")
        text = format_prompt(prompt, cfg.prompt_template, tokenizer, cfg.use_chat_template)
        ids = tokenizer(text, add_special_tokens=not cfg.use_chat_template)["input_ids"]
        if len(ids) > max_prompt_tokens:
            raise DataError(f"{where}: prompt has {len(ids)} tokens, more than the {max_prompt_tokens} the models' context leaves for it")
        records.append(
            {"example_id": str(row.get("id", f"{split}-{i:07d}")), "prompt": prompt, "prompt_ids": ids, "references": _references(row, cfg.reference_field, where)}
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{split}.parquet"
    tmp = tmp_path_for(path)
    pq.write_table(pa.Table.from_pylist(records, schema=PROMPT_SCHEMA), tmp)
    tmp.replace(path)
    return {"path": str(path), "rows": len(records), "sha256": sha256_file(path)}


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def prepare(cfg: DataConfig, source: str, teacher_dir: str, student_dir: str, out_dir: Path, max_new_tokens: int) -> dict[str, Any]:
    """Validate inputs, check tokenizer compatibility, write prompt shards and their manifest."""
    teacher_tok = load_tokenizer(teacher_dir)
    student_tok = load_tokenizer(student_dir)
    t_hash, s_hash = tokenizer_hash(teacher_tok), tokenizer_hash(student_tok)
    if t_hash != s_hash:
        raise DataError(
            f"teacher tokenizer ({teacher_dir}, {len(teacher_tok)} tokens) differs from student tokenizer "
            f"({student_dir}, {len(student_tok)} tokens); stored soft labels need a shared vocabulary"
        )
    context = min(_context_length(teacher_dir), _context_length(student_dir))
    max_prompt_tokens = context - max_new_tokens
    splits = {}
    for split, limit in ((cfg.train_split, cfg.max_train_examples), (cfg.eval_split, cfg.max_eval_examples)):
        splits[split] = prepare_split(cfg, source, split, teacher_tok, out_dir, limit, max_prompt_tokens)
    manifest = {
        "source": source,
        "splits": splits,
        "train_split": cfg.train_split,
        "eval_split": cfg.eval_split,
        "tokenizer_hash": t_hash,
        "vocab_size": len(teacher_tok),
        "teacher_dir": teacher_dir,
        "student_dir": student_dir,
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _context_length(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings", 2048))
