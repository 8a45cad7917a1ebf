"""One normalisation of prompt text, used wherever "the same prompt" is decided.

Two prompts are the same if they are equal after lower-casing, replacing
punctuation with spaces and collapsing whitespace ("What is 3 plus 5?" ==
"what is 3  plus 5"). The demo generators use it to keep evaluation prompts out
of training, and the data stage uses it to count evaluation prompts that were
seen in training for any dataset. This module imports nothing from the project,
so any layer can use it.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}\u2018\u2019\u201c\u201d\u2013\u2014\u2026]")
_SPACE = re.compile(r"\s+")


def normalise_prompt(text: str) -> str:
    """Lower-case, punctuation replaced by spaces, whitespace collapsed and stripped (Unicode NFKC first)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


@dataclass(frozen=True)
class DuplicateCounts:
    """Duplicates inside one split, by normalised text."""

    rows: int
    distinct: int
    duplicate_rows: int  # rows whose normalised prompt appeared earlier in the split (rows - distinct)
    max_repeats: int     # how often the most frequent prompt occurs

    def to_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "distinct": self.distinct, "duplicate_rows": self.duplicate_rows, "max_repeats": self.max_repeats}


def duplicate_counts(prompts: Iterable[str]) -> DuplicateCounts:
    counts = Counter(normalise_prompt(p) for p in prompts)
    rows = sum(counts.values())
    return DuplicateCounts(rows=rows, distinct=len(counts), duplicate_rows=rows - len(counts),
                           max_repeats=max(counts.values(), default=0))


def seen_in(eval_prompts: Iterable[str], train_prompts: Iterable[str]) -> int:
    """How many evaluation rows have a normalised prompt that also occurs among the training prompts."""
    seen = {normalise_prompt(p) for p in train_prompts}
    return sum(normalise_prompt(p) in seen for p in eval_prompts)


def split_report(splits: dict[str, Iterable[str]], train_split: str = "train") -> dict[str, dict[str, int]]:
    """Per split: duplicate counts, and for every other split the rows seen in training (`seen_in_train`)."""
    texts = {name: list(prompts) for name, prompts in splits.items()}
    train = texts.get(train_split, [])
    report = {}
    for name, prompts in texts.items():
        entry = duplicate_counts(prompts).to_dict()
        if name != train_split:
            entry["seen_in_train"] = seen_in(prompts, train)
        report[name] = entry
    return report
