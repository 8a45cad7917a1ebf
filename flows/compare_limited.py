"""`make compare COMPARE_ARGS="--family limited"`: the limited-data comparison of issue 17.

A fraction (default 10%) of the demo's training prompts; rows, all from the demo's base student (the
same init as `make compare`'s main group), each with --seeds seeds and the production loop:

  ce            cross-entropy on the teacher's sampled responses (no KD);
  fkl           forward KL on the teacher's top-k labels;
  mixkd         fkl plus MixKD's student-mixup and teacher-mixup KD terms (train.mixkd, tasks/augment);
  fkl+expanded  fkl on the teacher's labels of the original + teacher-written prompts after curation
                (expand + curate stages, tasks/expand, tasks/curate);
  fkl+curated   fkl on the original prompts after the same curation, nothing written by the teacher: separates
                what curation does (dedup, decontamination) from what the teacher's new prompts add.

Every stage goes through the stage cache (the flow's code, not a copy), so a rerun only trains what is
missing. Scored like `make compare` (greedy exact match and ROUGE-L on the held-out prompts, KL to the
teacher's held-out labels). Merged into docs/results/methods.json under "limited_data" (other keys kept).
"""

from __future__ import annotations

import json
import multiprocessing
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROWS = ("ce", "fkl", "mixkd", "fkl+expanded", "fkl+curated")


def prepare_limited(data_dir: Path, args, log=print) -> dict:
    """Prompts (the first `fraction` of the training prompts), labels, the MixKD stage, expansion + curation + their labels."""
    from tasks import prepare
    from tasks.augment import flow_stage as mixkd_stage
    from tasks.config import PipelineConfig
    from tasks.curate import flow_stage as curate_stage
    from tasks.demo import task as demo_task
    from tasks.demo.assets import ensure_demo_assets
    from tasks.expand import flow_stage as expand_stage
    from tasks.stage_cache import run_cached
    from tasks.teacher import stage as teacher_stage

    total = len(demo_task.generate(seed=0, task="qa")["train"])
    train_rows = max(2, round(total * args.fraction))
    config = PipelineConfig.model_validate({
        "data_dir": str(data_dir), "run_name": "compare-limited",
        "data": {"demo_teacher_steps": args.teacher_steps or 1500, "max_train_examples": train_rows, "max_eval_examples": args.eval_examples},
        "expand": {"num_prompts": args.expand_prompts, "seed": 0}, "curate": {},
        "train": {"mixkd": {"epochs": args.mixkd_epochs, "seed": 0}},
    })
    demo = ensure_demo_assets(data_dir, seed=config.data.demo_seed, teacher_steps=config.data.demo_teacher_steps, log_fn=log)
    root = data_dir / "compare" / "limited"
    cache = {"cache_root": root / "cache", "log": log}
    prepared = prepare.run(config, root / "prepare", log=log)
    labels = run_cached(teacher_stage.STAGE, config.teacher, prepared, **cache)
    mixkd = run_cached(mixkd_stage.STAGE, config.train.mixkd,
                       mixkd_stage.MixKDInputs(teacher_dir=prepared.teacher_dir, teacher_model="demo", labels=labels), **cache)
    template = expand_stage.prompt_frame(config.data, prepared.checks.get("format", "prompt"))
    expanded = run_cached(expand_stage.STAGE, config.expand,
                          expand_stage.ExpandInputs(prepared=prepared, teacher=config.teacher, template=template), **cache)
    curated = run_cached(curate_stage.STAGE, config.curate,
                         curate_stage.CurateInputs(prepared=prepared, expanded=expanded, data=config.data,
                                                   max_new_tokens=config.teacher.max_new_tokens), **cache)
    labels_x = run_cached(teacher_stage.STAGE, config.teacher, prepared.model_copy(update={"train": curated.train}), **cache)
    curated_only = run_cached(curate_stage.STAGE, config.curate,
                              curate_stage.CurateInputs(prepared=prepared, expanded=None, data=config.data,
                                                        max_new_tokens=config.teacher.max_new_tokens), **cache)
    labels_c = run_cached(teacher_stage.STAGE, config.teacher, prepared.model_copy(update={"train": curated_only.train}), **cache)
    return {"curated_only": curated_only, "labels_curated": labels_c,"config": config, "demo": demo, "root": root, "prepared": prepared, "labels": labels, "mixkd": mixkd,
            "expanded": expanded, "curated": curated, "labels_expanded": labels_x, "total_train": total}


