"""Evaluation stage entry point: score student and teacher on held-out prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from storage import soft_labels
from storage.atomic import write_json
from tasks.config import EvalConfig
from tasks.contracts import Evaluation, Frozen, PreparedData, TeacherLabels, TrainedStudent
from tasks.data import read_prompts
from tasks.evaluate.distribution import distribution_scores
from tasks.evaluate.generation import SAMPLE_TEMPERATURE, generate_student, sample_seed_values, score_generations, score_sampled
from tasks.evaluate.metrics import summarize, summarize_ratio
from tasks.evaluate.perplexity import reference_nll
from tasks.identity import model_identity
from tasks.models import load_tokenizer
from tasks.stage_cache import StageContext, StageSpec


def run_eval_stage(cfg: EvalConfig, student_dir: str, teacher_eval_manifest: str, prompts_path: str, out_dir: Path,
                   ray_address: str | None = None, log_fn=print, teacher_dir: str | None = None) -> dict[str, Any]:
    """Student metrics, and the teacher's on the same prompts: greedy answers come from its held-out labels;
    with `teacher_dir`, also its sampled answers (one engine start) and the perplexity of the references."""
    from tasks.ray_runtime import ensure_ray

    ensure_ray(ray_address)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(student_dir)
    prompts = read_prompts(prompts_path)

    # One engine start for the student: greedy and every sampled seed in the same call.
    seeds = sample_seed_values(cfg.sample_seeds)
    generated = generate_student(student_dir, cfg.engine, [p["prompt_ids"] for p in prompts], cfg.max_new_tokens, seeds)
    student_rows = score_generations(tokenizer, prompts, generated["greedy"])
    sampled_rows = score_sampled(tokenizer, prompts, generated["sampled"]) if seeds else None
    # The teacher stage labelled the held-out prompts greedily: its responses are the teacher's answers.
    teacher_by_id = {r["example_id"]: r["response_ids"].tolist() for r in soft_labels.read(teacher_eval_manifest)}
    teacher_rows = score_generations(tokenizer, prompts, [teacher_by_id[p["example_id"]] for p in prompts])
    dist_rows = distribution_scores(student_dir, teacher_eval_manifest)
    nll_rows = reference_nll(student_dir, prompts)

    student = {m: summarize([r[m] for r in student_rows]) for m in ("exact_match", "rouge_l")}
    if sampled_rows is not None:
        student["rouge_l_sampled"] = summarize([r["rouge_l_sampled"] for r in sampled_rows])
    student.update({m: summarize([r[m] for r in dist_rows]) for m in ("kl_to_teacher", "reverse_kl_to_teacher", "top1_agreement")})
    student["perplexity"] = summarize_ratio([r["nll"] for r in nll_rows], [r["tokens"] for r in nll_rows], transform=np.exp)
    teacher = {m: summarize([r[m] for r in teacher_rows]) for m in ("exact_match", "rouge_l")}
    teacher_sampled = None
    if teacher_dir is not None:
        if seeds:
            teacher_gen = generate_student(teacher_dir, cfg.engine, [p["prompt_ids"] for p in prompts], cfg.max_new_tokens, seeds)
            teacher_sampled = score_sampled(tokenizer, prompts, teacher_gen["sampled"])
            teacher["rouge_l_sampled"] = summarize([r["rouge_l_sampled"] for r in teacher_sampled])
        teacher_nll = reference_nll(teacher_dir, prompts)
        teacher["perplexity"] = summarize_ratio([r["nll"] for r in teacher_nll], [r["tokens"] for r in teacher_nll], transform=np.exp)
    metrics: dict[str, Any] = {"student": student, "teacher": teacher, "num_examples": len(prompts)}
    if seeds:
        metrics["sampling"] = {"seeds": seeds, "temperature": SAMPLE_TEMPERATURE, "top_p": 1.0,
                               "who": "student and teacher" if teacher_sampled is not None else "student"}
    if cfg.lm_eval_tasks:
        from tasks.evaluate.harness import run_lm_eval

        harness = run_lm_eval(student_dir, cfg.lm_eval_tasks, limit=cfg.lm_eval_limit, log_fn=log_fn)
        student.update(harness.pop("metrics"))
        metrics["lm_eval"] = harness

    with (out_dir / "generations.jsonl").open("w") as f:
        for i, (s, t) in enumerate(zip(student_rows, teacher_rows)):
            row = {"example_id": s["example_id"], "prompt": s["prompt"], "references": s["references"],
                   "student": s["response"], "teacher": t["response"],
                   "student_exact_match": s["exact_match"], "teacher_exact_match": t["exact_match"]}
            if sampled_rows is not None:
                row["student_sampled"] = sampled_rows[i]["responses"]
                row["student_rouge_l_sampled"] = sampled_rows[i]["rouge_l_sampled"]
            if teacher_sampled is not None:
                row["teacher_sampled"] = teacher_sampled[i]["responses"]
                row["teacher_rouge_l_sampled"] = teacher_sampled[i]["rouge_l_sampled"]
            f.write(json.dumps(row) + "\n")
    metrics_file = write_json(out_dir / "metrics.json", metrics)
    log_fn("eval: student " + ", ".join(f"{m} {v['value']:.3f}" for m, v in student.items())
           + " | teacher " + ", ".join(f"{m} {v['value']:.3f}" for m, v in teacher.items()))
    return {"metrics_file": str(metrics_file), "metrics": metrics}


class EvalInputs(Frozen):
    """What evaluation reads: the held-out prompts, the teacher's held-out labels and the trained student."""

    prepared: PreparedData
    labels: TeacherLabels
    student: TrainedStudent


def run(cfg: EvalConfig, inputs: EvalInputs, ctx: StageContext) -> Evaluation:
    """Stage entry point: metrics.json and generations.jsonl in ctx.out_dir."""
    result = run_eval_stage(cfg, inputs.student.checkpoint, inputs.labels.eval_manifest, inputs.prepared.eval.path, ctx.out_dir,
                            ray_address=ctx.ray_address, log_fn=ctx.log, teacher_dir=inputs.prepared.teacher_dir)
    return Evaluation(key=ctx.key, metrics_file=result["metrics_file"], metrics=result["metrics"])


def _key_parts(cfg: EvalConfig, inputs: EvalInputs) -> dict[str, Any]:
    return {"student": inputs.student.key, "labels": inputs.labels.key, "prompts": inputs.prepared.eval.sha256,
            "teacher_model": model_identity(inputs.prepared.teacher_dir)}


STAGE = StageSpec(name="eval", version=3, output_type=Evaluation, run=run, key_parts=_key_parts,
                  verify=lambda output: Path(output.metrics_file).exists(), describe="evaluation")
