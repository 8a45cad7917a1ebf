"""Hypothesis properties of the promotion gate (tasks/gate.py): no rule set, metric values, champion state or
mode promotes a student that fails every quality floor, and a promotion always rests on rules that really passed.

"Quality floor" = a rule with a `threshold`: kind `absolute`, or `relative_to_teacher` (a threshold on the
teacher's value). Champion rules (`relative_to_champion`, `no_regression`) compare with the registry's champion
and are never a floor. The seeded oracle test in tests/test_gate.py checks each rule's number; these check the
decision's invariants over many more shapes of input.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tasks.gate import GateConfig, evaluate_gate

METRICS = ("exact_match", "rouge_l", "kl_to_teacher")
FLOOR_KINDS = ("absolute", "relative_to_teacher")
CHAMPION_KINDS = ("relative_to_champion", "no_regression")
# Derandomized and without an example database: the same examples on every machine, nothing written to the tree.
FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

# A coarse grid (values meet bounds exactly, so ties occur) plus arbitrary floats in and around [0, 1].
numbers = st.one_of(st.sampled_from([i / 20 for i in range(21)]), st.floats(-0.5, 1.5, allow_nan=False))


@st.composite
def reading(draw):
    """A metric as the evaluator writes it: a number, or {"value", "ci_low", "ci_high", "n"}; sometimes NaN."""
    if draw(st.integers(0, 19)) == 0:
        return float("nan")
    value = draw(numbers)
    if draw(st.booleans()):
        return value
    half = draw(st.sampled_from([0.0, 0.05, 0.2]))
    return {"value": value, "ci_low": value - half, "ci_high": value + half, "n": draw(st.integers(1, 500))}


def metric_sets():
    """Metrics with some names missing."""
    return st.dictionaries(st.sampled_from(METRICS), reading(), max_size=len(METRICS))


@st.composite
def rule(draw, kinds=FLOOR_KINDS + CHAMPION_KINDS):
    kind = draw(st.sampled_from(kinds))
    out = {"metric": draw(st.sampled_from(METRICS)), "kind": kind, "higher_is_better": draw(st.booleans())}
    if kind == "absolute":
        out["threshold"] = draw(numbers)
    elif kind == "relative_to_teacher":
        out["threshold"] = draw(st.sampled_from([0.5, 0.8, 0.9, 1.0, 1.1]))
    elif kind == "relative_to_champion":
        out["margin"] = draw(st.sampled_from([0.0, 0.0, 0.05, -0.05]))
        out["use_interval"] = draw(st.booleans())
    else:
        out["tolerance"] = draw(st.sampled_from([0.0, 0.05, 0.1]))
        out["use_interval"] = draw(st.booleans())
    return out


def rule_sets(min_floors: int = 0):
    floors = st.lists(rule(FLOOR_KINDS), min_size=min_floors, max_size=3)
    champions = st.lists(rule(CHAMPION_KINDS), max_size=3)
    return st.tuples(floors, champions).map(lambda fc: fc[0] + fc[1]).filter(bool)


def point(raw) -> float | None:
    raw = raw["value"] if isinstance(raw, dict) else raw
    return raw if isinstance(raw, float) and not math.isnan(raw) else None


def floor_bound(r: dict, teacher: dict | None) -> float | None:
    """The bound a floor rule compares the student's point value with; None when it cannot pass at all."""
    if r["kind"] == "absolute":
        return r["threshold"]
    ref = point((teacher or {}).get(r["metric"]))
    return None if ref is None else r["threshold"] * ref


def fails_floor(r: dict, student: dict, teacher: dict | None) -> bool:
    """Independent of tasks/gate.py: the student does not meet this floor (or has no number for it)."""
    value, bound = point(student.get(r["metric"])), floor_bound(r, teacher)
    if value is None or bound is None:
        return True
    return value < bound if r["higher_is_better"] else value > bound


