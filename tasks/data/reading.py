"""Where a split's rows come from, and reading them in Arrow batches.

Local JSONL/JSON/Parquet files, globs of many files and Hugging Face hub ids all
go through `datasets` (Arrow, memory-mapped) and are read `BATCH_ROWS` at a time,
never as one Python list. A file that `datasets` cannot read is examined line
by line to name the real cause: the byte offset of non-UTF-8 bytes, or the line
that is not JSON.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.data.schema import DataError

BATCH_ROWS = 4096
SUFFIXES = (".jsonl", ".json", ".parquet")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Part:
    """One readable unit: a local file, or one split of a hub dataset."""

    label: str                 # what messages name: the file path, or "<hub id> [split]"
    path: str | None = None    # local file; None for a hub split
    hub_split: str | None = None

    @property
    def kind(self) -> str:
        if self.path is None:
            return "hub"
        return "parquet" if self.path.endswith(".parquet") else "json"

    def where(self, row: int) -> str:
        """'file row 3 (line 4)' for JSONL, 'file row 3' otherwise."""
        if self.path is not None and self.path.endswith(".jsonl"):
            return f"{self.label} row {row} (line {row + 1})"
        return f"{self.label} row {row}"


@dataclass(frozen=True)
class Sources:
    """The parts of each split, or one pool that data.eval_fraction divides."""

    splits: dict[str, list[Part]]
    pool: list[Part] | None = None


def _is_glob(source: str) -> bool:
    return any(c in _GLOB_CHARS for c in source)


def _split_files(folder: Path, split: str) -> list[Path]:
    """A split's files in a folder: `split.jsonl`, shards `split-*.jsonl`, `split/*.jsonl`, or the hub layout `data/split-*`."""
    found: list[Path] = []
    for suffix in SUFFIXES:
        found += [folder / f"{split}{suffix}"] if (folder / f"{split}{suffix}").is_file() else []
        found += sorted(folder.glob(f"{split}-*{suffix}")) + sorted((folder / split).glob(f"*{suffix}"))
        found += sorted((folder / "data").glob(f"{split}-*{suffix}"))
    return [p for p in dict.fromkeys(found) if p.is_file()]


def local_split_parts(folder: Path, split: str) -> list[Part]:
    files = _split_files(folder, split)
    if not files:
        raise DataError(f"{folder}: no {split}.jsonl or {split}.parquet (or {split}-*.jsonl shards); "
                        "name the split files after data.train_split / data.eval_split")
    return _local_parts(files)


def _local_parts(paths: list[Path]) -> list[Part]:
    return [Part(label=str(p), path=str(p)) for p in paths]


def resolve_sources(source: str, train_split: str, eval_split: str, eval_fraction: float | None) -> Sources:
    """Files (or hub splits) per split; refuses a single file or glob used for both splits and one file in both."""
    path = Path(source)
    single = None
    if _is_glob(source):
        matches = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"data.source {source}: the pattern matches no files")
        bad = [p for p in matches if p.suffix not in SUFFIXES]
        if bad:
            raise DataError(f"data.source {source}: {bad[0]} is not .jsonl, .json or .parquet; narrow the pattern")
        single = matches
    elif path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"data.source {source}: not a .jsonl, .json or .parquet file")
        single = [path]
    if single is not None:
        if eval_fraction is None:
            what = "one file" if len(single) == 1 and not _is_glob(source) else f"one pattern ({len(single)} files)"
            raise DataError(
                f"data.source {source} is {what} used for both splits, so evaluation would run on training prompts; "
                f"point data.source at a folder with {train_split}.jsonl and {eval_split}.jsonl, or set data.eval_fraction "
                "(e.g. 0.05) to hold out a deterministic, disjoint part"
            )
        return Sources(splits={}, pool=_local_parts(single))
    if path.is_dir():
        wanted = (train_split,) if eval_fraction is not None else (train_split, eval_split)
        splits = {}
        for split in wanted:
            splits[split] = local_split_parts(path, split)
        if eval_fraction is not None:
            return Sources(splits={}, pool=splits[train_split])
        _refuse_shared_files(splits[train_split], splits[eval_split], train_split, eval_split)
        return Sources(splits=splits)
    if path.is_absolute() or source.startswith("."):
        raise DataError(f"data.source {source}: path does not exist")
    if eval_fraction is not None:
        return Sources(splits={}, pool=[Part(label=f"{source} [{train_split}]", hub_split=train_split)])
    return Sources(splits={s: [Part(label=f"{source} [{s}]", hub_split=s)] for s in (train_split, eval_split)})