def run_row(setup: dict, row: str, seed: int, steps: int, prompts: list[dict]) -> dict:
    """Train one (row, seed) from the base student with the production loop (LocalRuntime); reused when finished."""
    from flows.compare import scores
    from storage.atomic import read_json, sha256_json, write_json
    from tasks.identity import model_identity
    from tasks.train.loop import train
    from tasks.train.loop_config import LoopConfig
    from tasks.train.runtime import LocalRuntime

    base = setup["config"].train
    objective = "ce" if row == "ce" else "fkl"
    cfg = base.model_copy(update={"objective": objective, "steps": steps, "seed": seed, "checkpoint_every": steps,
                                  "mixkd": base.mixkd if row == "mixkd" else None})
    labels = {"fkl+expanded": setup["labels_expanded"], "fkl+curated": setup["labels_curated"]}.get(row, setup["labels"])
    mixkd = setup["mixkd"] if row == "mixkd" else None
    out_dir = setup["root"] / "runs" / f"{row}-seed{seed}"
    key = sha256_json({"init": model_identity(setup["demo"]["student_base"]), "labels": labels.key,
                       "mixkd": mixkd.key if mixkd else None,
                       "train": cfg.model_dump(mode="json"), "eval": setup["prepared"].eval.sha256})
    done = out_dir / "result.json"
    if done.exists() and read_json(done).get("key") == key:
        return read_json(done)["result"]
    (out_dir / "train_log.jsonl").unlink(missing_ok=True)
    started = time.time()
    train(LoopConfig.build(cfg, student_dir=setup["demo"]["student_base"], manifest=labels.train_manifest, out_dir=out_dir,
                           threads_per_worker=torch.get_num_threads(), mixkd=mixkd), LocalRuntime())
    result = {"seed": seed, **scores(str(out_dir / "student"), prompts, setup["labels"].eval_manifest,
                                     setup["config"].eval.max_new_tokens),
              "train_seconds": round(time.time() - started, 1)}
    write_json(done, {"key": key, "result": result})
    return result


def summary(runs: list[dict]) -> dict:
    out = {}
    for metric in ("exact_match", "rouge_l", "kl_to_teacher"):
        values = [r[metric] for r in runs]
        out[metric] = {"mean": round(statistics.fmean(values), 4),
                       "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}
    return out


def run(args, argv) -> int:
    """Entry point from flows.compare (--family limited)."""
    from flows.cli import configure_runtime
    from flows.compare import scores
    from tasks.config import default_data_dir
    from tasks.data import read_prompts
    from tasks.identity import code_version

    torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir or default_data_dir()).resolve()
    configure_runtime(str(data_dir))
    setup = prepare_limited(data_dir, args)
    import ray

    ray.shutdown()  # free the cores for training
    prompts = read_prompts(setup["prepared"].eval.path)
    cfg, curated, expanded = setup["config"], setup["curated"], setup["expanded"]
    entry = {
        "command": "python -m flows.compare " + " ".join(shlex.quote(a) for a in argv),
        "commit": code_version()[:7], "date": time.strftime("%Y-%m-%d"), "primary_metric": "exact_match",
        "init": "base (the demo's LM-pretrained student, as in make compare's main group)",
        "steps": args.steps, "seeds": args.seeds, "batch_size": cfg.train.batch_size, "learning_rate": cfg.train.learning_rate,
        "top_k": cfg.teacher.top_k, "teacher_steps": cfg.data.demo_teacher_steps,
        "data": {"fraction": args.fraction, "train_prompts": setup["prepared"].train.rows, "of_total": setup["total_train"],
                 "eval_prompts": len(prompts),
                 "expanded": {"written": expanded.prompts.rows, "asked": cfg.expand.num_prompts, "stats": expanded.stats,
                              "sample": [r["prompt"] for r in read_prompts(expanded.prompts.path)[:8]]},
                 "curated": curated.summary(), "fkl+expanded_train_prompts": curated.train.rows,
                 "curated_originals_only": setup["curated_only"].summary(),
                 "fkl+curated_train_prompts": setup["curated_only"].train.rows},
        "mixkd": {"settings": cfg.train.mixkd.model_dump(), "pairs": setup["mixkd"].pairs},
        "teacher": scores(setup["demo"]["teacher"], prompts, setup["labels"].eval_manifest, cfg.eval.max_new_tokens),
        "base_init": scores(setup["demo"]["student_base"], prompts, setup["labels"].eval_manifest, cfg.eval.max_new_tokens),
        "rows": {},
    }
    print(f"compare[limited]: teacher {entry['teacher']}, base {entry['base_init']}, data {entry['data']['curated']}", flush=True)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(args.threads,)) as pool:
        futures = {(row, seed): pool.submit(run_row, setup, row, seed, args.steps, prompts) for row in ROWS for seed in range(args.seeds)}
        for row in ROWS:
            runs = [futures[(row, seed)].result() for seed in range(args.seeds)]
            entry["rows"][row] = {"runs": runs, **summary(runs)}
            print(f"compare[limited]: {row}: {entry['rows'][row]['exact_match']} {runs}", flush=True)
            write_limited(entry, Path(args.out))
    print(render(entry))
    return 0


def write_limited(entry: dict, out: Path) -> None:
    """Merge into methods.json under "limited_data" (every other key kept)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "methods.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["limited_data"] = entry
    path.write_text(json.dumps(results, indent=2) + "\n")


def render(entry: dict) -> str:
    lines = ["| row | train prompts | exact match | ROUGE-L | KL to teacher |", "|---|---|---|---|---|"]
    for row, stats in entry["rows"].items():
        size = entry["data"].get(f"{row}_train_prompts", entry["data"]["train_prompts"])
        lines.append(f"| {row} | {size} | " + " | ".join(f"{stats[m]['mean']:.3f} ± {stats[m]['std']:.3f}"
                                                       for m in ("exact_match", "rouge_l", "kl_to_teacher")) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    group = parser.add_argument_group("--family limited (issue 17)")
    group.add_argument("--fraction", type=float, default=0.1, help="share of the demo's training prompts (limited data)")
    group.add_argument("--expand-prompts", type=int, default=600, help="prompts the teacher is asked to write")
    group.add_argument("--mixkd-epochs", type=int, default=4, help="epochs of the mixup plan (pairs: one per training sequence each)")


if __name__ == "__main__":
    sys.exit("run through flows.compare: python -m flows.compare --family limited")
