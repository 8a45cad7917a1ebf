"""Packing row budget: step time and padding waste of padded vs packed micro-batches at row budgets of 1x, 2x, 4x
the micro-batch's longest sequence (train.packing_max_tokens), steps alternating in one process.

On the bench's varied-length batches (tasks like bench/train.py's packing mode) and, with --labels and --student,
on a stored label set with its student. Prints one JSON object per data set; the last line holds them all.

  python bench/packing_budget.py
  python bench/packing_budget.py --labels DATA/compare/qa/labels-hf-*/train/manifest.json --student DATA/demo/qa/student-base
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tasks.objectives import SparseLabels, build_objective  # noqa: E402
from tasks.train.batches import collate, model_inputs  # noqa: E402
from tasks.train.packing import collate_packed  # noqa: E402


def packed_at(multiple: float):
    def fn(records, pad_id, k):
        longest = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in records)
        return collate_packed(records, pad_id, k, max_tokens=int(multiple * longest))
    return fn


def measure(model, records: list[dict], multiples: list[float], batch_size: int, steps: int, warmup: int = 2) -> dict:
    objective = build_objective("fkl+ce")
    k = int(records[0]["topk_ids"].shape[1])
    layouts = {"padded": collate, **{f"packed_x{m:g}": packed_at(m) for m in multiples}}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = {name: [] for name in layouts}
    waste = {name: [] for name in layouts}
    for step in range(warmup + steps):
        batch = records[step * batch_size : (step + 1) * batch_size]
        for name, fn in layouts.items():
            start = time.perf_counter()
            mb = fn(batch, 0, k)
            labels = SparseLabels(mb["ids"], mb["logprobs"], mb["tail_logmass"], mb["target_ids"])
            objective(model(**model_inputs(mb)).logits[:, :-1], labels, mb["mask"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
                waste[name].append(int(mb["num_pad_tokens"]) / mb["input_ids"].numel())
    base = statistics.median(times["padded"])
    return {name: {"step_s": round(statistics.median(t), 4), "vs_padded": round(base / statistics.median(t), 3),
                   "padding_waste": round(statistics.fmean(waste[name]), 3)} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", help="a soft-label manifest to measure on (with --student)")
    parser.add_argument("--student", help="the student folder for --labels")
    parser.add_argument("--multiples", default="1,2,4", help="row budgets as multiples of the longest sequence")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    multiples = [float(m) for m in args.multiples.split(",")]
    torch.manual_seed(0)
    out = {"bench": "packing row budget", "multiples": multiples, "step_s": "median; vs_padded = padded step time / this one"}
    import train as bench_train  # bench/train.py: the same tiny Llama and varied-length records

    p = bench_train.PRESETS["quick"]
    records = bench_train._varied_records(8 * (args.steps + 2), p["seq"], p["k"], p["vocab"], torch.Generator().manual_seed(1))
    model = bench_train._llama(p["vocab"], p["s_hidden"], p["s_layers"], p["s_heads"], "cpu", torch.float32)
    out["varied_lengths_quick_batch8"] = measure(model, records, multiples, 8, args.steps)
    print(json.dumps(out["varied_lengths_quick_batch8"]), file=sys.stderr)
    if args.labels:
        from storage import soft_labels
        from tasks.models import load_causal_lm

        records = list(soft_labels.read(args.labels))
        out["labels_batch32"] = measure(load_causal_lm(args.student), records, multiples, 32, args.steps)
        out["labels"] = args.labels
    print(json.dumps(out))


if __name__ == "__main__":
    main()
