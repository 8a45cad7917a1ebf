"""Checks on prepared prompts that need no model: duplicates, split leakage, the held-out split, top-k.

Prompts are compared by a 64-bit hash of their normalised text
(`tasks.textnorm.normalise_prompt`), kept as numpy arrays, so a million prompts
cost 8 MB per split rather than a set of strings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from tasks.data.schema import DataError
from tasks.textnorm import normalise_prompt

_TOP = float(2**64)


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(normalise_prompt(text).encode(), digest_size=8).digest(), "little")


def id_hash(example_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(example_id.encode(), digest_size=8).digest(), "little")


def held_out(prompt_hash: int, eval_fraction: float) -> bool:
    """data.eval_fraction: a prompt is held out when its hash falls in the lowest fraction, so the same normalised
    prompt always lands on the same side (disjoint splits) and the choice does not depend on row order."""
    return prompt_hash < eval_fraction * _TOP


@dataclass
class SplitHashes:
    """Prompt and id hashes of one split, gathered batch by batch."""

    prompts: list[np.ndarray] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)

    def add(self, prompt_hashes, id_hashes) -> None:
        self.prompts.append(np.asarray(prompt_hashes, dtype=np.uint64))
        self.ids.append(np.asarray(id_hashes, dtype=np.uint64))

    def prompt_array(self) -> np.ndarray:
        return np.concatenate(self.prompts) if self.prompts else np.zeros(0, np.uint64)

    def id_array(self) -> np.ndarray:
        return np.concatenate(self.ids) if self.ids else np.zeros(0, np.uint64)


def duplicates(hashes: np.ndarray) -> int:
    """Rows whose normalised prompt already occurred earlier in the same split."""
    return int(len(hashes) - len(np.unique(hashes)))


def overlap_counts(train: SplitHashes, evaluation: SplitHashes) -> dict[str, int]:
    """Evaluation rows whose prompt occurs among the training prompts, and whose example id is a training id."""
    return {
        "eval_seen_in_train": int(np.isin(evaluation.prompt_array(), train.prompt_array()).sum()),
        "eval_ids_in_train": int(np.isin(evaluation.id_array(), train.id_array()).sum()),
    }


def refuse_leakage(counts: dict[str, int], eval_rows: int, train_split: str, eval_split: str) -> None:
    seen, ids = counts["eval_seen_in_train"], counts["eval_ids_in_train"]
    if seen:
        raise DataError(
            f"{seen} of {eval_rows} evaluation prompts ({eval_split!r}) also appear among the training prompts ({train_split!r}; same text after "
            "normalising case, punctuation and spaces), so evaluation would measure memorisation; remove them from one split, "
            "use data.eval_fraction to split one source disjointly, or set data.allow_eval_overlap true to keep them (they are "
            "then counted in the manifest's checks)"
        )
    if ids:
        raise DataError(
            f"{ids} of {eval_rows} evaluation rows ({eval_split!r}) have an 'id' that is also a training id ({train_split!r}); give the splits distinct "
            "ids (or drop the id column), or set data.allow_eval_overlap true if the ids are per-split counters"
        )


def model_vocab_size(config: dict, tokenizer_len: int) -> int:
    """The width of the model's output layer (config.json vocab_size; may exceed the tokenizer's length)."""
    return int(config.get("vocab_size") or tokenizer_len)


def check_top_k(top_k: int | None, vocab: int, teacher_dir: str) -> None:
    if top_k is not None and top_k > vocab:
        raise DataError(f"teacher.top_k={top_k} is larger than the teacher's vocabulary ({vocab} tokens, {teacher_dir}); "
                        f"set teacher.top_k to at most {vocab}")