def _refuse_shared_files(train: list[Part], evaluation: list[Part], train_split: str, eval_split: str) -> None:
    train_real = {os.path.realpath(p.path): p for p in train if p.path}
    for part in evaluation:
        if part.path and os.path.realpath(part.path) in train_real:
            raise DataError(
                f"{part.path} is read for both the {train_split!r} and the {eval_split!r} split, so evaluation would run on "
                "training prompts; give each split its own file, or set data.eval_fraction to hold out part of one"
            )


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load(part: Part, source: str):
    with _quiet_datasets() as datasets:
        if part.path is None:
            try:
                return datasets.load_dataset(source, split=part.hub_split)
            except Exception as exc:  # hub, network and builder errors have many types
                raise DataError(f"data.source {source!r} [{part.hub_split}]: not a local path and not loadable from the Hugging "
                                f"Face hub ({exc.__class__.__name__}: {exc}); check the id, the split names (data.train_split / "
                                "data.eval_split) and the network, or set data.eval_fraction if it has one split") from exc
        try:
            return datasets.load_dataset(part.kind, data_files=[part.path], split="train")
        except Exception as exc:  # datasets wraps pyarrow/JSON/Unicode errors in many types
            diagnose_file(part)
            raise DataError(f"{part.path}: cannot read as {part.kind} ({exc.__class__.__name__}: {exc})") from exc


def open_part(part: Part, source: str):
    """The part as a `datasets.Dataset` (Arrow, memory-mapped), or None for an empty file."""
    if part.path is not None and os.path.getsize(part.path) == 0:
        return None
    return _load(part, source)


def iter_batches(ds, part: Part, batch_rows: int = BATCH_ROWS) -> Iterator[tuple[int, dict[str, list[Any]]]]:
    """(index of the batch's first row, columns) for every batch of `batch_rows` rows.

    A JSON file whose column mixes types (a string in one row, a list or a number in another) is stored by `datasets`
    as JSON text that loses the difference between "12" and 12; such a file is read line by line instead, so every
    value keeps its type and a wrong one is named by its row."""
    if part.kind == "json" and "Json(" in repr(ds.features):  # anywhere in the feature tree, e.g. List(Json)
        yield from _python_json_batches(part, batch_rows)
        return
    start = 0
    try:
        for batch in ds.iter(batch_size=batch_rows):
            yield start, batch
            start += len(next(iter(batch.values()))) if batch else 0
    except UnicodeDecodeError as exc:  # datasets can store invalid UTF-8 that only fails when decoded
        diagnose_file(part)
        raise DataError(f"{part.label}: row {start} or later is not valid UTF-8 ({exc}); re-encode the file as UTF-8") from exc


def _python_json_batches(part: Part, batch_rows: int) -> Iterator[tuple[int, dict[str, list[Any]]]]:
    diagnose_file(part)  # names non-UTF-8 bytes and lines that are not JSON
    with open(part.path, encoding="utf-8") as f:
        rows = (json.loads(line) for line in f if line.strip()) if part.path.endswith(".jsonl") else iter(json.load(f))
        start, batch = 0, []
        for row in rows:
            if not isinstance(row, dict):
                raise DataError(f"{part.where(start + len(batch))}: is {type(row).__name__}, not a JSON object")
            batch.append(row)
            if len(batch) == batch_rows:
                yield start, _columns(batch)
                start, batch = start + len(batch), []
        if batch:
            yield start, _columns(batch)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    names = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in names}


def diagnose_file(part: Part) -> None:
    """Raise a DataError naming the byte offset of non-UTF-8 bytes or the first line that is not JSON; return if neither."""
    if part.path is None or part.kind != "json":
        return
    offset, row = 0, 0
    with open(part.path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{part.path}: line {line_no}, byte offset {offset + exc.start}: byte 0x{line[exc.start]:02x} is not UTF-8; "
                    "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            offset += len(line)
            if part.path.endswith(".jsonl") and text.strip():
                try:
                    json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{part.path}: row {row} (line {line_no}) is not valid JSON ({exc.msg} at column {exc.colno}); "
                                    "fix or remove that line") from None
                row += 1
