"""Training throughput: KD on stored top-k labels vs cross-entropy, and offline vs online KD.

Prints one JSON object as its last line. Each mode runs in a fresh subprocess so
peak memory is its own (CUDA: max_memory_allocated; CPU: peak RSS). Same
student, same token batches, same optimizer in every mode; only the loss (and,
for online KD, a teacher forward per step) differs. Models have random weights:
throughput does not depend on what the weights are.

  python bench/train.py --quick                    # CPU, tiny models, < 10 min on 2 cores
  python bench/train.py --preset gpu-0.5b          # on a GPU: ~0.5B student, vocab 152k, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PRESETS = {
    "quick": dict(vocab=8192, s_hidden=256, s_layers=4, s_heads=4, t_hidden=512, t_layers=8, t_heads=8,
                  batch=8, seq=256, k=20, steps=6, warmup=2),
    "cpu": dict(vocab=32768, s_hidden=512, s_layers=6, s_heads=8, t_hidden=1024, t_layers=12, t_heads=16,
                batch=4, seq=512, k=20, steps=6, warmup=2),
    # Qwen2.5-0.5B-like student (hidden 896, 24 layers, vocab 151,936); a 1.5B-like teacher for online KD.
    "gpu-0.5b": dict(vocab=151936, s_hidden=896, s_layers=24, s_heads=14, s_kv=2, t_hidden=1536, t_layers=28, t_heads=12, t_kv=2,
                     batch=8, seq=1024, k=20, steps=20, warmup=5),
}
MODES = ("ce", "kd_offline", "kd_online")
H100_BF16_DENSE_FLOPS = 989e12


def _llama(vocab, hidden, layers, heads, device, dtype, kv_heads=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64 + 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=4096, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def run_mode(mode: str, p: dict, objective_name: str) -> dict:
    import torch

    from tasks.objectives import SparseLabels, build_objective

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    student = _llama(p["vocab"], p["s_hidden"], p["s_layers"], p["s_heads"], device, torch.float32, p.get("s_kv"))
    # fp32 master weights; bf16 autocast on GPU.
    teacher = _llama(p["vocab"], p["t_hidden"], p["t_layers"], p["t_heads"], device, dtype, p.get("t_kv")).eval() if mode == "kd_online" else None
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=cuda)
    objective = build_objective("ce" if mode == "ce" else objective_name)
    gen = torch.Generator(device="cpu").manual_seed(1)
    b, t, k, v = p["batch"], p["seq"], p["k"], p["vocab"]
    ids = torch.randint(0, v, (b, t), generator=gen).to(device)
    mask = torch.ones(b, t - 1, dtype=torch.bool, device=device)
    # Stored labels: a plausible sorted top-k distribution per position.
    stored_lp = torch.log_softmax(torch.randn(b, t - 1, k, generator=gen) * 2, -1).sort(-1, descending=True).values - 0.05
    stored = SparseLabels(ids=torch.randint(0, v, (b, t - 1, k), generator=gen).to(device), logprobs=stored_lp.to(device),
                          tail_logmass=torch.log1p(-stored_lp.exp().sum(-1)).to(device), target_ids=ids[:, 1:])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(p["warmup"] + p["steps"]):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
            labels = stored
            if teacher is not None:
                with torch.no_grad():
                    tl = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)
                    top = tl.topk(k, -1)
                    labels = SparseLabels(ids=top.indices, logprobs=top.values, tail_logmass=torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6)),
                                          target_ids=ids[:, 1:])
                    del tl
            logits = student(input_ids=ids).logits[:, :-1]
            loss = objective(logits, labels, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= p["warmup"]:
            times.append(time.perf_counter() - start)
    tokens = b * (t - 1)
    tok_s = tokens * len(times) / sum(times)
    out = {"mode": mode, "tokens_per_s": round(tok_s, 1), "step_s": round(sum(times) / len(times), 4),
           "student_params": sum(x.numel() for x in student.parameters())}
    if cuda:
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        # Training FLOPs ~ 6 N tokens (+ 2 N_teacher tokens for the online teacher forward).
        flops = 6 * out["student_params"] * tok_s
        if teacher is not None:
            flops += 2 * sum(x.numel() for x in teacher.parameters()) * tok_s
        out["mfu_h100_bf16"] = round(flops / H100_BF16_DENSE_FLOPS, 4)
        out["device"] = torch.cuda.get_device_name()
    else:
        out["peak_mem_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        out["device"] = "cpu"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--objective", default="fkl+ce", help="the KD objective measured (default: the pipeline's default)")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: one mode in this process
    args = parser.parse_args()
    preset = "quick" if args.quick else args.preset
    params = PRESETS[preset]
    if args.mode:
        print(json.dumps(run_mode(args.mode, params, args.objective)))
        return
    results = {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for mode in MODES:
        proc = subprocess.run([sys.executable, __file__, "--preset", preset, "--objective", args.objective, "--mode", mode],
                              capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
        if proc.returncode != 0:
            raise SystemExit(f"mode {mode} failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results[mode]), file=sys.stderr)
    summary = {
        "bench": "student training throughput", "preset": preset, "params": params, "objective": args.objective,
        "kd_vs_ce_tokens_per_s_ratio": round(results["kd_offline"]["tokens_per_s"] / results["ce"]["tokens_per_s"], 3),
        "offline_vs_online_kd_speedup": round(results["kd_offline"]["tokens_per_s"] / results["kd_online"]["tokens_per_s"], 3),
        "peak_mem_gib": {m: r["peak_mem_gib"] for m, r in results.items()},
        "modes": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