@st.composite
def student_below_every_floor(draw, rules: list[dict], teacher: dict | None):
    """Student metrics that fail every floor rule: a value below every higher-is-better bound and above every
    lower-is-better one where such a value exists, else no number; other metrics are arbitrary."""
    student = draw(metric_sets())
    for metric in METRICS:
        bounds = [(r["higher_is_better"], b) for r in rules
                  if r["kind"] in FLOOR_KINDS and r["metric"] == metric and (b := floor_bound(r, teacher)) is not None]
        if not bounds:
            continue
        hi = min((b for hib, b in bounds if hib), default=None)  # must be < hi
        lo = max((b for hib, b in bounds if not hib), default=None)  # must be > lo
        if hi is None:
            choice = st.floats(lo, lo + 2, exclude_min=True)
        elif lo is None:
            choice = st.floats(hi - 2, hi, exclude_max=True)
        elif lo < hi and math.nextafter(lo, math.inf) < hi:
            choice = st.floats(lo, hi, exclude_min=True, exclude_max=True)
        else:
            choice = st.sampled_from([None, float("nan"), "n/a"])  # no value fails them all: give no number
        value = draw(choice)
        if value is None:
            student.pop(metric, None)
        elif isinstance(value, float) and not math.isnan(value) and draw(st.booleans()):
            # an interval as wide as it likes: champion rules with use_interval may pass on it
            student[metric] = {"value": value, "ci_low": value - 1, "ci_high": value + 1, "n": 10}
        else:
            student[metric] = value
    return student


def decide(rules, student, teacher, champion, require_all, **eval_sets):
    return evaluate_gate(GateConfig.model_validate({"rules": rules, "require_all": require_all}), student, teacher, champion, **eval_sets)


@FAST
@given(data=st.data(), rules=rule_sets(min_floors=1), teacher=st.none() | metric_sets(), champion=st.none() | metric_sets(),
       require_all=st.booleans(), other_eval_set=st.booleans())
def test_a_student_failing_every_floor_is_never_promoted(data, rules, teacher, champion, require_all, other_eval_set):
    student = data.draw(student_below_every_floor(rules, teacher), label="student")
    assert all(fails_floor(r, student, teacher) for r in rules if r["kind"] in FLOOR_KINDS)  # the premise holds
    sets = {"student_eval_set": "a" * 64, "champion_eval_set": ("b" if other_eval_set else "a") * 64}
    decision = decide(rules, student, teacher, champion, require_all, **sets)
    note(decision.summary)
    assert not decision.promoted
    assert all(r.status != "passed" for r in decision.rules if r.kind in FLOOR_KINDS)


@FAST
@given(rules=rule_sets(), student=metric_sets(), teacher=st.none() | metric_sets(), champion=st.none() | metric_sets(),
       require_all=st.booleans())
def test_a_promotion_rests_on_rules_that_really_passed(rules, student, teacher, champion, require_all):
    decision = decide(rules, student, teacher, champion, require_all)
    note(decision.summary)
    statuses = [r.status for r in decision.rules]
    assert set(statuses) <= {"passed", "failed", "not_evaluable"}
    assert all(r.passed is (r.status == "passed") and r.reason for r in decision.rules)
    assert all(champion is None and r.kind in CHAMPION_KINDS and r.status == "not_evaluable" for r in decision.rules if r.skipped)
    if champion is None:  # nothing to compare with: no champion rule can pass (one the student has no number for fails)
        assert all(r.skipped or r.status == "failed" for r in decision.rules if r.kind in CHAMPION_KINDS)
    if decision.promoted:
        assert "passed" in statuses  # in both modes
        if require_all:
            assert "failed" not in statuses
            assert all(r.skipped for r in decision.rules if r.status == "not_evaluable")
        else:
            floors = [r.status for r in decision.rules if r.kind in FLOOR_KINDS]
            assert not floors or "passed" in floors


@FAST
@given(rules=rule_sets(), student=metric_sets(), teacher=st.none() | metric_sets(), champion=metric_sets(), require_all=st.booleans())
def test_champion_rules_that_cannot_be_evaluated_never_help(rules, student, teacher, champion, require_all):
    """No champion, or a champion from another evaluation set: the decision is the one the gate would make
    without its champion rules (require_all with another set: never promoted while a champion rule exists)."""
    floors = [r for r in rules if r["kind"] in FLOOR_KINDS]
    without = bool(floors) and decide(floors, student, teacher, None, require_all).promoted

    assert decide(rules, student, teacher, None, require_all).promoted is without

    other = decide(rules, student, teacher, champion, require_all, student_eval_set="a" * 64, champion_eval_set="b" * 64)
    has_champion_rules = len(floors) < len(rules)
    for r in other.rules:  # every champion rule the student has a number for says why it was not compared
        if r.kind in CHAMPION_KINDS and r.status != "failed":
            assert r.status == "not_evaluable" and not r.skipped and "different evaluation set" in r.reason
    if require_all and has_champion_rules:
        assert not other.promoted
    else:
        assert other.promoted is without
