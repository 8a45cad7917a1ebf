"""Prepare-stage time and peak memory on a generated prompt dataset (default 1M training prompts); prints JSON.

    .venv/bin/python bench/prepare.py                      # 1,000,000 training + 10,000 evaluation prompts
    .venv/bin/python bench/prepare.py --rows 200000 --out docs/results/prepare_200k.json

The data (JSONL, one file per split), a byte-level BPE tokenizer (vocab 1024) and a
model config are generated under a temporary folder; `tasks.data.prepare` then runs
in a fresh child process, which reports its wall time and peak resident memory
(ru_maxrss), next to its resident memory after imports and tokenizer loading. The
datasets Arrow cache goes to the temporary folder too, so every run converts the
JSONL afresh (the cost a first run pays).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("apple river stone cloud tiger lamp forest candle mirror garden pencil rocket violin castle harbor meadow winter "
         "summer bridge island window planet basket feather dragon market silver thunder engine valley").split()


def generate(folder: Path, train_rows: int, eval_rows: int, seed: int = 0) -> dict[str, int]:
    """Distinct prompts (the index is in the text) of 8-20 words; evaluation prompts never occur in training."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, rows, offset in (("train", train_rows, 0), ("test", eval_rows, train_rows)):
        path = folder / f"{split}.jsonl"
        with path.open("w") as f:
            for i in range(offset, offset + rows):
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                words = " ".join(rng.choices(WORDS, k=rng.randint(2, 14)))
                f.write(json.dumps({"id": f"ex-{i}", "prompt": f"Item {i}: what is {a} plus {b}, given {words}?",
                                    "references": [str(a + b), f"The answer is {a + b}."]}) + "\n")
        sizes[split] = path.stat().st_size
    return sizes


def build_model_folder(folder: Path) -> str:
    from tasks.demo.models import llama_config, train_tokenizer

    texts = [f"Item {i}: what is {i % 100} plus {i % 7}, given {' '.join(WORDS[i % 30:i % 30 + 5])}?" for i in range(3000)]
    tok = train_tokenizer(texts, folder, vocab_size=1024)
    llama_config(tok, hidden=64, layers=1, heads=1).save_pretrained(folder)
    return str(folder)


def child(args) -> None:
    """Runs in a fresh process: prepare once, report time and memory."""
    from tasks.config import DataConfig
    from tasks.data import prepare
    from tasks.models import load_tokenizer

    load_tokenizer(args.model)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    manifest = prepare(DataConfig(), args.data, args.model, args.model, Path(args.prompts), 32, top_k=20)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "rss_after_imports_mib": base_rss,
                      "rows": {k: v["rows"] for k, v in manifest["splits"].items()},
                      "shard_mib": {k: os.path.getsize(v["path"]) / 2**20 for k, v in manifest["splits"].items()},
                      "checks": manifest["checks"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="training prompts")
    parser.add_argument("--eval-rows", type=int, default=10_000)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data"), parser.add_argument("--model"), parser.add_argument("--prompts")
    args = parser.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        sizes = generate(tmp / "data", args.rows, args.eval_rows)
        gen_s = time.perf_counter() - t0
        model = build_model_folder(tmp / "model")
        env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf-cache"), "TOKENIZERS_PARALLELISM": "true"}
        proc = subprocess.run([sys.executable, __file__, "--child", "--data", str(tmp / "data"), "--model", model,
                               "--prompts", str(tmp / "prompts")], env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-4000:])
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
    total_rows = args.rows + args.eval_rows
    result = {
        "bench": "prepare",
        "command": " ".join(["bench/prepare.py", *sys.argv[1:]]),
        "format": "prompt (JSONL, one file per split)",
        "train_rows": args.rows, "eval_rows": args.eval_rows,
        "input_mib": {k: round(v / 2**20, 1) for k, v in sizes.items()},
        "generate_input_s": round(gen_s, 1),
        "prepare_s": round(measured["seconds"], 1),
        "rows_per_s": round(total_rows / measured["seconds"]),
        "peak_rss_mib": round(measured["peak_rss_mib"]),
        "rss_after_imports_mib": round(measured["rss_after_imports_mib"]),
        "shard_mib": {k: round(v, 1) for k, v in measured["shard_mib"].items()},
        "rows": measured["rows"],
        "checks": measured["checks"],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_1m": round(os.getloadavg()[0], 1)},
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
