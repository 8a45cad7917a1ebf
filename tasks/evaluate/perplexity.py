"""Perplexity of the references under a model: teacher forcing with Hugging Face transformers."""

from __future__ import annotations

from typing import Any

import torch


def reference_ids(tokenizer, prompt_ids: list[int], reference: str) -> list[int]:
    """The reference as the continuation of the prompt, ending with EOS (so stopping is scored too).

    A space separates it from a prompt that does not already end in whitespace (the demo's
    "...\\nAnswer:" is followed by " 8"); chat templates end with a newline, so nothing is added."""
    tail = tokenizer.decode(prompt_ids[-1:]) if prompt_ids else ""
    sep = "" if not tail or tail[-1].isspace() else " "
    ids = tokenizer(sep + reference, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


@torch.no_grad()
def reference_nll(model_dir: str, prompts: list[dict[str, Any]], batch_size: int = 16) -> list[dict[str, Any]]:
    """Per example with references: summed negative log-likelihood (nats) of its first reference given
    the prompt, and the number of reference tokens scored. Perplexity = exp(sum nll / sum tokens)."""
    from tasks.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(model_dir).eval().to(device)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
    items = []
    for p in prompts:
        if not len(p["references"]):
            continue
        prompt = list(p["prompt_ids"])
        ref = reference_ids(tokenizer, prompt, p["references"][0])
        ids = (prompt + ref)[:context] if context else prompt + ref
        items.append((p["example_id"], ids, len(prompt)))
    rows = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        width = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)  # positions whose token is a reference token
        for i, (_, ids, n_prompt) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            scored[i, n_prompt : len(ids)] = True
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, :-1].float()
        targets = input_ids[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        mask = scored[:, 1:].to(device)
        for i, (example_id, _, _) in enumerate(chunk):
            rows.append({"example_id": example_id, "nll": float(nll[i][mask[i]].sum()), "tokens": int(mask[i].sum())})
    return rows
