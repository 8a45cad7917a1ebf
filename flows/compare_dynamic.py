"""Dynamic KD and multi-teacher rows of `make compare` (`python -m flows.compare --family dynamic`).

Same protocol as the objective rows (flows/compare.py): the demo task, the base student as the initial weights,
the production loop in this process, greedy exact match / ROUGE-L and KL to the teacher on held-out prompts, seeds.
Rows (all with objective `fkl`, the best objective of the main table, unless named otherwise):

* `ce`: no teacher (the reference for "gap closed");
* `dynamic_kd r=R`: the student's entropy selects the fraction R of the training prompts; KD on their teacher labels,
  cross-entropy on the other prompts' references (select.unlabelled=ce). r=1.0 is full labelling;
* `random_select r=R`: the same with a seeded random selection (Dynamic KD's control);
* `dynamic_kd_kd_only r=R`, `random_select_kd_only r=R`: select.unlabelled=none, KD on the selected prompts only;
* `small_teacher`: KD from the demo's second, smaller teacher alone (its scores of the main teacher's responses);
* `multi_teacher K=2`: KD from the probability mean of both teachers (mean-prob-union-v1);
* `dynamic_teacher hard`: both teachers' labels, the uncertain half of each batch from the small teacher.

Teacher labels of a selection are the full capture's rows of the selected prompts: each prompt's sampling seed
derives from its content, so they are the rows the flow's lazy labelling writes. `teacher_tokens_saved` is the
selection manifest's (prompt + the student's response length per unlabelled prompt) and the measured share of the
full capture's tokens (prompt + teacher response) not labelled.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

R_VALUES = (0.1, 0.3, 1.0)
OBJECTIVE = "fkl"


def _write_set(out_dir: Path, rows: list[dict[str, Any]], meta: dict[str, Any], flagged: list[dict[str, Any]] = ()) -> str:
    """A label set of `rows` (+ `flagged` rows in shards marked teacher_labels=false), written once."""
    from storage import soft_labels

    done = out_dir / soft_labels.MANIFEST_NAME
    if done.exists():
        return str(done)
    records = []
    for start in range(0, len(rows), 2048):
        records.append(soft_labels.write_shard(out_dir, len(records), rows[start:start + 2048], meta))
    ref_meta = {**meta, "response_source": "reference", "teacher_labels": False}
    for start in range(0, len(flagged), 2048):
        records.append({**soft_labels.write_shard(out_dir, len(records), flagged[start:start + 2048], ref_meta),
                        "teacher_labels": False})
    return str(soft_labels.write_manifest(out_dir, records, meta))


def selection_sets(setup: dict, root: Path, log=print) -> dict[str, dict[str, Any]]:
    """Per (method, r): the selection manifest, the label set to train on and the teacher tokens saved."""
    from storage import soft_labels
    from tasks.select import labels as select_labels
    from tasks.select.selection import load_selection
    from tasks.select.stage import run_selection

    prepared, labels, student = setup["prepared"], setup["labels"], setup["demo"]["student_base"]
    full = list(soft_labels.read(labels.train_manifest))
    meta = soft_labels.load_manifest(labels.train_manifest)["metadata"]
    full_tokens = {r["example_id"]: len(r["prompt_ids"]) + len(r["response_ids"]) for r in full}
    out: dict[str, dict[str, Any]] = {}
    stats_source = None
    for method in ("entropy", "random"):
        previous = None
        for r in R_VALUES:
            sel_dir = root / f"select-{method}-r{r:g}"
            scorer = _CachedScorer(stats_source) if stats_source else None
            manifest_path = run_selection(prepared.train.path, student, sel_dir, method=method, fraction=r, seed=0, top_k=20,
                                          max_new_tokens=setup["config"].teacher.max_new_tokens, previous=previous,
                                          scorer=scorer, log_fn=log)
            previous = manifest_path
            stats_source = stats_source or manifest_path
            manifest, table = load_selection(manifest_path)
            chosen = {row["example_id"] for row in table if row["selected"]}
            import pyarrow as pa
            import pyarrow.parquet as pq

            from tasks.data import PROMPT_SCHEMA, read_prompts

            unselected = [p for p in read_prompts(prepared.train.path) if p["example_id"] not in chosen]
            u_path = sel_dir / "unselected.parquet"
            pq.write_table(pa.Table.from_pylist([{f: p.get(f) for f in PROMPT_SCHEMA.names} for p in unselected],
                                                schema=PROMPT_SCHEMA), u_path)
            refs = select_labels.reference_rows(str(u_path), student, " ", int(meta["k"]), int(meta["vocab_size"]),
                                                meta["teacher_key"]) if unselected else []
            teacher_rows = [row for row in full if row["example_id"] in chosen]
            train = _write_set(sel_dir / "labels", teacher_rows, meta, refs)
            kd_only = _write_set(sel_dir / "labels-kd-only", teacher_rows, meta)  # select.unlabelled=none
            labelled = sum(full_tokens[e] for e in chosen)
            out[f"{method}-r{r:g}"] = {
                "labels": train, "labels_kd_only": kd_only, "selection": str(manifest_path), "fraction": r, "method": method,
                "num_selected": manifest["num_selected"], "num_prompts": manifest["num_prompts"],
                "teacher_tokens_saved": manifest["teacher_tokens_saved"],
                "teacher_tokens_saved_fraction": round(manifest["teacher_tokens"]["saved_fraction"], 4),
                "teacher_tokens_saved_measured_fraction": round(1 - labelled / sum(full_tokens.values()), 4),
            }
    return out


class _CachedScorer:
    """The student's per-prompt statistics of an earlier selection (the random control needs no second student pass)."""

    def __init__(self, manifest_path):
        from tasks.select.selection import load_selection

        _, table = load_selection(manifest_path)
        self.stats_table = {r["example_id"]: r for r in table}

    def stats(self, prompts, k, temperature, max_new_tokens, seed):
        return {p["example_id"]: self.stats_table[p["example_id"]] for p in prompts}


