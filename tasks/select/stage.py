"""Selection stage: the student answers the training prompts with vLLM, each prompt gets an uncertainty score,
and the top fraction r goes to the teacher.

The student pass reuses the teacher's capture code (tasks.teacher.capture.generate_rows:
the same request checks, seeds and top-k log-prob extraction), run on the student in
a Ray actor like the teacher replicas. Only per-prompt statistics come back to the driver.
The stage writes a selection folder (tasks.select.selection); `filter_prompts` then
turns the prompts Parquet into the selected rows for the teacher stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from storage.atomic import sha256_file, write_parquet
from tasks.config import EngineConfig, SelectConfig
from tasks.contracts import Frozen, PreparedData, SplitFile, StageOutput
from tasks.data import read_prompts
from tasks.identity import model_content_hash
from tasks.select.scores import HIGHER_FIRST, METHODS, SelectionError, method_scores, prompt_stats
from tasks.select.selection import MANIFEST_NAME, check_fraction, load_selection, select, write_selection
from tasks.stage_cache import StageContext, StageSpec
from tasks.teacher.stage import TeacherReplica

STAGE_VERSION = 1
BATCH_PROMPTS = 2048  # prompts per vLLM call: bounds the driver-side label arrays


def student_stats(llm, prompts: list[dict[str, Any]], *, k: int, temperature: float, max_new_tokens: int,
                  seed: int) -> dict[str, dict[str, float]]:
    """example_id -> entropy / margin / confidence (means over the student's response) and token counts."""
    from tasks.teacher.capture import check_request, generate_rows

    check_request(llm, prompts, k=k, mode="generate", max_new_tokens=max_new_tokens)
    stats: dict[str, dict[str, float]] = {}
    for i in range(0, len(prompts), BATCH_PROMPTS):
        rows = generate_rows(llm, prompts[i : i + BATCH_PROMPTS], split="selection", k=k, temperature=temperature,
                             top_p=1.0, max_new_tokens=max_new_tokens, n=1, seed=seed, teacher_key="student")
        stats.update(prompt_stats(rows))
    return stats


class StudentScorer(TeacherReplica):
    """A vLLM engine on the student (a Ray actor). It is a TeacherReplica with another engine,
    so the same engine can also label (`capture`); the tests use that to run one engine."""

    def __init__(self, student_dir: str, engine: EngineConfig, k: int, replica: int = 0):
        from tasks.teacher.engine import build_engine

        self.replica = replica
        self.llm = build_engine(student_dir, engine, max_logprobs=k)

    def stats(self, prompts, k, temperature, max_new_tokens, seed):
        return student_stats(self.llm, prompts, k=k, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)


def _reuse_stats(candidate: str | Path | None, scoring: dict[str, Any], prompts_sha: str):
    """Per-prompt stats of an earlier selection made with the same student, scoring and prompts, else None."""
    if candidate is None:
        return None
    try:
        manifest, table = load_selection(candidate)
    except SelectionError:
        return None
    if manifest.get("scoring") != scoring or manifest.get("prompts_sha256") != prompts_sha:
        return None
    return {r["example_id"]: r for r in table}


def run_selection(prompts_path: str | Path, student_dir: str, out_dir: str | Path, *, method: str = "entropy",
                  fraction: float = 0.1, seed: int = 0, top_k: int = 20, max_new_tokens: int = 32,
                  temperature: float = 0.0, engine: EngineConfig | None = None, previous: str | Path | None = None,
                  scorer=None, ray_address: str | None = None, log_fn=print) -> Path:
    """Score every prompt by the student's uncertainty and write the selection of fraction r; return its manifest.

    method: entropy | margin | confidence | random (seeded control; the student still runs,
    for the token estimate). temperature 0 scores the student's greedy answer. previous: an
    earlier selection on the same prompts; the new one is a superset and marks the rows still
    to label as `new`. Stats are reused (no engine) from `previous` or an earlier run into
    `out_dir` made with the same student, scoring settings and prompts. scorer: a
    StudentScorer actor to use (else one is started and killed afterwards).
    """
    if method not in METHODS:
        raise SelectionError(f"unknown selection method {method!r}; valid: {', '.join(METHODS)}")
    check_fraction(fraction)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 2:
        raise SelectionError(f"top_k={top_k!r}: scoring needs the student's top-k log-probs with k >= 2 (margin uses two)")
    prompts = read_prompts(prompts_path)
    if not prompts:
        raise SelectionError(f"{prompts_path}: no prompts to select from")
    prompts_sha = sha256_file(Path(prompts_path))
    engine = engine or EngineConfig()
    scoring = {"stage_version": STAGE_VERSION, "student_hash": model_content_hash(student_dir),
               "top_k": top_k, "temperature": float(temperature), "max_new_tokens": max_new_tokens,
               "sampling_seed": seed}
    prev_manifest, prev_selected = None, None
    if previous is not None:
        prev_manifest, prev_table = load_selection(previous)
        prev_selected = [r["example_id"] for r in prev_table if r["selected"]]
    stats = _reuse_stats(previous, scoring, prompts_sha) or _reuse_stats(
        Path(out_dir) / MANIFEST_NAME if (Path(out_dir) / MANIFEST_NAME).exists() else None, scoring, prompts_sha)
    if stats is None:
        stats = _score(prompts, student_dir, engine, scoring, scorer, ray_address)
        log_fn(f"select: scored {len(stats)} prompts with the student ({method})")
    else:
        log_fn(f"select: reusing the student's scores of an earlier selection ({len(stats)} prompts)")
    missing = [p["example_id"] for p in prompts if p["example_id"] not in stats]
    if missing:
        raise SelectionError(f"{prompts_path}: no student score for {len(missing)} prompts (first: {missing[0]})")
    scores = method_scores(stats, method, seed)
    selection = select(scores, fraction, method, previous=prev_selected)
    manifest = {
        "method": method, "fraction": float(fraction), "seed": seed,
        "order": "descending" if HIGHER_FIRST[method] else "ascending",
        "scoring": scoring, "student_dir": str(student_dir),
        "prompts": str(prompts_path), "prompts_sha256": prompts_sha,
        "previous": prev_manifest["_path"] if prev_manifest else None,
    }
    path = write_selection(out_dir, [p["example_id"] for p in prompts], stats, scores, selection, manifest)
    log_fn(f"select: {len(selection.selected)}/{len(prompts)} prompts selected by {method} at r={fraction} "
           f"({len(selection.new)} to label): {path}")
    return path


def _score(prompts, student_dir, engine, scoring, scorer, ray_address):
    import ray

    args = (prompts, scoring["top_k"], scoring["temperature"], scoring["max_new_tokens"], scoring["sampling_seed"])
    if scorer is not None:
        return ray.get(scorer.stats.remote(*args)) if hasattr(scorer, "stats") and hasattr(scorer.stats, "remote") \
            else scorer.stats(*args)
    from tasks.ray_runtime import ensure_ray

    ensure_ray(ray_address)
    actor = ray.remote(StudentScorer).options(num_cpus=1).remote(student_dir, engine, scoring["top_k"])
    try:
        return ray.get(actor.stats.remote(*args))
    finally:
        ray.kill(actor)


# --- the cached stage in the flow --------------------------------------------------------------------------------

class SelectInputs(Frozen):
    """What the selection reads: the prepared training prompts and the student that scores them."""

    prepared: PreparedData
    student_dir: str


class SelectedPrompts(StageOutput):
    """select-prompts: which training prompts the teacher labels (tasks/select/selection.py has the files)."""

    manifest: str = Field(description="selection.json: method, r, scores table, teacher tokens (estimate) and the saving.")
    train: SplitFile = Field(description="The selected prompts (prompts schema), what the teacher labels in all.")
    increments: list[SplitFile] = Field(description="The rows each selection in the chain added (the last: this one's new "
                                        "rows); the teacher stage labels each once, so a larger r labels only the difference.")
    unselected: SplitFile = Field(description="The prompts the teacher does not label (select.unlabelled: ce trains them on references).")
    fraction: float
    method: str
    num_prompts: int
    num_selected: int
    num_to_label: int = Field(description="Rows this run sends to the teacher (the last increment).")
    teacher_tokens_saved: int = Field(description="Teacher tokens not spent (prompt + student-response estimate).")
    teacher_tokens_saved_fraction: float
    previous: str | None = Field(None, description="The earlier selection this one grows (its manifest), if any.")


def _split_file(info: dict[str, Any]) -> SplitFile:
    return SplitFile(path=str(info["path"]), rows=int(info["rows"]), sha256=str(info["sha256"]))


def _write_unselected(prompts_path: str, table: list[dict[str, Any]], out_path: Path) -> SplitFile:
    import pyarrow as pa

    from tasks.data import PROMPT_SCHEMA

    chosen = {r["example_id"] for r in table if r["selected"]}
    rows = [{f: p.get(f) for f in PROMPT_SCHEMA.names} for p in read_prompts(prompts_path) if p["example_id"] not in chosen]
    write_parquet(pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA), out_path)
    return SplitFile(path=str(out_path), rows=len(rows), sha256=sha256_file(out_path))


