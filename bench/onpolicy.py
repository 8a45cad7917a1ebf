"""Cost of on-policy rounds: seconds per round split into engine start, rollout, scoring and update, and rollout
tokens/s against plain vLLM generation of the same student (same prompts, same length cap, no log-probs).

    .venv/bin/python bench/onpolicy.py --teacher DIR --student DIR --prompts PARQUET [--method onpolicy_rkl] \
        [--rounds 2] [--prompts-per-round 32] [--max-new-tokens 32] [--out docs/results/onpolicy_cpu.json]

Prints one JSON object (and writes it with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--prompts", required=True, help="Prepared training prompts (Parquet with example_id, prompt_ids, references).")
    ap.add_argument("--method", default="onpolicy_rkl", choices=["minillm", "gkd", "onpolicy_rkl"])
    ap.add_argument("--teacher-mix", default="off", choices=["exact", "off"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts-per-round", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import ray

    from storage.atomic import sha256_file
    from tasks.contracts import SplitFile
    from tasks.onpolicy.config import OnPolicyConfig
    from tasks.onpolicy.rollout import StudentSampler, choose_prompts, rollout_seed
    from tasks.onpolicy.rounds import OnPolicyInputs, run_onpolicy_stage
    from tasks.ray_runtime import ensure_ray
    from tasks.stage_cache import StageContext

    cfg = OnPolicyConfig(method=args.method, teacher_mix=args.teacher_mix, rounds=args.rounds,
                         prompts_per_round=args.prompts_per_round, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                         inner_epochs=1, batch_size=8, learning_rate=1e-4, gkd_lambda=1.0)
    prompts = SplitFile(path=args.prompts, rows=pq.read_metadata(args.prompts).num_rows, sha256=sha256_file(args.prompts))
    inputs = OnPolicyInputs(student_dir=args.student, prompts=prompts, teacher_dir=args.teacher)
    ensure_ray()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        run_onpolicy_stage(cfg, inputs, StageContext(out_dir=Path(tmp), key="bench", log=print))
        total = time.time() - start
        rounds = [json.loads(line) for line in (Path(tmp) / "rounds.jsonl").read_text().splitlines()]

    # Plain vLLM generation of the same student, same prompts and seeds, no log-probs.
    chosen = choose_prompts(pq.read_table(args.prompts).to_pylist(), 0, cfg.prompts_per_round, cfg.seed)
    seeds = [rollout_seed(cfg.seed, 0, p["example_id"]) for p in chosen]
    t0 = time.time()
    sampler = ray.remote(StudentSampler).options(num_cpus=0.5).remote(args.student, cfg.engine)
    ray.get(sampler.__ray_ready__.remote())
    engine_start = time.time() - t0
    t0 = time.time()
    plain_tokens = ray.get(sampler.generate_plain.remote(chosen, seeds, max_new_tokens=cfg.max_new_tokens, temperature=1.0))
    plain_s = time.time() - t0
    t0 = time.time()
    samples = ray.get(sampler.sample.remote(chosen, seeds, max_new_tokens=cfg.max_new_tokens, temperature=1.0))
    logprob_s = time.time() - t0
    ray.kill(sampler)

    rollout_tokens = [r["tokens"] for r in rounds]
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
        # 0: the engine core in the actor's process (stillhouse's CPU default); 1: vLLM's separate engine processes.
        "vllm_enable_v1_multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
        "method": cfg.method, "sampler": cfg.sampler, "rounds": cfg.rounds, "prompts_per_round": cfg.prompts_per_round,
        "max_new_tokens": cfg.max_new_tokens, "top_k": cfg.top_k, "stage_total_s": round(total, 2),
        "per_round": [{"round": r["round"], **r["seconds"], "tokens": r["tokens"],
                       "rollout_tokens_per_s": round(r["tokens"] / max(r["seconds"]["rollout"], 1e-9), 1)} for r in rounds],
        "mean_seconds": {k: round(sum(r["seconds"][k] for r in rounds) / len(rounds), 2)
                         for k in ("engine", "rollout", "scoring", "update")},
        "plain_vllm": {"engine_start_s": round(engine_start, 2), "tokens": plain_tokens,
                       "tokens_per_s": round(plain_tokens / max(plain_s, 1e-9), 1)},
        "vllm_with_sampled_logprob": {"tokens": sum(len(s["response_ids"]) for s in samples),
                                      "tokens_per_s": round(sum(len(s["response_ids"]) for s in samples) / max(logprob_s, 1e-9), 1)},
        "rollout_tokens_per_s_mean": round(sum(rollout_tokens) / max(sum(r["seconds"]["rollout"] for r in rounds), 1e-9), 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