def teacher_sets(setup: dict, root: Path, data_dir: Path, teacher_steps: int, log=print) -> dict[str, str]:
    """The small teacher's scores of the main teacher's responses, their mean with the main labels, and the pair."""
    from tasks.config import MemberTeacherConfig
    from tasks.demo.assets import ensure_small_teacher
    from tasks.teacher.ensemble import capture_member, member_config, scored_prompts, write_pair
    from tasks.teacher.merge import merge_label_sets

    small_dir = ensure_small_teacher(data_dir, teacher_steps=teacher_steps, log_fn=log, task_name="qa")
    main = setup["labels"].train_manifest
    prompts, meta = scored_prompts(main)
    cfg = member_config(setup["config"].teacher, MemberTeacherConfig(model=small_dir))
    small = str(capture_member(cfg, small_dir, prompts, meta, root / "small-teacher" / "train", log))
    merged = root / "multi-teacher" / "train" / "manifest.json"
    if not merged.exists():
        merge_label_sets([main, small], merged.parent, log_fn=log)
    pair = root / "pair" / "train" / "manifest.json"
    if not pair.exists():
        write_pair(main, small, pair.parent)
    return {"small_teacher": small, "multi_teacher": str(merged), "pair": str(pair), "small_dir": small_dir}


def run_row(setup: dict, student: str, manifest: str, out_dir: Path, seed: int, steps: int, prompts: list[dict],
            objective: str = OBJECTIVE, **train) -> dict:
    """Train one run with the production loop (LocalRuntime) and score it; a finished identical run is reused."""
    from flows.compare import scores
    from storage.atomic import read_json, sha256_json, write_json
    from tasks.identity import model_identity
    from tasks.train.loop import train as train_loop
    from tasks.train.loop_config import LoopConfig
    from tasks.train.runtime import LocalRuntime

    cfg = setup["config"].train.model_copy(update={"objective": objective, "steps": steps, "seed": seed,
                                                   "checkpoint_every": steps, **train})
    key = sha256_json({"init": model_identity(student), "labels": manifest, "train": cfg.model_dump(),
                       "eval": setup["prepared"].eval.sha256})
    done = out_dir / "result.json"
    if done.exists() and read_json(done).get("key") == key:
        return read_json(done)["result"]
    (out_dir / "train_log.jsonl").unlink(missing_ok=True)
    started = time.time()
    train_loop(LoopConfig.build(cfg, student_dir=student, manifest=manifest, out_dir=out_dir,
                                threads_per_worker=torch.get_num_threads()), LocalRuntime())
    result = {"seed": seed, "init": "base", **scores(str(out_dir / "student"), prompts, setup["labels"].eval_manifest,
                                                      setup["config"].eval.max_new_tokens),
              "train_seconds": round(time.time() - started, 1)}
    write_json(done, {"key": key, "result": result})
    return result


