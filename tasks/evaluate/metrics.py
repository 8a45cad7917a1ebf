"""Per-example scores and their aggregation with bootstrap confidence intervals."""

from __future__ import annotations

import re

import numpy as np

# Metrics the gate may name; higher is better unless listed in LOWER_IS_BETTER.
# rouge_l_sampled exists only when eval.sample_seeds > 0.
METRIC_NAMES = ("exact_match", "rouge_l", "rouge_l_sampled", "kl_to_teacher", "reverse_kl_to_teacher", "top1_agreement", "perplexity")
LOWER_IS_BETTER = ("kl_to_teacher", "reverse_kl_to_teacher", "perplexity")
LM_EVAL_PREFIX = "lm_eval:"  # lm-eval-harness headline metrics are named lm_eval:<task>


def lm_eval_metric_name(task: str) -> str:
    return f"{LM_EVAL_PREFIX}{task}"


def known_metric_names(lm_eval_tasks=()) -> set[str]:
    """Every name a gate rule may use for this evaluation config (fixed metrics plus lm_eval:<task> per named task)."""
    return set(METRIC_NAMES) | {lm_eval_metric_name(t) for t in lm_eval_tasks}

_rouge = None


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def exact_match(prediction: str, references: list[str]) -> float:
    """1 if the prediction equals any acceptable reference after whitespace/case normalisation."""
    pred = normalize(prediction)
    return float(any(pred == normalize(ref) for ref in references))


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F1 against the closest reference (Google's rouge-score implementation)."""
    global _rouge
    if _rouge is None:
        from rouge_score import rouge_scorer

        _rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    if not references:
        return float("nan")
    return max(_rouge.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def summarize(values, *, seed: int = 0, resamples: int = 1000, confidence: float = 0.95) -> dict[str, float]:
    """Mean with a percentile bootstrap interval over examples."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return {"value": float(x.mean()), "ci_low": float(np.percentile(means, tail)), "ci_high": float(np.percentile(means, 100 - tail)), "n": int(x.size)}


def summarize_ratio(numerators, denominators, *, transform=None, seed: int = 0, resamples: int = 1000,
                    confidence: float = 0.95) -> dict[str, float]:
    """sum(num) / sum(den) with a percentile bootstrap over examples, optionally mapped by a monotone
    increasing transform (perplexity = exp(total NLL / total tokens)); n counts examples."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    keep = ~(np.isnan(num) | np.isnan(den)) & (den > 0)
    num, den = num[keep], den[keep]
    f = transform or (lambda v: v)
    if num.size == 0:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num.size, size=(resamples, num.size))
    ratios = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    tail = (1 - confidence) / 2 * 100
    return {"value": float(f(num.sum() / den.sum())), "ci_low": float(f(np.percentile(ratios, tail))),
            "ci_high": float(f(np.percentile(ratios, 100 - tail))), "n": int(num.size)}