def previous_selection(cfg: SelectConfig, inputs: SelectInputs, ctx: StageContext) -> SelectedPrompts | None:
    """The largest finished selection in the stage cache that this one can grow: same prompts, student, method,
    seed and scoring settings, and a smaller r."""
    from tasks.stage_cache import recorded_output

    best = None
    for folder in sorted(ctx.out_dir.parent.iterdir()):
        if folder == ctx.out_dir or not folder.is_dir():
            continue
        done = recorded_output(STAGE, folder)
        if done is None or done.fraction >= cfg.fraction or done.method != cfg.method:
            continue
        try:
            manifest, _ = load_selection(done.manifest)
        except SelectionError:
            continue
        same = (manifest.get("prompts_sha256") == inputs.prepared.train.sha256 and manifest.get("seed") == cfg.seed
                and manifest.get("student_dir") == inputs.student_dir
                and manifest.get("scoring", {}).get("top_k") == cfg.top_k
                and manifest.get("scoring", {}).get("temperature") == float(cfg.temperature)
                and manifest.get("scoring", {}).get("max_new_tokens") == cfg.max_new_tokens)
        if same and (best is None or done.fraction > best.fraction):
            best = done
    return best


def run_select_stage(cfg: SelectConfig, inputs: SelectInputs, ctx: StageContext) -> SelectedPrompts:
    """Score and select into ctx.out_dir; write the selected, newly selected and unselected prompt files."""
    from tasks.select.selection import filter_prompts

    prompts_path = inputs.prepared.train.path
    prev = previous_selection(cfg, inputs, ctx)
    if prev is not None:
        ctx.log(f"select: growing the selection at r={prev.fraction} ({prev.manifest}); only the difference is labelled")
    manifest_path = run_selection(prompts_path, inputs.student_dir, ctx.out_dir, method=cfg.method, fraction=cfg.fraction,
                                  seed=cfg.seed, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, engine=cfg.engine,
                                  previous=prev.manifest if prev else None, ray_address=ctx.ray_address, log_fn=ctx.log)
    manifest, table = load_selection(manifest_path)
    selected = _split_file(filter_prompts(prompts_path, manifest_path, ctx.out_dir / "selected.parquet"))
    new = _split_file(filter_prompts(prompts_path, manifest_path, ctx.out_dir / "new.parquet", only_new=True))
    increments = (list(prev.increments) if prev else []) + ([new] if new.rows else [])
    tokens = manifest["teacher_tokens"]
    return SelectedPrompts(
        key=ctx.key, manifest=str(manifest_path), train=selected, increments=increments,
        unselected=_write_unselected(prompts_path, table, ctx.out_dir / "unselected.parquet"),
        fraction=cfg.fraction, method=cfg.method, num_prompts=manifest["num_prompts"], num_selected=manifest["num_selected"],
        num_to_label=manifest["num_to_label"], teacher_tokens_saved=int(tokens["saved"]),
        teacher_tokens_saved_fraction=float(tokens["saved_fraction"]), previous=prev.manifest if prev else None)


def _key_parts(cfg: SelectConfig, inputs: SelectInputs) -> dict[str, Any]:
    from tasks.identity import model_identity

    return {"prompts": inputs.prepared.train.sha256, "student_model": model_identity(inputs.student_dir)}


def _selection_intact(output: SelectedPrompts) -> bool:
    try:
        load_selection(output.manifest)
    except SelectionError:
        return False
    files = [output.train, output.unselected, *output.increments]
    return all(Path(f.path).exists() and sha256_file(Path(f.path)) == f.sha256 for f in files)


STAGE = StageSpec(name="select", version=1, output_type=SelectedPrompts, run=run_select_stage, key_parts=_key_parts,
                  verify=_selection_intact, describe="selection")
