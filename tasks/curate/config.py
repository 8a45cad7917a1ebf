"""Curation settings: one typed model, validated before any row is read.

Kept free of `tasks.config` imports so `tasks/config.py` can compose it into
`PipelineConfig` without an import cycle.
"""

from __future__ import annotations

import string

from pydantic import BaseModel, ConfigDict, Field, model_validator

FILTER_ORDER = ("exact_dedup", "near_dedup", "length", "repetition", "decontaminate", "self_score", "judge")


class CurateConfig(BaseModel):
    """Filters over a prompts table, applied in the order of FILTER_ORDER, each to the survivors of the one before."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    exact_dedup: bool = Field(True, description="Drop rows whose normalised prompt (NFKC, casefolded, whitespace collapsed) repeats an earlier row's.")
    near_dedup: bool = Field(True, description="Drop rows whose word-shingle Jaccard similarity with an earlier kept row is >= near_dedup_threshold.")
    near_dedup_threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of word shingles at or above which a row is a near-duplicate.")
    near_dedup_shingle: int = Field(3, ge=1, description="Words per shingle for near-duplicate detection.")
    near_dedup_num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (candidate search only; the decision uses exact Jaccard).")
    min_chars: int | None = Field(None, ge=0, description="Drop prompts shorter than this many characters.")
    max_chars: int | None = Field(None, ge=1, description="Drop prompts longer than this many characters.")
    min_tokens: int | None = Field(None, ge=0, description="Drop prompts with fewer tokens (column prompt_ids) than this.")
    max_tokens: int | None = Field(None, ge=1, description="Drop prompts with more tokens (column prompt_ids) than this.")
    max_repeated_ngram_share: float | None = Field(0.5, gt=0, le=1, description="Drop prompts whose share of repeated word n-grams (1 - distinct/total) exceeds this; None: off.")
    repetition_ngram: int = Field(3, ge=1, description="n of the repetition filter's word n-grams.")
    decontaminate: bool = Field(True, description="Drop prompts overlapping the held-out prompts (needs the held-out prompts).")
    decontaminate_ngram: int = Field(8, ge=1, description="n of the decontamination word n-grams; a text shorter than n words is one n-gram of all its words.")
    decontaminate_threshold: float = Field(0.5, gt=0, le=1, description="Drop a prompt when at least this share of its word n-grams occurs in a held-out prompt.")
    self_score_drop_fraction: float | None = Field(None, ge=0, lt=1, description="Drop this fraction of rows with the lowest teacher self-score (mean token log-likelihood); None: off.")
    self_score_min: float | None = Field(None, description="Drop rows whose teacher self-score (mean token log-prob, nats) is below this; None: off.")

    judge_template: str | None = Field(
        None, description="Ask the teacher about each prompt: this text with {prompt} where the prompt goes, ending where "
        "the answer word comes (e.g. 'Is this a clear, answerable instruction? Answer yes or no.\\n\\n{prompt}\\n\\nAnswer:'). "
        "A prompt is kept when p(judge_yes) / (p(judge_yes) + p(judge_no)) at the next token is >= judge_min. "
        "Write any chat markup your teacher needs into the text. None: off.")
    judge_yes: str = Field(" yes", min_length=1, description="The answer that keeps a prompt (its first token is read).")
    judge_no: str = Field(" no", min_length=1, description="The answer that drops a prompt (its first token is read).")
    judge_min: float = Field(0.5, ge=0, le=1, description="Keep prompts whose judged probability of judge_yes (against judge_no) is at least this.")

    @model_validator(mode="after")
    def _judge_template(self) -> "CurateConfig":
        if self.judge_template is not None:
            try:
                fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(self.judge_template)
                          if name is not None]
            except ValueError as exc:
                raise ValueError(f"curate.judge_template: {exc} (write a literal brace as {{{{ or }}}})") from None
            if any(name != "prompt" or spec or conv for name, spec, conv in fields):
                raise ValueError("curate.judge_template: only a plain {prompt} may appear in braces (no attributes, "
                                 "indices, formats or other names; write a literal brace as {{ or }})")
            if not fields:
                raise ValueError("curate.judge_template must contain {prompt}, where each prompt goes")
        return self

    @model_validator(mode="after")
    def _ranges(self) -> "CurateConfig":
        for lo, hi in (("min_chars", "max_chars"), ("min_tokens", "max_tokens")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{lo}={a} is greater than {hi}={b}; no prompt could pass")
        return self

    @property
    def uses_self_score(self) -> bool:
        return self.self_score_drop_fraction is not None or self.self_score_min is not None
