"""Soft-label storage and capture benchmark: codec size and error, and capture overhead.

    python bench/capture.py --quick     # < 10 min on 2 cores (demo teacher)
    python bench/capture.py --quick --larger   # also capture overhead on a ~60M-parameter, 32k-vocabulary model
    python bench/capture.py             # more sequences and repeats

Needs the demo assets (built once, reused): --demo-dir (default stillhouse-data),
i.e. tasks.demo.assets.ensure_demo_assets(Path(dir)).

1. Codec size and error. Label distributions come from the trained demo
   teacher (4 layers x 256, vocab 736): teacher forcing of training prompts +
   first reference + EOS, full-vocabulary log-softmax in float32, top-k at
   k=20 and k=64 (the exact labels). Three vocabularies:
     * demo: the teacher's own ids (V=736);
     * zipf-32k / zipf-152k: the same per-position log-prob profiles (values,
       tail mass, rank of the realised token) with ids redrawn: the k ids of a
       position are k distinct draws, in rank order, from a Zipf(s=1.0) law
       over V, id = frequency rank (BPE vocabularies number tokens roughly by
       frequency). Draws are independent across positions, so no
       cross-position redundancy helps the codec (pessimistic); the id
       entropy is ~11.8 bits at 152k. A realised token outside the top-k gets
       a fresh Zipf id outside it.
     * code-32k / code-152k (--code-lm): a real byte-level BPE vocabulary
       (32,000 / 152,064 ids) and a small Llama trained briefly on the
       Python sources of this virtualenv (bench/code_lm.py; built once,
       ~15-30 min on 2 cores, then reused); exact top-k by teacher forcing
       on held-out files. These are the realistic-vocabulary numbers: ids
       with a real tokenizer's frequency structure, from a trained model.
   For each codec the labels are written with storage.soft_labels.write_shard
   and read back with storage.soft_labels.read. Reported: bytes per
   (token, entry) of the label columns (ids, log-probs, tail, realised
   log-prob) and of the whole file; max abs error of top-k log-probs, tail
   and realised log-prob; relative error of the KD loss (fkl, tail_bucket
   support) of a fixed student between decoded and exact labels. The student:
   teacher top-k log-probs + N(0, 0.5^2) noise, and random logits
   outside the top-k that carry the teacher's tail mass x exp(N(0, 0.5^2)).
2. Capture overhead. One vLLM engine (float32 CPU, max_logprobs=k), the
   demo teacher's train prompts at the teacher stage's settings
   (temperature 1, max_new_tokens 32), same seeds: plain generation (no
   logprobs, detokenize=False) vs the teacher stage's capture
   (generate_rows: flat top-k log-probs + extraction + compact shard write),
   alternated, median of repeats. tokens/s counts generated tokens.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from storage import soft_labels  # noqa: E402
from storage.codec import CODECS  # noqa: E402
from tasks.teacher.extract import tail_logmass  # noqa: E402

LABEL_COLUMNS = {"topk_ids", "topk_logprobs", "token_logprob", "tail_logmass", "topk_id_bucket", "topk_id_bits",
                 "top1_logprob_level", "topk_logprob_gaps",
                 "tail_logmass_level", "token_logprob_outside"}


# --- label distributions -------------------------------------------------------------------

def demo_profiles(assets: dict[str, str], num_seqs: int, kmax: int) -> dict[str, np.ndarray]:
    """Exact top-kmax labels of the demo teacher on training prompts + first reference + EOS."""
    import torch

    from tasks.data import load_rows
    from tasks.models import load_causal_lm, load_tokenizer
    from tasks.prompting import format_prompt

    tok = load_tokenizer(assets["teacher"])
    model = load_causal_lm(assets["teacher"]).eval()
    rows = load_rows(str(Path(assets["dataset"])), "train")[:num_seqs]
    out = {"prompt_ids": [], "response_ids": [], "topk_ids": [], "topk_logprobs": [], "token_logprob": []}
    seqs = []
    for row in rows:
        prompt = tok(format_prompt(row["prompt"]), add_special_tokens=True)["input_ids"]
        response = tok(" " + row["references"][0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append((prompt, response))
    with torch.no_grad():
        for start in range(0, len(seqs), 64):  # right-padded batches: causal, so padding never leaks left
            batch = seqs[start : start + 64]
            width = max(len(p) + len(r) for p, r in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (p, r) in enumerate(batch):
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                mask[i, : len(p) + len(r)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            for i, (prompt, response) in enumerate(batch):
                logp = torch.log_softmax(logits[i, len(prompt) - 1 : len(prompt) + len(response) - 1], -1)
                top = logp.topk(kmax, -1)
                out["prompt_ids"].append(np.array(prompt))
                out["response_ids"].append(np.array(response))
                out["topk_ids"].append(top.indices.numpy())
                out["topk_logprobs"].append(top.values.numpy())
                out["token_logprob"].append(logp.gather(1, torch.tensor(response)[:, None])[:, 0].numpy())
    out["vocab_size"] = len(tok)
    return out


def zipf_remap(profiles: dict, vocab: int, rng: np.random.Generator, s: float = 1.0) -> dict:
    """Same log-prob profiles, ids redrawn from Zipf(s) over `vocab` (see the module doc)."""
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** s)
    cdf /= cdf[-1]
    kmax = profiles["topk_ids"][0].shape[1]
    out = {**profiles, "topk_ids": [], "response_ids": [], "vocab_size": vocab}
    for ids, response in zip(profiles["topk_ids"], profiles["response_ids"]):
        new_ids = np.empty_like(ids)
        new_resp = np.empty_like(response)
        for t in range(ids.shape[0]):
            chosen: list[int] = []
            seen: set[int] = set()
            while len(chosen) < kmax + 1:
                for v in np.searchsorted(cdf, rng.random(2 * kmax)):
                    if v not in seen:
                        seen.add(int(v))
                        chosen.append(int(v))
            new_ids[t] = chosen[:kmax]
            hit = np.flatnonzero(ids[t] == response[t])
            new_resp[t] = chosen[hit[0]] if hit.size else chosen[kmax]
        out["topk_ids"].append(new_ids)
        out["response_ids"].append(new_resp)
    return out


def rows_at_k(profiles: dict, k: int) -> list[dict]:
    rows = []
    for i, (prompt, response, ids, lps, tok_lp) in enumerate(zip(profiles["prompt_ids"], profiles["response_ids"],
                                                                   profiles["topk_ids"], profiles["topk_logprobs"],
                                                                   profiles["token_logprob"])):
        lp = lps[:, :k]
        rows.append({"sample_id": f"{i:032x}", "example_id": f"train-{i:07d}", "split": "train", "response_source": "reference",
                     "prompt_ids": prompt, "response_ids": response, "topk_ids": ids[:, :k], "topk_logprobs": lp,
                     "token_logprob": tok_lp, "tail_logmass": tail_logmass(lp).astype(np.float32)})
    return rows


# --- KD loss of a fixed student --------------------------------------------------------------

def student_logits(r: dict, vocab: int, seed: int, index: int) -> np.ndarray:
    """[T, V] float32 logits of the fixed student for exact label row `r` (see the module doc).

    Made per row from its own seed, so rows never all sit in memory (300 rows x 96 tokens x 152k ids would be 17 GB).
    """
    rng = np.random.default_rng([seed, index])
    t, k = r["topk_ids"].shape
    z = rng.standard_normal((t, vocab)).astype(np.float32)
    mask = np.zeros((t, vocab), dtype=bool)
    np.put_along_axis(mask, r["topk_ids"], True, axis=1)
    z_bg = np.where(mask, -np.inf, z)
    lse = np.log(np.exp(z_bg - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    tail = np.maximum(r["tail_logmass"], -30.0) + rng.normal(0, 0.5, t)
    z = z - (lse - tail)[:, None]
    np.put_along_axis(z, r["topk_ids"], r["topk_logprobs"] + rng.normal(0, 0.5, (t, k)).astype(np.float32), axis=1)
    return z


def kd_loss(records: list[dict], exact_rows: list[dict], vocab: int, seed: int = 0) -> float:
    """Mean per-token fkl (tail_bucket) of the fixed student against `records` (decoded or exact labels)."""
    import torch

    from tasks.objectives import SparseLabels, get_objective

    fkl = get_objective("fkl", support="tail_bucket")
    total, count = 0.0, 0
    for index, (r, exact) in enumerate(zip(records, exact_rows)):
        z = student_logits(exact, vocab, seed, index)
        labels = SparseLabels(ids=torch.as_tensor(r["topk_ids"])[None], logprobs=torch.as_tensor(r["topk_logprobs"])[None],
                              tail_logmass=torch.as_tensor(r["tail_logmass"])[None])
        mask = torch.ones(1, z.shape[0], dtype=torch.bool)
        total += float(fkl(torch.as_tensor(z)[None], labels, mask)) * z.shape[0]
        count += z.shape[0]
    return total / count


def measure_codecs(rows: list[dict], vocab: int, k: int, codecs: list[str], workdir: Path, kd_rows: int | None = None) -> dict:
    """Bytes and errors of each codec on `rows`; the KD loss on the first `kd_rows` rows (full-vocabulary passes are slow at 152k)."""
    kd_rows = len(rows) if kd_rows is None else min(kd_rows, len(rows))
    exact = kd_loss(rows[:kd_rows], rows[:kd_rows], vocab)
    tokens = sum(len(r["response_ids"]) for r in rows)
    result = {"tokens": tokens, "kd_loss_exact": exact, "kd_loss_rows": kd_rows}
    meta = {"k": k, "tokenizer_hash": "bench", "teacher_key": "bench"}
    for name in codecs:
        out = workdir / f"{name}-V{vocab}-k{k}"
        record = soft_labels.write_shard(out, 0, rows, {**meta, "codec": name})
        manifest = soft_labels.write_manifest(out, [record], {**meta, "codec": name})
        decoded = list(soft_labels.read(manifest))
        import pyarrow.parquet as pq

        md = pq.ParquetFile(out / record["path"]).metadata
        label_bytes = sum(md.row_group(g).column(c).total_compressed_size for g in range(md.num_row_groups)
                          for c in range(md.num_columns)
                          if md.row_group(g).column(c).path_in_schema.split(".")[0] in LABEL_COLUMNS)
        err = {f: 0.0 for f in ("topk_logprobs", "tail_logmass", "token_logprob")}
        for a, b in zip(rows, decoded):
            assert np.array_equal(np.asarray(a["topk_ids"]), b["topk_ids"]) and np.array_equal(a["response_ids"], b["response_ids"])
            for f in err:
                x, y = np.asarray(a[f], np.float64), np.asarray(b[f], np.float64)
                finite = np.isfinite(x)
                assert np.array_equal(finite, np.isfinite(y)), f
                err[f] = max(err[f], float(np.abs(x[finite] - y[finite]).max(initial=0.0)))
        # Bit-exact decoding (plain-f32) gives the exact loss: skip the costly full-vocabulary pass.
        loss = exact if not any(err.values()) else kd_loss(decoded[:kd_rows], rows[:kd_rows], vocab)
        result[name] = {
            "bytes_per_entry": round(label_bytes / (tokens * k), 4),
            "file_bytes_per_entry": round(record["bytes"] / (tokens * k), 4),
            "max_abs_err": {f: float(f"{v:.3g}") for f, v in err.items()},
            "kd_loss": loss,
            "kd_rel_err": float(f"{abs(loss - exact) / exact:.3g}"),
        }
    return result


# --- capture overhead ------------------------------------------------------------------------

def larger_teacher(root: Path, log=print) -> Path:
    """A ~60M-parameter Llama (8 layers x 512, untied 32k BPE vocabulary) for timing capture at a realistic size.

    Random weights: timing does not depend on what the weights say, only on
    the shapes and on how many tokens are generated (plain generation and
    capture use the same seeds, so the same tokens). Its labels are not used
    for codec numbers (near-uniform; see the code-32k rows for those).
    Built once under root/capture-lm-60m/ and reused.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.code_lm import train_tokenizer
    from tasks.models import save_pretrained_atomic

    out = Path(root) / "capture-lm-60m"
    if (out / "config.json").exists():
        return out
    tok = train_tokenizer(Path(root) / "capture-lm-tokenizer", 32_000, 20 << 20)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    log(f"capture-lm: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocab {len(tok)}")
    save_pretrained_atomic(model, tok, out)
    return out


