"""Training throughput and memory: KD on stored top-k labels vs cross-entropy, offline vs online KD,
the fused student head (loss from hidden states, no [tokens x V] logits) and sequence packing.

Prints one JSON object as its last line. Each mode runs in a fresh subprocess so
peak memory is its own. Same student, same token batches, same optimizer in every
mode; only the loss path (and, for online KD, a teacher forward per step) differs.
Models have random weights: throughput does not depend on what the weights are.

Modes: ce / kd_offline (today's path: logits, then the chunked loss), kd_online (a
teacher forward per step), ce_fused / kd_fused (tasks/objectives/fused_head.py), and
kd_fused on a varied-length batch, padded (one row per sequence) vs packed
(tasks/train/packing.py): useful tokens/s counts non-pad tokens.

Memory: ``peak_mem_gib`` is the process peak (CUDA: max_memory_allocated; CPU: peak
RSS, which includes ~1 GiB of torch/transformers code and buffers); ``train_mem_gib``
is the peak during the measured steps above the memory held before the first step
(model weights): gradients, optimizer state, activations, logits. The memory ratios use
``train_mem_gib``. On CPU each mode also reports process CPU seconds per step (and useful
tokens per CPU second): on a shared, loaded machine wall-clock rates swing with other
jobs, CPU time much less. On CPU glibc's mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_) so
freed large buffers leave the RSS and it tracks live memory. MFU (GPU only) counts
6 x params x useful tokens/s (+ 2 x teacher params for online KD), attention excluded.

  python bench/train.py --quick                    # CPU, tiny models, vocab 8192
  python bench/train.py --quick --vocab 131072     # same at another vocabulary size
  python bench/train.py --preset gpu-0.5b          # on a GPU: ~0.5B student, vocab 152k, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
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
MODES = ("ce", "kd_offline", "kd_online", "ce_fused", "kd_fused", "packing")
# "packing": kd_fused on a varied-length batch (lengths uniform in [seq / 8, seq]), padded and packed, in one
# process with their steps alternating, so both see the same machine load; reported as these two modes.
VARIED = ("kd_fused_padded", "kd_fused_packed")
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


class _PeakRss:
    """Samples this process's RSS (CPU) every millisecond in a thread; ``peak`` in bytes."""

    def __init__(self):
        import threading

        self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.read())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def _varied_records(b: int, t: int, k: int, v: int, gen) -> list[dict]:
    """b sequences of lengths uniform in [t / 8, t] (a quarter prompt), with stored top-k labels."""
    import torch

    records = []
    for _ in range(b):
        n = int(torch.randint(max(2, t // 8), t + 1, (1,), generator=gen))
        p = max(1, n // 4)
        tokens = torch.randint(0, v, (n,), generator=gen)
        lp = torch.log_softmax(torch.randn(n - p, k, generator=gen) * 2, -1).sort(-1, descending=True).values - 0.05
        records.append({"prompt_ids": tokens[:p], "response_ids": tokens[p:], "topk_ids": torch.randint(0, v, (n - p, k), generator=gen),
                        "topk_logprobs": lp, "tail_logmass": torch.log1p(-lp.exp().sum(-1))})
    return records


def run_mode(mode: str, p: dict, objective_name: str) -> list[dict]:
    import torch

    from tasks.objectives import SparseLabels, build_objective
    from tasks.objectives.fused_head import FusedHead
    from tasks.train.batches import collate, model_inputs
    from tasks.train.packing import collate_packed

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    student = _llama(p["vocab"], p["s_hidden"], p["s_layers"], p["s_heads"], device, torch.float32, p.get("s_kv"))
    # fp32 master weights; bf16 autocast on GPU.
    teacher = _llama(p["vocab"], p["t_hidden"], p["t_layers"], p["t_heads"], device, dtype, p.get("t_kv")).eval() if mode == "kd_online" else None
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=cuda)
    objective = build_objective("ce" if mode.startswith("ce") else objective_name)
    fused = FusedHead(objective) if "fused" in mode or mode == "packing" else None
    gen = torch.Generator(device="cpu").manual_seed(1)
    b, t, k, v = p["batch"], p["seq"], p["k"], p["vocab"]
    runs = {}  # name -> (model inputs, mask, labels, input tokens, useful tokens, rows)
    if mode == "packing":
        records = _varied_records(b, t, k, v, gen)
        for name, collate_fn in zip(VARIED, (collate, collate_packed)):
            batch = {key: x.to(device) for key, x in collate_fn(records, 0, k).items()}
            labels = SparseLabels(ids=batch["ids"], logprobs=batch["logprobs"], tail_logmass=batch["tail_logmass"], target_ids=batch["target_ids"])
            n = batch["input_ids"].numel()
            runs[name] = (model_inputs(batch), batch["mask"], labels, n, n - int(batch["num_pad_tokens"]), batch["input_ids"].shape[0])
    else:
        ids = torch.randint(0, v, (b, t), generator=gen).to(device)
        mask = torch.ones(b, t - 1, dtype=torch.bool, device=device)
        # Stored labels: a plausible sorted top-k distribution per position.
        stored_lp = torch.log_softmax(torch.randn(b, t - 1, k, generator=gen) * 2, -1).sort(-1, descending=True).values - 0.05
        stored = SparseLabels(ids=torch.randint(0, v, (b, t - 1, k), generator=gen).to(device), logprobs=stored_lp.to(device),
                              tail_logmass=torch.log1p(-stored_lp.exp().sum(-1)).to(device), target_ids=ids[:, 1:])
        runs[mode] = ({"input_ids": ids}, mask, stored, b * (t - 1), b * t, b)

    # Memory held before the first step (code, weights, data); training memory is what the steps add on top.
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    else:
        base = _PeakRss.read()

    def step_once(inputs, mask, labels):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
            if teacher is not None:
                with torch.no_grad():
                    tl = torch.log_softmax(teacher(**inputs).logits[:, :-1].float(), -1)
                    top = tl.topk(k, -1)
                    labels = SparseLabels(ids=top.indices, logprobs=top.values, tail_logmass=torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6)),
                                          target_ids=inputs["input_ids"][:, 1:])
                    del tl
            if fused is not None:
                hidden = student.model(**inputs).last_hidden_state[:, :-1]
                loss = fused.loss(hidden, student.lm_head.weight, labels, mask)
            else:
                logits = student(**inputs).logits[:, :-1]
                loss = objective(logits, labels, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(p["warmup"]):
        for run in runs.values():
            step_once(*run[:3])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = {name: [] for name in runs}
    cpu_times = {name: [] for name in runs}  # process CPU seconds: the work done, less sensitive to a shared machine's load
    with contextlib.nullcontext() if cuda else _PeakRss() as rss:
        for _ in range(p["steps"]):
            for name, run in runs.items():  # modes of one process alternate step by step
                if cuda:
                    torch.cuda.synchronize()
                start, cpu_start = time.perf_counter(), time.process_time()
                step_once(*run[:3])
                if cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    params = sum(x.numel() for x in student.parameters())
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss.peak
    results = []
    for name, (_, _, _, tokens, useful, rows) in runs.items():
        step_s = statistics.median(times[name])  # the median: robust to load spikes on a shared machine
        out = {"mode": name, "tokens_per_s": round(tokens / step_s, 1), "useful_tokens_per_s": round(useful / step_s, 1),
               "step_s": round(step_s, 4), "student_params": params, "rows": rows, "padding_waste": round(1 - useful / tokens, 4) if name in VARIED else 0.0,
               "train_mem_gib": round((peak - base) / 2**30, 3)}
        if not cuda:
            cpu_s = statistics.median(cpu_times[name])
            out["cpu_s_per_step"] = round(cpu_s, 4)
            out["useful_tokens_per_cpu_s"] = round(useful / cpu_s, 1)
        if cuda:
            out["peak_mem_gib"] = round(peak / 2**30, 3)
            # Training FLOPs ~ 6 N useful tokens (+ 2 N_teacher tokens for the online teacher forward).
            flops = 6 * params * useful / step_s
            if teacher is not None:
                flops += 2 * sum(x.numel() for x in teacher.parameters()) * useful / step_s
            out["mfu_h100_bf16"] = round(flops / H100_BF16_DENSE_FLOPS, 4)
            out["device"] = torch.cuda.get_device_name()
        else:
            out["peak_mem_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
            out["device"] = "cpu"
        results.append(out)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default: the preset's)")
    parser.add_argument("--objective", default="fkl+ce", help="the KD objective measured (default: the pipeline's default)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, help="measured steps per mode (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="unmeasured steps first (default: the preset's)")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: one mode in this process
    args = parser.parse_args()
    preset = "quick" if args.quick else args.preset
    params = dict(PRESETS[preset])
    for key in ("vocab", "steps", "warmup"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    if args.mode:
        for out in run_mode(args.mode, params, args.objective):
            print(json.dumps(out))
        return
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; valid: {', '.join(MODES)}")
    results = {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # A fixed mmap threshold: glibc then returns every freed large buffer to the OS, so RSS tracks live memory.
    env = {**os.environ, "PYTHONPATH": root, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for mode in modes:
        cmd = [sys.executable, __file__, "--preset", preset, "--objective", args.objective, "--mode", mode]
        for key in ("vocab", "steps", "warmup"):
            if getattr(args, key):
                cmd += [f"--{key}", str(getattr(args, key))]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"mode {mode} failed:\n{proc.stderr[-3000:]}")
        for line in proc.stdout.strip().splitlines():
            if line.startswith("{"):
                out = json.loads(line)
                results[out["mode"]] = out
                print(line, file=sys.stderr)

    def ratio(a: str, b: str, key: str = "tokens_per_s"):
        if a not in results or b not in results or not results[b][key]:
            return None
        return round(results[a][key] / results[b][key], 3)

    summary = {
        "bench": "student training throughput", "preset": preset, "params": params, "objective": args.objective,
        "kd_vs_ce_tokens_per_s_ratio": ratio("kd_offline", "ce"),
        "offline_vs_online_kd_speedup": ratio("kd_offline", "kd_online"),
        "peak_mem_gib": {m: r["peak_mem_gib"] for m, r in results.items()},
        "train_mem_gib": {m: r["train_mem_gib"] for m, r in results.items()},
        "kd_fused_peak_memory_vs_ce": ratio("kd_fused", "ce_fused", "train_mem_gib"),
        "kd_fused_peak_memory_vs_kd": ratio("kd_fused", "kd_offline", "train_mem_gib"),
        "kd_fused_vs_ce_fused_tokens_per_s_ratio": ratio("kd_fused", "ce_fused"),
        "kd_fused_vs_kd_tokens_per_s_ratio": ratio("kd_fused", "kd_offline"),
        "packed_vs_padded_useful_tokens_per_s": ratio("kd_fused_packed", "kd_fused_padded", "useful_tokens_per_s"),
        "packed_vs_padded_useful_tokens_per_cpu_s": ratio("kd_fused_packed", "kd_fused_padded", "useful_tokens_per_cpu_s")
        if "useful_tokens_per_cpu_s" in results.get("kd_fused_packed", {}) else None,
        "padding_waste": {m: results[m]["padding_waste"] for m in VARIED if m in results},
        "step_s": "median over the measured steps",
        "mfu_h100_bf16": {m: r["mfu_h100_bf16"] for m, r in results.items() if "mfu_h100_bf16" in r} or None,
        "modes": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
