"""Time and peak memory of one forward+backward of each KD objective vs cross-entropy.

    python bench/loss.py            # V in {32k, 128k} x k in {20, 64}, 5 timed steps
    python bench/loss.py --quick    # fewer configs/objectives and repeats (< 3 min on 2 cores)

What is measured (CPU):
  * time: wall-clock of ``loss = f(logits, ...); loss.backward()``, median over repeats
    run round-robin across CE and the objectives (after one untimed warm-up step each),
    with ``logits.grad`` freed between steps so every step pays for allocating its
    gradient, exactly like the cross-entropy baseline.  With 0 repeats (--quick at 128k)
    the warm-up step itself is the timing.
  * peak memory: the process's peak resident set (VmHWM) during the warm-up step minus the
    resident set just before it; VmHWM is reset first through /proc/self/clear_refs.  So it
    is the step's own transient + retained memory (the [tokens, V] gradient included), on
    top of the already-resident logits and labels.  Large tensors are mmap-backed and
    returned to the OS when freed, so consecutive cases do not hide each other's peaks.
  * baseline: ``F.cross_entropy(logits.view(-1, V), targets)`` on the same logits.
Every token is valid (no padding), so CE and the objectives do the same amount of work.
The last line printed is one JSON object with all numbers and the ratios to CE.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.objectives import DEFAULT_SUPPORT, OBJECTIVE_NAMES, SparseLabels, build_objective  # noqa: E402

CE = "cross_entropy"


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_inputs(tokens: int, vocab: int, ks: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = 4
    seq = tokens // batch
    logits = torch.randn(batch, seq, vocab, generator=g)
    target = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    labels = {}
    for k in ks:
        # distinct ids per row: an odd stride is invertible modulo a power-of-two V
        start = torch.randint(0, vocab, (batch, seq, 1), generator=g)
        ids = (start + torch.arange(k) * 7919) % vocab
        raw = torch.randn(batch, seq, k + 1, generator=g) * 2
        lp = torch.log_softmax(raw, -1)
        top = lp[..., :k].sort(-1, descending=True).values
        labels[k] = SparseLabels(ids=ids, logprobs=top, tail_logmass=lp[..., k], target_ids=target)
    return logits, target, mask, labels


def measure_peak(step, logits) -> tuple[float | None, float]:
    """Warm-up step; returns (peak RSS growth in MiB or None, its wall time in ms)."""
    gc.collect()
    logits.grad = None
    can_peak = _reset_peak()
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    step()
    warm_ms = (time.perf_counter() - t0) * 1e3
    hwm = _status_kib("VmHWM")
    logits.grad = None
    if can_peak and hwm is not None and rss0 is not None:
        return (hwm - rss0) / 1024, warm_ms
    return None, warm_ms


def run_config(vocab, k, logits, target, mask, labels, names, support, chunk_size, repeats):
    """Warm-up (memory) per case, then ``repeats`` round-robin rounds over all cases, so a
    load change on a shared machine hits CE and the objectives alike."""

    def ce_step():
        F.cross_entropy(logits.view(-1, vocab), target.view(-1)).backward()

    steps = {CE: ce_step}
    for name in names:
        obj = build_objective(name, support=support, chunk_size=chunk_size)
        steps[name] = lambda obj=obj: obj(logits, labels, mask).backward()
    peaks, times = {}, {n: [] for n in steps}
    for n, step in steps.items():
        peaks[n], warm = measure_peak(step, logits)
        if repeats == 0:
            times[n].append(warm)
    for _ in range(repeats):
        for n, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[n].append((time.perf_counter() - t0) * 1e3)
            logits.grad = None
    out = {}
    for n in steps:
        r = {"ms": round(statistics.median(times[n]), 1), "ms_min": round(min(times[n]), 1),
             "peak_mib": None if peaks[n] is None else round(peaks[n], 1)}
        if n != CE:
            r["time_ratio_vs_ce"] = round(r["ms"] / out[CE]["ms"], 3)
            if r["peak_mib"] is not None and out[CE]["peak_mib"]:
                r["mem_ratio_vs_ce"] = round(r["peak_mib"] / out[CE]["peak_mib"], 3)
        out[n] = r
        _print(vocab, k, n, r)
    return out


def _print(vocab, k, name, r):
    extra = f"  x{r['time_ratio_vs_ce']:.2f} CE time" if "time_ratio_vs_ce" in r else ""
    mem = f"{r['peak_mib']:8.0f} MiB" if r["peak_mib"] is not None else "   n/a"
    print(f"V={vocab:>6} k={k:>3} {name:>14}: {r['ms']:8.1f} ms  peak +{mem}{extra}", file=sys.stderr, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="V=32k (k=20, 64) all objectives, 2 repeats; V=128k k=64 akl+ce, warm-up step only")
    ap.add_argument("--vocab", type=int, nargs="+", default=None)
    ap.add_argument("--k", type=int, nargs="+", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--objectives", nargs="+", default=None, help="names or mixture specs")
    ap.add_argument("--support", default=DEFAULT_SUPPORT)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    full_names = list(OBJECTIVE_NAMES) + ["0.5*akl+0.5*ce"]
    if args.quick:
        plan = [(32768, [20, 64], full_names), (131072, [64], ["0.5*akl+0.5*ce"])]
        repeats = 2 if args.repeats is None else args.repeats
    else:
        plan = [(v, [20, 64], full_names) for v in (32768, 131072)]
        repeats = 5 if args.repeats is None else args.repeats
    if args.vocab or args.k or args.objectives:
        plan = [
            (v, args.k or ks, args.objectives or names)
            for v, ks, names in (plan if not args.vocab else [(v, [20, 64], full_names) for v in args.vocab])
        ]

    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    configs = []
    for vocab, ks, names in plan:
        logits, target, mask, labels = make_inputs(args.tokens, vocab, ks)
        logits.requires_grad_()
        # quick: at 128k a CE step alone takes 10-25 s here, so time the warm-up step only
        reps = 0 if (args.quick and args.repeats is None and vocab > 65536) else repeats
        for k in ks:
            res = run_config(vocab, k, logits, target, mask, labels[k], names, args.support, args.chunk_size, reps)
            configs.append({"vocab": vocab, "k": k, "repeats": reps, "results": res})
        del logits, labels
        gc.collect()

    summary = {
        "bench": "tasks.objectives loss fwd+bwd vs F.cross_entropy",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tokens": args.tokens,
        "dtype": "float32",
        "support": args.support,
        "chunk_size": args.chunk_size if args.chunk_size else "auto",
        "repeats": repeats,
        "time": "median ms of forward+backward",
        "memory": "peak RSS growth (VmHWM - VmRSS before) of one forward+backward step, MiB",
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - t_start, 1),
        # other processes on the machine: on few shared cores, contention slows torch's
        # small multi-threaded [tokens, k] ops far more than CE's few big ones
        "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(),
        "configs": configs,
    }
    worst = [
        r["time_ratio_vs_ce"] for c in configs for n, r in c["results"].items() if n != CE
    ]
    summary["max_time_ratio_vs_ce"] = max(worst) if worst else None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
