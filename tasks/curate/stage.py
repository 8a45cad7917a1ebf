"""Curation stage: filter a prompts table, write the kept rows and a report of what each filter removed.

Input: a Parquet prompts table (tasks/data.py PROMPT_SCHEMA, or the expansion
stage's output with its lineage columns); every input column is kept as is.
Output, under `out_dir`:

    prompts.parquet   the kept rows, input order and schema (written atomically)
    manifest.json     written last: input and output paths, checksums and row counts,
                      the settings, and one entry per filter in the order they ran:
                      {name, params, rows_in, removed, ids, details}

Filters run in `FILTER_ORDER` (dedup first, so a duplicate is reported as a duplicate and
not as, say, too long); each sees only the rows the previous ones kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from storage import soft_labels
from storage.atomic import sha256_file, sha256_json, write_json, write_parquet
from storage.errors import UserError
from tasks.curate import filters
from tasks.curate.config import FILTER_ORDER, CurateConfig

OUTPUT_NAME = "prompts.parquet"
MANIFEST_NAME = "manifest.json"
REQUIRED_COLUMNS = ("example_id", "prompt")


class CurationError(UserError):
    """The curation stage cannot run on these inputs; the message names the field or file."""


class FilterReport(BaseModel):
    name: str
    params: dict[str, Any]
    rows_in: int
    removed: int
    ids: list[str]
    details: dict[str, dict[str, Any]]


class CurateManifest(BaseModel):
    input: str
    input_sha256: str
    output: str
    output_sha256: str
    rows_in: int
    rows_out: int
    config: dict[str, Any]
    heldout: dict[str, Any] | None
    self_scores: dict[str, Any] | None
    filters: list[FilterReport]

    def removed_by(self) -> dict[str, int]:
        return {f.name: f.removed for f in self.filters}


def _check_rows(rows: list[dict[str, Any]], where: str, cfg: CurateConfig) -> None:
    if rows:
        missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
        if cfg.min_tokens is not None or cfg.max_tokens is not None:
            missing += [] if "prompt_ids" in rows[0] else ["prompt_ids"]
        if missing:
            raise CurationError(f"{where}: column(s) {', '.join(missing)} missing; curation needs a prompts table (tasks/data.py PROMPT_SCHEMA)")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row["prompt"], str):
            raise CurationError(f"{where} [row {i}]: field prompt is {type(row['prompt']).__name__}, expected a string")
        if row["example_id"] in seen:
            raise CurationError(f"{where} [row {i}]: example_id {row['example_id']!r} repeats; ids must be unique to report removals")
        seen.add(row["example_id"])


def curate_rows(rows: list[dict[str, Any]], cfg: CurateConfig, *, heldout: Iterable[str] | None = None,
                scores: Mapping[str, float] | None = None,
                judged: Mapping[str, float] | Callable[[list[dict[str, Any]]], Mapping[str, float]] | None = None,
                where: str = "prompts") -> tuple[list[dict[str, Any]], list[FilterReport]]:
    """Apply the configured filters in FILTER_ORDER; return the kept rows and one report per filter that ran.
    ``judged``: the judge's p(yes) per example id, or a function of the rows the filters before it kept (so the
    teacher judges only those)."""
    _check_rows(rows, where, cfg)
    if cfg.decontaminate and heldout is None:
        raise CurationError("curate.decontaminate is on but no held-out prompts were given; pass the evaluation prompts or set curate.decontaminate=false")
    if cfg.uses_self_score and scores is None:
        raise CurationError("curate.self_score_* is set but no teacher scores were given; pass the teacher's labels of these prompts or unset it")
    if cfg.judge_template is not None and judged is None:
        raise CurationError("curate.judge_template is set but no judged probabilities were given; pass the teacher's "
                            "judgements (tasks.curate.flow_stage.teacher_judgements) or unset it")
    heldout = list(heldout) if heldout is not None else None
    steps = {
        "exact_dedup": (cfg.exact_dedup, {}),
        "near_dedup": (cfg.near_dedup, {"threshold": cfg.near_dedup_threshold, "shingle": cfg.near_dedup_shingle,
                                        "num_perm": cfg.near_dedup_num_perm}),
        "length": (any(v is not None for v in (cfg.min_chars, cfg.max_chars, cfg.min_tokens, cfg.max_tokens)),
                   {"min_chars": cfg.min_chars, "max_chars": cfg.max_chars, "min_tokens": cfg.min_tokens, "max_tokens": cfg.max_tokens}),
        "repetition": (cfg.max_repeated_ngram_share is not None, {"max_share": cfg.max_repeated_ngram_share, "n": cfg.repetition_ngram}),
        "decontaminate": (cfg.decontaminate, {"n": cfg.decontaminate_ngram, "threshold": cfg.decontaminate_threshold}),
        "self_score": (cfg.uses_self_score, {"drop_fraction": cfg.self_score_drop_fraction, "min_score": cfg.self_score_min}),
        "judge": (cfg.judge_template is not None, {"min_score": cfg.judge_min}),
    }
    run = {
        "exact_dedup": lambda rs, p: filters.exact_dedup(rs),
        "near_dedup": lambda rs, p: filters.near_dedup(rs, **p),
        "length": lambda rs, p: filters.length_filter(rs, **p),
        "repetition": lambda rs, p: filters.repetition_filter(rs, **p),
        "decontaminate": lambda rs, p: filters.decontaminate(rs, heldout, **p),
        "self_score": lambda rs, p: _self_score(rs, scores, p),
        "judge": lambda rs, p: _self_score(rs, judged(rs) if callable(judged) else judged, p, what="judge filter",
                                           fix="judge exactly these prompts"),
    }
    reports = []
    for name in FILTER_ORDER:
        enabled, params = steps[name]
        if not enabled:
            continue
        kept, removed = run[name](rows, params)
        reports.append(FilterReport(name=name, params=params, rows_in=len(rows), removed=len(removed),
                                    ids=[r.example_id for r in removed], details={r.example_id: dict(r.detail) for r in removed}))
        rows = kept
    return rows, reports


def _self_score(rows, scores, params, what: str = "self-score filter",
                fix: str = "label exactly these prompts with the teacher (teacher.mode score or generate) and pass that manifest"):
    """The score filter (rows below min_score, then the lowest fraction) over teacher self-scores or judgements."""
    try:
        return filters.self_score_filter(rows, scores, **params)
    except KeyError as exc:
        missing = exc.args[0]
        raise CurationError(
            f"{what}: {len(missing)} row(s) have no teacher score (e.g. {', '.join(map(str, missing[:3]))}); {fix}"
        ) from None


def read_table(path: Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise CurationError(f"{path}: prompts table not found")
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise CurationError(f"{path}: not a readable Parquet prompts table ({exc})") from exc


def heldout_prompts(source: str | Path | Iterable[str]) -> list[str]:
    """Held-out texts from a Parquet prompts table (its `prompt` column) or an iterable of strings."""
    if isinstance(source, (str, Path)):
        table = read_table(Path(source))
        if "prompt" not in table.column_names:
            raise CurationError(f"{source}: column prompt missing; pass the evaluation split's prompts table")
        return [str(p) for p in table.column("prompt").to_pylist()]
    return [str(p) for p in source]


def scores_from_labels(manifest_path: str | Path) -> dict[str, float]:
    """example_id -> the teacher's mean token log-likelihood of its stored responses (`token_logprob`).

    With `teacher.mode: score` these are teacher-forced scores of the references; with
    `generate`, the teacher's own samples (several samples per prompt are averaged).
    """
    return filters.scores_from_records(soft_labels.read(Path(manifest_path)))


def run_curate_stage(prompts_path: str | Path, out_dir: str | Path, cfg: CurateConfig, *,
                     heldout: str | Path | Iterable[str] | None = None,
                     scores: Mapping[str, float] | str | Path | None = None,
                     judged: Mapping[str, float] | Callable[[list[dict[str, Any]]], Mapping[str, float]] | None = None,
                     ) -> CurateManifest:
    """Curate `prompts_path` into `out_dir` (prompts.parquet, then manifest.json); return the manifest.

    `heldout`: the evaluation prompts (a prompts table or texts) for decontamination.
    `scores`: teacher self-scores, as a mapping example_id -> mean log-prob or a soft-label
    manifest of these prompts (`scores_from_labels`).
    `judged`: example_id -> the teacher's probability of the judge's yes (curate.judge_template), or a function of
    the rows left for the judge that returns it (`tasks.curate.flow_stage.teacher_judgements`).
    """
    prompts_path, out_dir = Path(prompts_path), Path(out_dir)
    table = read_table(prompts_path)
    rows = table.to_pylist()
    held = heldout_prompts(heldout) if heldout is not None else None
    score_info = None
    if isinstance(scores, (str, Path)):
        score_info = {"source": str(scores)}
        scores = scores_from_labels(scores)
    elif scores is not None:
        score_info = {"source": "given", "sha256": sha256_json(dict(scores))[:16]}
    kept, reports = curate_rows(rows, cfg, heldout=held, scores=scores if cfg.uses_self_score else None,
                                judged=judged if cfg.judge_template is not None else None, where=str(prompts_path))
    keep_ids = {r["example_id"] for r in kept}
    indices = [i for i, r in enumerate(rows) if r["example_id"] in keep_ids]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / OUTPUT_NAME
    write_parquet(table.take(pa.array(indices, pa.int64())), out)
    manifest = CurateManifest(
        input=str(prompts_path), input_sha256=sha256_file(prompts_path), output=str(out), output_sha256=sha256_file(out),
        rows_in=len(rows), rows_out=len(indices), config=cfg.model_dump(),
        heldout=None if held is None else {"rows": len(held), "sha256": sha256_json(held)[:16],
                                           "source": str(heldout) if isinstance(heldout, (str, Path)) else "given"},
        self_scores=score_info if cfg.uses_self_score else None, filters=reports,
    )
    write_json(out_dir / MANIFEST_NAME, manifest.model_dump())
    return manifest
