"""Pick the most uncertain fraction r of the prompts and record the choice.

Files (in the selection folder, each written under a temporary name and renamed;
the manifest last, with the table's sha256):

* `selection.parquet`: one row per prompt, in prompt order: `example_id`, `score`
  (the method's score), `selected`, `new` (selected now, not by the previous
  selection), `entropy`, `margin`, `confidence`, `prompt_tokens`, `response_tokens`
  (the student's response length).
* `selection.json`: method, fraction, seed, order, counts, the teacher tokens
  estimate, the student and scoring identity, the previous selection.

Growing r: given the previous selection, the new one keeps every previously
selected prompt and adds the best-ranked others, so it is a superset and only
the `new` rows need labelling.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import read_json, sha256_file, write_json, write_parquet
from tasks.data import PROMPT_SCHEMA, read_prompts
from tasks.select.scores import HIGHER_FIRST, METHODS, SelectionError

TABLE_NAME = "selection.parquet"
MANIFEST_NAME = "selection.json"
TABLE_SCHEMA = pa.schema([
    ("example_id", pa.string()), ("score", pa.float64()), ("selected", pa.bool_()), ("new", pa.bool_()),
    ("entropy", pa.float64()), ("margin", pa.float64()), ("confidence", pa.float64()),
    ("prompt_tokens", pa.int64()), ("response_tokens", pa.int64()),
])
TOKENS_ESTIMATE = "prompt_plus_student_response"


@dataclass(frozen=True)
class Selection:
    selected: frozenset[str]
    new: frozenset[str]
    count: int


def check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise SelectionError(f"selection fraction r must be in (0, 1], got {fraction!r}")
    return float(fraction)


def select(scores: Mapping[str, float], fraction: float, method: str,
           previous: Collection[str] | None = None) -> Selection:
    """The ceil(r·N) most uncertain prompts (ties: smaller example_id), keeping `previous` selected.

    Orders: entropy and random descending, margin and confidence ascending (Dynamic KD's
    get_sorted_indices). With `previous`, the new selection contains it (a smaller r than
    the previous selection's size is refused) and fills up with the best-ranked others.
    """
    if method not in METHODS:
        raise SelectionError(f"unknown selection method {method!r}; valid: {', '.join(METHODS)}")
    fraction = check_fraction(fraction)
    count = math.ceil(fraction * len(scores) - 1e-9)
    prev = frozenset(previous or ())
    unknown = sorted(prev - set(scores))
    if unknown:
        raise SelectionError(f"the previous selection holds {len(unknown)} prompts not in these prompts "
                             f"(first: {unknown[0]}); grow a selection on the same prompts")
    if len(prev) > count:
        raise SelectionError(f"r={fraction} selects {count} prompts but the previous selection already holds {len(prev)}; "
                             "a later selection must be a superset: use r >= the previous r")
    sign = -1.0 if HIGHER_FIRST[method] else 1.0
    nan_last = lambda ex: (math.isnan(scores[ex]), sign * scores[ex] if not math.isnan(scores[ex]) else 0.0, ex)  # noqa: E731
    ranked = sorted((ex for ex in scores if ex not in prev), key=nan_last)
    new = frozenset(ranked[: count - len(prev)])
    return Selection(selected=prev | new, new=new, count=count)


def teacher_tokens(stats: Mapping[str, Mapping[str, float]], selection: Selection) -> dict[str, Any]:
    """Teacher tokens of labelling all / the selected / only the new prompts, and the saving.

    Estimate: prompt tokens + the student's response tokens per prompt (the teacher reads the
    prompt and writes a response; the student's length stands in for the teacher's, which is
    not known before labelling).
    """
    cost = {ex: int(s["prompt_tokens"]) + int(s["response_tokens"]) for ex, s in stats.items()}
    total = sum(cost.values())
    selected = sum(cost[ex] for ex in selection.selected)
    return {
        "estimate": TOKENS_ESTIMATE,
        "all": total,
        "selected": selected,
        "to_label": sum(cost[ex] for ex in selection.new),
        "saved": total - selected,
        "saved_fraction": (total - selected) / total if total else 0.0,
    }


def write_selection(out_dir: str | Path, example_order: Sequence[str], stats: Mapping[str, Mapping[str, float]],
                    scores: Mapping[str, float], selection: Selection, manifest: dict[str, Any]) -> Path:
    """Write the table then the manifest (both atomically); return the manifest path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{
        "example_id": ex, "score": float(scores[ex]), "selected": ex in selection.selected, "new": ex in selection.new,
        **{name: float(stats[ex][name]) for name in ("entropy", "margin", "confidence")},
        "prompt_tokens": int(stats[ex]["prompt_tokens"]), "response_tokens": int(stats[ex]["response_tokens"]),
    } for ex in example_order]
    table_path = out_dir / TABLE_NAME
    write_parquet(pa.Table.from_pylist(rows, schema=TABLE_SCHEMA), table_path)
    full = {
        **manifest,
        "num_prompts": len(rows),
        "num_selected": len(selection.selected),
        "num_previously_selected": len(selection.selected) - len(selection.new),
        "num_to_label": len(selection.new),
        "teacher_tokens": teacher_tokens(stats, selection),
        "table": TABLE_NAME,
        "table_sha256": sha256_file(table_path),
    }
    full["teacher_tokens_saved"] = full["teacher_tokens"]["saved"]
    return write_json(out_dir / MANIFEST_NAME, full)


def load_selection(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest, table rows) of a selection folder or manifest; the table's checksum is checked."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME if path.is_dir() else path
    if not manifest_path.exists():
        raise SelectionError(f"{manifest_path}: selection manifest not found; run the selection stage first")
    manifest = read_json(manifest_path)
    table_path = manifest_path.parent / manifest["table"]
    if not table_path.exists() or sha256_file(table_path) != manifest["table_sha256"]:
        raise SelectionError(f"{table_path}: missing or does not match the checksum in {manifest_path}; rerun the selection stage")
    manifest["_path"] = str(manifest_path)
    return manifest, pq.read_table(table_path).to_pylist()


def filter_prompts(prompts_path: str | Path, selection: str | Path, out_path: str | Path, *,
                   only_new: bool = False) -> dict[str, Any]:
    """Write the selected rows (or only the newly selected ones) of a prompts Parquet, in its order.

    The result has the prompts schema (tasks.data.PROMPT_SCHEMA), so the teacher stage labels
    it like any prompt split. Returns {path, rows, sha256}.
    """
    manifest, table = load_selection(selection)
    column = "new" if only_new else "selected"
    keep = {r["example_id"] for r in table if r[column]}
    prompts = read_prompts(prompts_path)
    ids = {p["example_id"] for p in prompts}
    if not {r["example_id"] for r in table} <= ids:
        raise SelectionError(f"{manifest['_path']}: the selection was made on other prompts than {prompts_path}")
    rows = [{f: p.get(f) for f in PROMPT_SCHEMA.names} for p in prompts if p["example_id"] in keep]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA), out_path)
    return {"path": str(out_path), "rows": len(rows), "sha256": sha256_file(out_path)}
