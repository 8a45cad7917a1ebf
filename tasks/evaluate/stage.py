"""Evaluation stage entry point: score student and teacher on held-out prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from storage import soft_labels
from storage.atomic import write_json
from tasks.config import EvalConfig
from tasks.data import read_prompts
from tasks.evaluate.distribution import distribution_scores
from tasks.evaluate.generation import greedy_generate, score_generations
from tasks.evaluate.metrics import summarize
from tasks.models import load_tokenizer


def run_eval_stage(cfg: EvalConfig, student_dir: str, teacher_eval_manifest: str, prompts_path: str, out_dir: Path,
                   ray_address: str | None = None, log_fn=print) -> dict[str, Any]:
    from tasks.ray_runtime import ensure_ray

    ensure_ray(ray_address)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(student_dir)
    prompts = read_prompts(prompts_path)

    student_ids = greedy_generate(student_dir, cfg.engine, [p["prompt_ids"] for p in prompts], cfg.max_new_tokens)
    student_rows = score_generations(tokenizer, prompts, student_ids)
    # The teacher stage labelled the held-out prompts greedily: its responses are the teacher's answers.
    teacher_by_id = {r["example_id"]: r["response_ids"].tolist() for r in soft_labels.read(teacher_eval_manifest)}
    teacher_rows = score_generations(tokenizer, prompts, [teacher_by_id[p["example_id"]] for p in prompts])
    dist_rows = distribution_scores(student_dir, teacher_eval_manifest)

    student = {m: summarize([r[m] for r in student_rows]) for m in ("exact_match", "rouge_l")}
    student.update({m: summarize([r[m] for r in dist_rows]) for m in ("kl_to_teacher", "reverse_kl_to_teacher", "top1_agreement")})
    teacher = {m: summarize([r[m] for r in teacher_rows]) for m in ("exact_match", "rouge_l")}
    metrics = {"student": student, "teacher": teacher, "num_examples": len(prompts)}
    with (out_dir / "generations.jsonl").open("w") as f:
        for s, t in zip(student_rows, teacher_rows):
            f.write(json.dumps({"example_id": s["example_id"], "prompt": s["prompt"], "references": s["references"],
                                "student": s["response"], "teacher": t["response"],
                                "student_exact_match": s["exact_match"], "teacher_exact_match": t["exact_match"]}) + "\n")
    metrics_file = write_json(out_dir / "metrics.json", metrics)
    log_fn("eval: student " + ", ".join(f"{m} {v['value']:.3f}" for m, v in student.items())
           + " | teacher " + ", ".join(f"{m} {v['value']:.3f}" for m, v in teacher.items()))
    return {"metrics_file": str(metrics_file), "metrics": metrics}
