"""Declarative promotion rules: may this student replace the champion?

Rules are data (YAML / Prefect form), validated up front so that a misspelt
metric or knob fails before hours of teacher labelling and training, not at
the very end. Evaluation never raises on odd metrics: a rule that lacks an
input or sees NaN fails with a reason saying so, because a gate that silently
passes is worse than no gate.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RuleKind = Literal["absolute", "relative_to_teacher", "relative_to_champion", "no_regression"]
CHAMPION_KINDS = ("relative_to_champion", "no_regression")


class GateRule(BaseModel):
    """One comparison of a student metric against a fixed value, the teacher or the champion."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="Label in reports; default derived, e.g. 'exact_match>=0.5'.")
    metric: str = Field(..., min_length=1, description="Metric name, e.g. exact_match, rouge_l, kl_to_teacher.")
    kind: RuleKind
    higher_is_better: bool | None = Field(
        None, description="Default: from the metric (False for kl_to_teacher, reverse_kl_to_teacher, perplexity)."
    )
    threshold: float | None = Field(
        None,
        allow_inf_nan=False,
        description="absolute: the bound itself; relative_to_teacher: a ratio of the teacher's value (0.9 = 90%).",
    )
    margin: float = Field(0.0, allow_inf_nan=False, description="relative_to_champion: required improvement over the champion.")
    tolerance: float = Field(0.0, ge=0, allow_inf_nan=False, description="no_regression: allowed drop below the champion.")
    use_interval: bool = Field(
        False,
        description="Champion rules: compare the student's confidence bound (ci_low, or ci_high if lower is better) "
        "instead of its point value, when the metrics carry intervals.",
    )

    @model_validator(mode="after")
    def _check_knobs(self) -> "GateRule":
        # A knob the kind ignores is almost always a mistake in the config; say so now.
        label = self.name or f"{self.metric} ({self.kind})"
        if self.higher_is_better is None:
            from tasks.evaluate.metrics import LOWER_IS_BETTER

            self.higher_is_better = self.metric not in LOWER_IS_BETTER
        if self.kind in ("absolute", "relative_to_teacher") and self.threshold is None:
            raise ValueError(f"gate rule {label!r}: kind {self.kind!r} needs 'threshold'")
        if self.kind in CHAMPION_KINDS and self.threshold is not None:
            raise ValueError(f"gate rule {label!r}: 'threshold' is not used by kind {self.kind!r} (use 'margin' or 'tolerance')")
        if self.margin != 0 and self.kind != "relative_to_champion":
            raise ValueError(f"gate rule {label!r}: 'margin' only applies to kind 'relative_to_champion'")
        if self.tolerance != 0 and self.kind != "no_regression":
            raise ValueError(f"gate rule {label!r}: 'tolerance' only applies to kind 'no_regression'")
        if self.use_interval and self.kind not in CHAMPION_KINDS:
            raise ValueError(f"gate rule {label!r}: 'use_interval' only applies to kinds {', '.join(CHAMPION_KINDS)}")
        if self.name is None:
            self.name = self._derived_name()
        return self

    def _derived_name(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        if self.kind == "absolute":
            text = f"{self.metric}{op}{self.threshold:g}"
        elif self.kind == "relative_to_teacher":
            text = f"{self.metric}{op}{self.threshold:g}*teacher"
        elif self.kind == "relative_to_champion":
            text = f"{self.metric}{op}champion{'+' if self.higher_is_better else '-'}{self.margin:g}"
        else:
            text = f"{self.metric}{op}champion{'-' if self.higher_is_better else '+'}{self.tolerance:g}"
        return text + ("[ci]" if self.use_interval else "")


class GateConfig(BaseModel):
    """The rule set; require_all=False promotes when any one rule passes."""

    model_config = ConfigDict(extra="forbid")

    rules: list[GateRule] = Field(..., min_length=1, description="At least one rule: an empty gate would promote anything.")
    require_all: bool = True

    def validate_metrics(self, known_metrics: set[str]) -> None:
        """Reject rules on metrics the evaluator never produces (they could only ever fail)."""
        bad = [rule for rule in self.rules if rule.metric not in known_metrics]
        if bad:
            listed = "; ".join(f"gate rule {r.name!r} uses unknown metric {r.metric!r}" for r in bad)
            raise ValueError(f"{listed}; known metrics: {', '.join(sorted(known_metrics)) or '(none)'}")


class RuleResult(BaseModel):
    name: str
    metric: str
    kind: str
    value: float | None = Field(description="The student number actually compared (a CI bound with use_interval).")
    threshold: float | None = Field(description="The effective bound compared against, e.g. 0.9 x teacher value.")
    passed: bool
    reason: str


class GateDecision(BaseModel):
    promoted: bool
    rules: list[RuleResult]
    summary: str


@dataclass(frozen=True)
class _Reading:
    value: float
    ci_low: float | None = None
    ci_high: float | None = None


def _number(x: Any) -> float | None:
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    return None


def _read(metrics: Mapping[str, Any], name: str, whose: str) -> _Reading | str:
    """A metric as a float or {"value", "ci_low", "ci_high", "n"}; a str says what is wrong."""
    if name not in metrics:
        return f"{whose} metrics have no {name!r}"
    raw = metrics[name]
    if isinstance(raw, Mapping):
        value = _number(raw.get("value"))
        if value is None:
            return f"{whose} metric {name!r} has no numeric 'value' (got {raw.get('value')!r})"
        return _Reading(value, _number(raw.get("ci_low")), _number(raw.get("ci_high")))
    value = _number(raw)
    if value is None:
        return f"{whose} metric {name!r} is not a number (got {raw!r})"
    return _Reading(value)


def _fail(rule: GateRule, reason: str, value: float | None = None, threshold: float | None = None) -> RuleResult:
    return RuleResult(name=rule.name, metric=rule.metric, kind=rule.kind, value=value, threshold=threshold, passed=False, reason=reason)


def evaluate_rule(rule: GateRule, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, champion: Mapping[str, Any] | None) -> RuleResult:
    """Evaluate one rule; missing inputs and NaN fail, except champion rules before any champion exists."""
    got = _read(student, rule.metric, "student")
    if isinstance(got, str):
        return _fail(rule, got)
    hib = rule.higher_is_better
    value, label = got.value, "value"
    if math.isnan(value):
        return _fail(rule, "student value is NaN", value)

    if rule.kind == "absolute":
        bound, basis = rule.threshold, "absolute threshold"
    elif rule.kind == "relative_to_teacher":
        if teacher is None:
            return _fail(rule, "no teacher metrics supplied", value)
        ref = _read(teacher, rule.metric, "teacher")
        if isinstance(ref, str):
            return _fail(rule, ref, value)
        bound, basis = rule.threshold * ref.value, f"{rule.threshold:g} x teacher {ref.value:.4g}"
    else:
        if champion is None:
            return RuleResult(name=rule.name, metric=rule.metric, kind=rule.kind, value=value, threshold=None, passed=True, reason="no champion yet")
        ref = _read(champion, rule.metric, "champion")
        if isinstance(ref, str):
            return _fail(rule, ref, value)
        if rule.kind == "relative_to_champion":
            bound = ref.value + rule.margin if hib else ref.value - rule.margin
            basis = f"champion {ref.value:.4g} {'+' if hib else '-'} margin {rule.margin:g}"
        else:
            bound = ref.value - rule.tolerance if hib else ref.value + rule.tolerance
            basis = f"champion {ref.value:.4g} {'-' if hib else '+'} tolerance {rule.tolerance:g}"
        if rule.use_interval:
            bound_value = got.ci_low if hib else got.ci_high
            if bound_value is None:
                basis += "; no student interval, point value used"
            else:
                value, label = bound_value, "ci_low" if hib else "ci_high"

    if math.isnan(value):
        return _fail(rule, f"student {label} is NaN", value, bound)
    if math.isnan(bound):
        return _fail(rule, f"threshold is NaN ({basis})", value, bound)
    passed = value >= bound if hib else value <= bound
    op = (">=" if passed else "<") if hib else ("<=" if passed else ">")
    return RuleResult(
        name=rule.name, metric=rule.metric, kind=rule.kind, value=value, threshold=bound, passed=passed,
        reason=f"{label} {value:.4g} {op} {bound:.4g} ({basis})",
    )


def evaluate_gate(config: GateConfig, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, champion: Mapping[str, Any] | None) -> GateDecision:
    """Apply every rule (no short-circuit, so the report shows all failures) and decide."""
    results = [evaluate_rule(rule, student, teacher, champion) for rule in config.rules]
    failed = [r for r in results if not r.passed]
    n = len(results)
    if config.require_all:
        promoted = not failed
        if promoted:
            summary = f"promoted: all {n} rule(s) passed"
        else:
            summary = f"not promoted: {len(failed)} of {n} rule(s) failed: " + "; ".join(f"{r.name}: {r.reason}" for r in failed)
    else:
        passed = [r for r in results if r.passed]
        promoted = bool(passed)
        if promoted:
            summary = f"promoted: {len(passed)} of {n} rule(s) passed (any one suffices): " + ", ".join(r.name for r in passed)
        else:
            summary = f"not promoted: none of {n} rule(s) passed: " + "; ".join(f"{r.name}: {r.reason}" for r in failed)
    return GateDecision(promoted=promoted, rules=results, summary=summary)
