"""Declarative promotion rules: may this student replace the champion?

Rules are data (YAML / Prefect form), validated up front so that a misspelt
metric or knob fails before hours of teacher labelling and training, not at
the very end. Evaluation never raises on odd metrics, and no rule passes
without a real comparison, because a gate that silently passes is worse than
no gate. Each rule ends in one status, with a reason:

* `passed` / `failed`: the student's number was compared with the bound.
  A student value that is missing, NaN or not a number fails (the student
  must show its number).
* `not_evaluable`: there is nothing to compare against: no champion yet, the
  champion was scored on another evaluation set (`eval_set_sha256` differs),
  or the teacher's or champion's value is missing or NaN.

The decision:

* `require_all: true`: every rule passes, except champion rules when there is
  no champion yet (skipped, so the first student is promoted on its other
  rules). Any other not-evaluable rule blocks promotion: a champion that
  cannot be compared with is not replaced (the reason says how to fix it).
* `require_all: false` ("any"): at least one rule really passed; not-evaluable
  rules never count. When the gate has threshold rules (`absolute`,
  `relative_to_teacher`: the quality floors), one of them must be among the
  passed ones: beating the champion on one metric does not promote a student
  that fails every quality floor.
* In both modes a gate where no rule passed promotes nothing (a gate of
  champion rules only does not promote the first student: promote it by hand).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.errors import UserError

RuleKind = Literal["absolute", "relative_to_teacher", "relative_to_champion", "no_regression"]
CHAMPION_KINDS = ("relative_to_champion", "no_regression")
FLOOR_KINDS = ("absolute", "relative_to_teacher")  # quality floors: independent of the registry's state
RuleStatus = Literal["passed", "failed", "not_evaluable"]
NO_CHAMPION = "no champion yet"


class GateConfigError(UserError):
    """A gate rule is misconfigured (unknown metric, a knob its kind ignores); the message names the rule and field."""


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
            raise GateConfigError(f"gate rule {label!r}: kind {self.kind!r} needs 'threshold'")
        if self.kind in CHAMPION_KINDS and self.threshold is not None:
            raise GateConfigError(f"gate rule {label!r}: 'threshold' is not used by kind {self.kind!r} (use 'margin' or 'tolerance')")
        if self.margin != 0 and self.kind != "relative_to_champion":
            raise GateConfigError(f"gate rule {label!r}: 'margin' only applies to kind 'relative_to_champion'")
        if self.tolerance != 0 and self.kind != "no_regression":
            raise GateConfigError(f"gate rule {label!r}: 'tolerance' only applies to kind 'no_regression'")
        if self.use_interval and self.kind not in CHAMPION_KINDS:
            raise GateConfigError(f"gate rule {label!r}: 'use_interval' only applies to kinds {', '.join(CHAMPION_KINDS)}")
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
            raise GateConfigError(f"{listed}; known metrics: {', '.join(sorted(known_metrics)) or '(none)'}")


class RuleResult(BaseModel):
    name: str
    metric: str
    kind: str
    value: float | None = Field(description="The student number actually compared (a CI bound with use_interval).")
    threshold: float | None = Field(description="The effective bound compared against, e.g. 0.9 x teacher value.")
    status: RuleStatus = Field(description="passed, failed, or not_evaluable (nothing to compare against; see reason).")
    passed: bool = Field(description="status == 'passed' (kept for readers of older records).")
    reason: str
    skipped: bool = Field(False, description="not_evaluable and left out of the decision (a champion rule before any champion).")

    @model_validator(mode="before")
    @classmethod
    def _status_and_passed(cls, data: Any) -> Any:
        # Older records carry only `passed`; new ones carry `status`. Derive the one from the other.
        if isinstance(data, Mapping):
            data = dict(data)
            if "status" not in data and "passed" in data:
                data["status"] = "passed" if data["passed"] else "failed"
            data["passed"] = data.get("status") == "passed"
        return data


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


def _result(rule: GateRule, status: RuleStatus, reason: str, value: float | None = None,
            threshold: float | None = None, skipped: bool = False) -> RuleResult:
    return RuleResult(name=rule.name, metric=rule.metric, kind=rule.kind, value=value, threshold=threshold,
                      status=status, passed=status == "passed", reason=reason, skipped=skipped)


def _fail(rule: GateRule, reason: str, value: float | None = None, threshold: float | None = None) -> RuleResult:
    return _result(rule, "failed", reason, value, threshold)


def _not_evaluable(rule: GateRule, reason: str, value: float | None = None, threshold: float | None = None,
                   skipped: bool = False) -> RuleResult:
    return _result(rule, "not_evaluable", f"not evaluable: {reason}", value, threshold, skipped)


def eval_set_mismatch(student_eval_set: str | None, champion_eval_set: str | None) -> str | None:
    """Why the champion's metrics cannot be compared with the student's, or None when they can.

    Both sides unrecorded (hand-made metrics) compare; one recorded and the other not, or two different
    hashes, do not: numbers from different evaluation sets are not comparable.
    """
    if student_eval_set == champion_eval_set:
        return None
    return (f"champion was scored on a different evaluation set (hash {_short(champion_eval_set)} vs "
            f"{_short(student_eval_set)} for this student); re-evaluate the champion on this set, "
            "or promote by hand with `stillhouse registry promote VERSION --reason ...`")


def _short(sha: str | None) -> str:
    return "unrecorded" if sha is None else str(sha)[:12]


def evaluate_rule(rule: GateRule, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, champion: Mapping[str, Any] | None,
                  *, champion_unusable: str | None = None) -> RuleResult:
    """Evaluate one rule: passed or failed on a real comparison, else not_evaluable with the reason.

    The student's own value missing or NaN fails; a missing or NaN reference (teacher, champion), no champion,
    or `champion_unusable` (why the champion's numbers cannot be compared, e.g. another evaluation set) make
    the rule not_evaluable. A champion rule with no champion is marked `skipped`.
    """
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
            return _not_evaluable(rule, "no teacher metrics supplied", value)
        ref = _read(teacher, rule.metric, "teacher")
        if isinstance(ref, str):
            return _not_evaluable(rule, ref, value)
        if math.isnan(ref.value):
            return _not_evaluable(rule, f"teacher metric {rule.metric!r} is NaN", value)
        bound, basis = rule.threshold * ref.value, f"{rule.threshold:g} x teacher {ref.value:.4g}"
    else:
        if champion is None:
            return _not_evaluable(rule, NO_CHAMPION + " (skipped)", value, skipped=True)
        if champion_unusable is not None:
            return _not_evaluable(rule, champion_unusable, value)
        ref = _read(champion, rule.metric, "champion")
        if isinstance(ref, str):
            return _not_evaluable(rule, ref, value)
        if math.isnan(ref.value):
            return _not_evaluable(rule, f"champion metric {rule.metric!r} is NaN", value)
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
        return _not_evaluable(rule, f"threshold is NaN ({basis})", value)
    passed = value >= bound if hib else value <= bound
    op = (">=" if passed else "<") if hib else ("<=" if passed else ">")
    return _result(rule, "passed" if passed else "failed", f"{label} {value:.4g} {op} {bound:.4g} ({basis})", value, bound)


def _listed(results: list[RuleResult]) -> str:
    return "; ".join(f"{r.name}: {r.reason}" for r in results)


def evaluate_gate(config: GateConfig, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, champion: Mapping[str, Any] | None,
                  *, student_eval_set: str | None = None, champion_eval_set: str | None = None) -> GateDecision:
    """Apply every rule (no short-circuit, so the report shows all failures) and decide (module docstring).

    `student_eval_set` / `champion_eval_set`: the `eval_set_sha256` each was scored on; champion rules need
    them equal (both None: not recorded, taken as equal).
    """
    unusable = None if champion is None else eval_set_mismatch(student_eval_set, champion_eval_set)
    results = [evaluate_rule(rule, student, teacher, champion, champion_unusable=unusable) for rule in config.rules]
    n = len(results)
    passed = [r for r in results if r.status == "passed"]
    failed = [r for r in results if r.status == "failed"]
    skipped = [r for r in results if r.skipped]
    blocked = [r for r in results if r.status == "not_evaluable" and not r.skipped]
    floors = [r for r in results if r.kind in FLOOR_KINDS]
    skipped_note = f"; {len(skipped)} champion rule(s) skipped ({NO_CHAMPION})" if skipped else ""
    if config.require_all:
        promoted = not failed and not blocked and bool(passed)
        if promoted:
            summary = f"promoted: {len(passed)} of {n} rule(s) passed{skipped_note}"
        elif failed or blocked:
            parts = []
            if failed:
                parts.append(f"{len(failed)} of {n} rule(s) failed: {_listed(failed)}")
            if blocked:
                parts.append(f"{len(blocked)} of {n} rule(s) could not be evaluated (all must pass): {_listed(blocked)}")
            summary = "not promoted: " + "; ".join(parts)
        else:
            summary = (f"not promoted: no rule could be evaluated ({NO_CHAMPION}, and the gate has no absolute or "
                       "relative_to_teacher rule); add one, or promote by hand with `stillhouse registry promote VERSION`")
    else:
        floors_passed = [r for r in floors if r.status == "passed"]
        promoted = bool(passed) and (not floors or bool(floors_passed))
        if promoted:
            summary = f"promoted: {len(passed)} of {n} rule(s) passed (any one suffices): " + ", ".join(r.name for r in passed)
        elif passed:
            summary = (f"not promoted: only champion rule(s) passed ({', '.join(r.name for r in passed)}), and every quality "
                       f"floor (absolute / relative_to_teacher rule) did not: {_listed(floors)}")
        else:
            summary = f"not promoted: none of {n} rule(s) passed: " + _listed(results)
    return GateDecision(promoted=promoted, rules=results, summary=summary)