def capture_overhead(assets: dict[str, str], num_prompts: int, repeats: int, k: int, workdir: Path,
                     keep_rows: bool = True) -> dict:
    """Plain vs capturing generation, side by side; with keep_rows, one more capture pass whose labels are returned
    as "_rows" (the codec table at real vLLM output)."""
    from vllm import SamplingParams

    from tasks.config import EngineConfig
    from tasks.data import load_rows
    from tasks.models import load_tokenizer
    from tasks.prompting import format_prompt
    from tasks.teacher.capture import generate_rows, request_seed
    from tasks.teacher.engine import build_engine

    tok = load_tokenizer(assets["teacher"])
    rows = load_rows(str(Path(assets["dataset"])), "train")[:num_prompts]
    prompts = [{"example_id": f"train-{i:07d}", "prompt_ids": tok(format_prompt(r["prompt"]), add_special_tokens=True)["input_ids"]}
               for i, r in enumerate(rows)]
    t0 = time.perf_counter()
    llm = build_engine(assets["teacher"], EngineConfig(), max_logprobs=k)
    start_s = time.perf_counter() - t0
    sampling = dict(temperature=1.0, top_p=1.0, max_new_tokens=32, n=1, seed=0)

    def plain():
        params = [SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=32, detokenize=False,
                                 seed=request_seed(0, p["example_id"])) for p in prompts]
        outs = llm.generate([{"prompt_token_ids": p["prompt_ids"]} for p in prompts], params, use_tqdm=False)  # noqa: F821 (called before the del below)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def with_capture(index):
        rows = generate_rows(llm, prompts, split="train", k=k, teacher_key="bench", **sampling)  # noqa: F821 (called before the del below)
        soft_labels.write_shard(workdir / "capture", index, rows, {"k": k, "tokenizer_hash": "bench", "teacher_key": "bench"})
        return sum(len(r["response_ids"]) for r in rows)

    plain(), with_capture(0)  # warm-up
    times = {"plain": [], "capture": []}
    tokens = {}
    for rep in range(repeats):
        for name, fn in (("plain", plain), ("capture", lambda rep=rep: with_capture(rep + 1))):
            t = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t)
    rate = {name: tokens[name] / statistics.median(ts) for name, ts in times.items()}
    # The capture's own labels, for the codec table at the real vLLM output.
    real = generate_rows(llm, prompts, split="train", k=k, teacher_key="bench", **sampling) if keep_rows else None
    del llm  # the engine's processes exit with it, before another engine starts
    import gc

    gc.collect()
    return {
        "engine_start_s": round(start_s, 1),
        "prompts": len(prompts),
        "tokens": tokens,
        "plain_tokens_per_s": round(rate["plain"], 1),
        "capture_tokens_per_s": round(rate["capture"], 1),
        "overhead_ratio": round(rate["plain"] / rate["capture"], 3),
        "repeats": repeats,
        "_rows": real,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--demo-dir", default=os.environ.get("STILLHOUSE_DATA_DIR", "stillhouse-data"))
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="demo teacher's training steps (default: the pipeline's data.demo_teacher_steps, so the "
                             "demo's own assets are reused, never rebuilt with another recipe)")
    parser.add_argument("--skip-capture", action="store_true", help="codec measurements only (no vLLM)")
    parser.add_argument("--code-lm", action="store_true",
                        help="also measure labels of small code LMs with 32k and 152k BPE vocabularies (built once under "
                             "<demo-dir>/bench, slow the first time)")
    parser.add_argument("--code-lm-vocabs", type=int, nargs="+", default=[32_000, 152_064])
    parser.add_argument("--larger", action="store_true",
                        help="also time capture on a ~60M-parameter model with a 32k vocabulary (random weights; built once "
                             "under <demo-dir>/bench)")
    parser.add_argument("--only-code-lm", action="store_true",
                        help="codec on the code LMs' labels only (no demo assets, no Zipf remaps, no capture)")
    args = parser.parse_args()
    from tasks.config import DataConfig
    from tasks.demo.assets import ensure_demo_assets

    default_steps = DataConfig().demo_teacher_steps
    if args.teacher_steps is None:
        args.teacher_steps = default_steps
    # Another recipe gets its own folder: the demo's assets (and the registry's lineage) stay as they are.
    demo_root = Path(args.demo_dir) if args.teacher_steps == default_steps else Path(args.demo_dir) / "bench" / f"demo-teacher-{args.teacher_steps}"

    num_seqs = 500 if args.quick else 3000
    rng = np.random.default_rng(0)
    report: dict = {"codecs": list(CODECS), "num_seqs": num_seqs}
    t0 = time.perf_counter()
    vocabs = {}
    if args.only_code_lm:
        args.code_lm, args.skip_capture = True, True
    else:
        assets = ensure_demo_assets(demo_root, teacher_steps=args.teacher_steps)
        profiles = demo_profiles(assets, num_seqs, kmax=64)
        vocabs = {"demo": profiles, "zipf-32k": zipf_remap(profiles, 32_000, rng), "zipf-152k": zipf_remap(profiles, 152_064, rng)}
    if args.code_lm:
        from bench import code_lm

        for vocab in args.code_lm_vocabs:
            built = code_lm.build(Path(args.demo_dir) / "bench", vocab, corpus_mb=40 if vocab < 100_000 else 80,
                                  steps=300 if vocab < 100_000 else 200)
            vocabs[f"code-{vocab // 1000}k"] = code_lm.profiles(built, 300, 64)
            report.setdefault("code_lm", {})[f"code-{vocab // 1000}k"] = vocabs[f"code-{vocab // 1000}k"]["model"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report["codec"] = {}
        for vname, prof in vocabs.items():
            for k in (20, 64):
                report["codec"][f"{vname}/k{k}"] = measure_codecs(rows_at_k(prof, k), prof["vocab_size"], k, list(CODECS), work,
                                                                  kd_rows=60 if prof["vocab_size"] > 100_000 else None)
                print(json.dumps({f"{vname}/k{k}": {c: report["codec"][f"{vname}/k{k}"][c]["bytes_per_entry"] for c in CODECS}}), flush=True)
        report["codec_seconds"] = round(time.perf_counter() - t0, 1)
        if not args.skip_capture:
            cap = capture_overhead(assets, 256 if args.quick else 1024, 3 if args.quick else 5, 20, work)
            real = cap.pop("_rows")
            report["capture"] = cap
            report["codec"]["vllm-capture-demo/k20"] = measure_codecs(real, profiles["vocab_size"], 20, list(CODECS), work)
            if args.larger:
                model = larger_teacher(Path(args.demo_dir) / "bench")
                cap = capture_overhead({"teacher": str(model), "dataset": assets["dataset"]}, 256 if args.quick else 1024,
                                       3 if args.quick else 5, 20, work, keep_rows=False)
                cap.pop("_rows")
                cap["model"] = "llama 8x512, vocab 32000, ~60M parameters, random weights"
                report["capture_larger"] = cap
    print(json.dumps(report))


if __name__ == "__main__":
    main()
