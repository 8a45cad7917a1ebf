"""Distribution metrics of a student against the teacher's held-out soft labels."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def distribution_scores(student_dir: str, labels_manifest: str, batch_size: int = 32, packing: bool = True,
                        packing_max_tokens: int | None = None) -> list[dict[str, Any]]:
    """Per example: mean forward KL(teacher‖student) and reverse KL on the top-k + tail support,
    and the fraction of positions where the student's argmax is the teacher's top-1.

    ``packing``: several examples per row (tasks/train/packing.py) when the student's attention keeps packed
    sequences apart (probed), else one padded row each; the scores are the same either way. Rows hold at most
    ``packing_max_tokens`` (None: the chunk's longest sequence, so no row is longer than a padded one)."""
    from storage import soft_labels
    from tasks.models import load_causal_lm, load_tokenizer, tokenizer_hash
    from tasks.objectives import SparseLabels, get_objective
    from tasks.objectives.weighting import example_index
    from tasks.train.batches import make_collate, model_inputs
    from tasks.train.packing import keeps_packed_sequences_apart

    tokenizer = load_tokenizer(student_dir)
    model = load_causal_lm(student_dir).eval()
    collate = make_collate(packing and keeps_packed_sequences_apart(model), packing_max_tokens)
    fkl = get_objective("fkl", support="tail_bucket")
    rkl = get_objective("rkl", support="tail_bucket")
    records = list(soft_labels.read(labels_manifest, expected_tokenizer_hash=tokenizer_hash(tokenizer), vocab_size=len(tokenizer)))
    k = int(records[0]["topk_ids"].shape[1]) if records else 1
    scores = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        batch = collate(chunk, tokenizer.pad_token_id, k)
        logits = model(**model_inputs(batch)).logits[:, :-1].float()
        labels = SparseLabels(ids=batch["ids"], logprobs=batch["logprobs"], tail_logmass=batch["tail_logmass"], target_ids=batch["target_ids"])
        agree = (logits.argmax(-1) == batch["ids"][..., 0]) & batch["mask"]
        example = example_index(batch["mask"], batch.get("segments"))[0]  # its row when padded, its segment when packed
        for i, rec in enumerate(chunk):
            row_mask = batch["mask"] & (example == i)
            n = int(row_mask.sum())
            scores.append({"example_id": rec["example_id"], "tokens": n,
                           "kl_to_teacher": float(fkl(logits, labels, row_mask)),
                           "reverse_kl_to_teacher": float(rkl(logits, labels, row_mask)),
                           "top1_agreement": float(agree[row_mask].sum()) / max(n, 1)})
    return scores
