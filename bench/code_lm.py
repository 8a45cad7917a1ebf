"""Label distributions at realistic vocabulary sizes, from a model trained here (no model hub).

A byte-level BPE tokenizer with a 32k or 152k vocabulary is trained on the
Python sources installed in this virtualenv (hundreds of MB of real code), and
a small Llama (2 layers x 256, head_dim 64, tied embeddings) is trained on the
same text for a few hundred steps. Teacher forcing on held-out files then
gives exact top-k labels (full-vocabulary log-softmax in float32): ids with
the frequency structure, context dependence and cross-position overlap of a
real tokenizer and a trained model, which a synthetic id model lacks.

Built once under <root>/code-lm-<vocab>/ and reused (bench/capture.py --code-lm).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

SPECIAL = ["<s>", "</s>", "<pad>"]


def corpus_files(held_out: bool, limit_bytes: int) -> list[Path]:
    """Deterministic sample of the venv's .py files: a path hash picks train (90%) or held-out (10%)."""
    site = Path(np.__file__).resolve().parents[1]
    files = sorted(p for p in site.rglob("*.py") if p.is_file())
    picked, total = [], 0
    for path in sorted(files, key=lambda p: hashlib.sha256(str(p.relative_to(site)).encode()).hexdigest()):
        bucket = int(hashlib.sha256(str(path.relative_to(site)).encode()).hexdigest()[:4], 16) % 10
        if (bucket == 0) != held_out:
            continue
        size = path.stat().st_size
        if size < 2000 or size > 200_000:
            continue
        picked.append(path)
        total += size
        if total >= limit_bytes:
            break
    return picked


def _texts(files: list[Path]):
    for path in files:
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def train_tokenizer(out: Path, vocab_size: int, corpus_bytes: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_texts(corpus_files(False, corpus_bytes)), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    return fast


def token_stream(tok, files: list[Path], limit_tokens: int) -> np.ndarray:
    ids: list[int] = []
    for text in _texts(files):
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= limit_tokens:
            break
    return np.asarray(ids[:limit_tokens], dtype=np.int64)


def build(root: Path, vocab_size: int, *, corpus_mb: int = 60, steps: int = 300, batch: int = 8, seq: int = 128,
          log=print) -> Path:
    """Tokenizer + briefly trained model under root/code-lm-<vocab>; reused when complete."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.models import save_pretrained_atomic

    out = Path(root) / f"code-lm-{vocab_size}"
    if (out / "done.json").exists():
        return out
    t0 = time.perf_counter()
    tok = train_tokenizer(out / "tokenizer", vocab_size, corpus_mb << 20)
    log(f"code-lm: tokenizer with {len(tok)} ids in {time.perf_counter() - t0:.0f}s")
    stream = token_stream(tok, corpus_files(False, corpus_mb << 20), limit_tokens=steps * batch * seq * 2)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=seq, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.98))
    rng = np.random.default_rng(0)
    losses = []
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, len(stream) - seq - 1, batch)
        ids = torch.as_tensor(np.stack([stream[s : s + seq] for s in starts]))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
        if step % 50 == 0 or step == steps - 1:
            log(f"code-lm V={len(tok)}: step {step + 1}/{steps} loss {np.mean(losses[-50:]):.3f}")
    save_pretrained_atomic(model, tok, out / "model")
    (out / "done.json").write_text(json.dumps({"vocab_size": len(tok), "steps": steps, "batch": batch, "seq": seq,
                                               "final_loss": float(np.mean(losses[-50:])), "seconds": round(time.perf_counter() - t0, 1)}))
    return out


def profiles(built: Path, num_seqs: int, kmax: int, prompt_len: int = 32, response_len: int = 96) -> dict:
    """Exact top-kmax labels on held-out files: each sequence is a window, the last response_len tokens labelled."""
    import torch

    from tasks.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(built / "model"))
    model = load_causal_lm(str(built / "model")).eval()
    width = prompt_len + response_len
    stream = token_stream(tok, corpus_files(True, 40 << 20), limit_tokens=num_seqs * width)
    windows = stream[: (len(stream) // width) * width].reshape(-1, width)[:num_seqs]
    out = {"prompt_ids": [], "response_ids": [], "topk_ids": [], "topk_logprobs": [], "token_logprob": []}
    with torch.no_grad():
        for start in range(0, len(windows), 8):
            ids = torch.as_tensor(windows[start : start + 8])
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[:, prompt_len - 1 : width - 1]
            top = logp.topk(kmax, -1)
            target = ids[:, prompt_len:]
            realised = logp.gather(-1, target[..., None])[..., 0]
            for i in range(ids.shape[0]):
                out["prompt_ids"].append(ids[i, :prompt_len].numpy())
                out["response_ids"].append(target[i].numpy())
                out["topk_ids"].append(top.indices[i].numpy())
                out["topk_logprobs"].append(top.values[i].numpy())
                out["token_logprob"].append(realised[i].numpy())
    out["vocab_size"] = len(tok)
    out["model"] = json.loads((built / "done.json").read_text())
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "stillhouse-data/bench")
    for v in (32_000, 152_064):
        print(build(root, v))