def plan(selections: dict, teachers: dict, full: str) -> list[tuple[str, str, str, dict]]:
    """(row name, label manifest, objective, train overrides)."""
    rows = [("ce [base]", full, "ce", {})]
    for r in R_VALUES:
        rows.append((f"dynamic_kd r={r:g}", selections[f"entropy-r{r:g}"]["labels"], OBJECTIVE, {}))
    for r in R_VALUES[:-1]:  # r=1.0 selects every prompt whatever the method: the same run as dynamic_kd r=1
        rows.append((f"random_select r={r:g}", selections[f"random-r{r:g}"]["labels"], OBJECTIVE, {}))
    for r in R_VALUES[:-1]:  # select.unlabelled=none: KD on the selected prompts only, nothing elsewhere
        rows.append((f"dynamic_kd_kd_only r={r:g}", selections[f"entropy-r{r:g}"]["labels_kd_only"], OBJECTIVE, {}))
        rows.append((f"random_select_kd_only r={r:g}", selections[f"random-r{r:g}"]["labels_kd_only"], OBJECTIVE, {}))
    rows.append(("small_teacher", teachers["small_teacher"], OBJECTIVE, {}))
    rows.append(("multi_teacher K=2", teachers["multi_teacher"], OBJECTIVE, {}))
    rows.append(("dynamic_teacher hard", teachers["pair"], OBJECTIVE, {"dynamic_teacher": "hard"}))
    return rows


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def run_dynamic_family(args, data_dir: Path, log=print) -> dict:
    """Train and score every row; returns the `dynamic` entry for docs/results/methods.json."""
    from flows.compare import prepare_task
    from tasks.data import read_prompts

    setup = prepare_task(data_dir, "qa", args, log=log)
    root = setup["root"] / "dynamic"
    selections = selection_sets(setup, root, log)
    teachers = teacher_sets(setup, root, data_dir, args.teacher_steps or 1500, log)
    import ray

    ray.shutdown()  # free the cores for training
    prompts = read_prompts(setup["prepared"].eval.path)
    student = setup["demo"]["student_base"]
    rows = plan(selections, teachers, setup["labels"].train_manifest)
    results: dict[str, Any] = {}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(args.threads,)) as pool:
        futures = {(name, seed): pool.submit(run_row, setup, student, manifest, root / "runs" / f"{_slug(name)}-seed{seed}",
                                             seed, args.steps, prompts, objective, **train)
                   for name, manifest, objective, train in rows for seed in range(args.seeds)}
        for name, manifest, objective, train in rows:
            runs = [futures[(name, seed)].result() for seed in range(args.seeds)]
            entry = {"objective": objective, "labels": manifest, "init": "base", "runs": runs, **train}
            key = {"dynamic_kd": "entropy", "random_select": "random", "dynamic_kd_kd_only": "entropy",
                   "random_select_kd_only": "random"}.get(name.split()[0])
            if key:
                entry.update({k: v for k, v in selections[f"{key}-r{name.split('=')[1]}"].items() if not k.startswith("labels")})
                entry["unlabelled"] = "none" if "kd_only" in name else "ce"
            results[name] = entry
            log(f"compare[dynamic]: {name}: {runs}")
    from flows.compare import scores

    return {"task": "qa", "steps": args.steps, "seeds": args.seeds, "objective": OBJECTIVE,
            "train_examples": setup["prepared"].train.rows, "eval_examples": len(prompts),
            "teacher_steps": args.teacher_steps or 1500, "batch_size": setup["config"].train.batch_size,
            "teacher": scores(setup["demo"]["teacher"], prompts, setup["labels"].eval_manifest, setup["config"].eval.max_new_tokens),
            "small_teacher_model": scores(teachers["small_dir"], prompts, setup["labels"].eval_manifest,
                                          setup["config"].eval.max_new_tokens),
            "rows": results}


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("=", "").replace("[", "").replace("]", "")


def render(entry: dict) -> str:
    import statistics

    def stat(row, metric):
        values = [r[metric] for r in row["runs"]]
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    lines = ["| row | exact match | ROUGE-L | KL to teacher | teacher tokens saved (estimate / measured) |", "|---|---|---|---|---|"]
    for name, row in entry["rows"].items():
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in (stat(row, k) for k in ("exact_match", "rouge_l", "kl_to_teacher"))]
        saved = (f"{row['teacher_tokens_saved']} ({row['teacher_tokens_saved_fraction']:.0%} / "
                 f"{row['teacher_tokens_saved_measured_fraction']:.0%})") if "teacher_tokens_saved" in row else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {saved} |")
    return "\n".join(lines) + "\n"
