"""Promotion gate: each rule kind by hand, a seeded property test, and config errors."""

from __future__ import annotations

import math
import random

import pytest
from pydantic import ValidationError

from tasks.gate import GateConfig, evaluate_gate

KNOWN = {"exact_match", "rouge_l", "kl_to_teacher"}


def gate(*rules: dict, require_all: bool = True) -> GateConfig:
    return GateConfig.model_validate({"rules": list(rules), "require_all": require_all})


def only(decision):
    assert len(decision.rules) == 1
    return decision.rules[0]


# ----- hand examples ------------------------------------------------------------------


def test_absolute_higher_and_lower_is_better():
    cfg = gate({"metric": "exact_match", "kind": "absolute", "threshold": 0.5})
    assert cfg.rules[0].name == "exact_match>=0.5"
    assert evaluate_gate(cfg, {"exact_match": 0.5}, None, None).promoted
    r = only(evaluate_gate(cfg, {"exact_match": 0.49}, None, None))
    assert not r.passed and r.threshold == 0.5 and r.value == 0.49 and "<" in r.reason

    kl = gate({"metric": "kl_to_teacher", "kind": "absolute", "threshold": 0.3, "higher_is_better": False})
    assert kl.rules[0].name == "kl_to_teacher<=0.3"
    assert evaluate_gate(kl, {"kl_to_teacher": 0.2}, None, None).promoted
    assert not evaluate_gate(kl, {"kl_to_teacher": 0.31}, None, None).promoted


def test_relative_to_teacher_uses_effective_threshold():
    cfg = gate({"metric": "rouge_l", "kind": "relative_to_teacher", "threshold": 0.9})
    d = evaluate_gate(cfg, {"rouge_l": 0.46}, {"rouge_l": 0.5}, None)
    assert d.promoted and only(d).threshold == pytest.approx(0.45)
    assert not evaluate_gate(cfg, {"rouge_l": 0.44}, {"rouge_l": 0.5}, None).promoted

    lower = gate({"metric": "kl_to_teacher", "kind": "relative_to_teacher", "threshold": 1.2, "higher_is_better": False})
    assert evaluate_gate(lower, {"kl_to_teacher": 0.59}, {"kl_to_teacher": 0.5}, None).promoted
    assert not evaluate_gate(lower, {"kl_to_teacher": 0.61}, {"kl_to_teacher": 0.5}, None).promoted


def test_relative_to_teacher_fails_without_teacher_metrics():
    cfg = gate({"metric": "rouge_l", "kind": "relative_to_teacher", "threshold": 0.9})
    r = only(evaluate_gate(cfg, {"rouge_l": 0.9}, None, None))
    assert not r.passed and "teacher" in r.reason
    r = only(evaluate_gate(cfg, {"rouge_l": 0.9}, {"exact_match": 0.9}, None))
    assert not r.passed and "teacher metrics have no 'rouge_l'" in r.reason


def test_relative_to_champion_margin_and_first_model():
    cfg = gate({"metric": "exact_match", "kind": "relative_to_champion", "margin": 0.02})
    r = only(evaluate_gate(cfg, {"exact_match": 0.1}, None, None))
    assert r.passed and r.reason == "no champion yet"
    assert evaluate_gate(cfg, {"exact_match": 0.52}, None, {"exact_match": 0.5}).promoted
    r = only(evaluate_gate(cfg, {"exact_match": 0.51}, None, {"exact_match": 0.5}))
    assert not r.passed and r.threshold == pytest.approx(0.52)
    r = only(evaluate_gate(cfg, {"exact_match": 0.9}, None, {"rouge_l": 0.5}))
    assert not r.passed and "champion metrics have no 'exact_match'" in r.reason

    lower = gate({"metric": "kl_to_teacher", "kind": "relative_to_champion", "margin": 0.1, "higher_is_better": False})
    assert evaluate_gate(lower, {"kl_to_teacher": 0.4}, None, {"kl_to_teacher": 0.5}).promoted
    assert not evaluate_gate(lower, {"kl_to_teacher": 0.45}, None, {"kl_to_teacher": 0.5}).promoted


def test_no_regression_tolerance():
    cfg = gate({"metric": "exact_match", "kind": "no_regression", "tolerance": 0.01})
    assert cfg.rules[0].name == "exact_match>=champion-0.01"
    assert evaluate_gate(cfg, {"exact_match": 0.495}, None, {"exact_match": 0.5}).promoted
    assert not evaluate_gate(cfg, {"exact_match": 0.48}, None, {"exact_match": 0.5}).promoted
    assert evaluate_gate(cfg, {"exact_match": 0.0}, None, None).promoted  # first model


def test_use_interval_compares_confidence_bound():
    cfg = gate({"metric": "exact_match", "kind": "relative_to_champion", "use_interval": True})
    student = {"exact_match": {"value": 0.6, "ci_low": 0.45, "ci_high": 0.75, "n": 100}}
    r = only(evaluate_gate(cfg, student, None, {"exact_match": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 100}}))
    assert not r.passed and r.value == 0.45 and r.threshold == 0.5 and "ci_low" in r.reason
    # Without intervals the point value is used, and the reason says so.
    r = only(evaluate_gate(cfg, {"exact_match": 0.6}, None, {"exact_match": 0.5}))
    assert r.passed and "point value" in r.reason
    lower = gate({"metric": "kl_to_teacher", "kind": "no_regression", "use_interval": True, "higher_is_better": False})
    r = only(evaluate_gate(lower, {"kl_to_teacher": {"value": 0.4, "ci_low": 0.3, "ci_high": 0.55}}, None, {"kl_to_teacher": 0.5}))
    assert not r.passed and r.value == 0.55


def test_missing_nan_and_non_numeric_never_pass():
    cfg = gate({"metric": "exact_match", "kind": "absolute", "threshold": 0.0})
    for student in ({}, {"exact_match": float("nan")}, {"exact_match": {"value": float("nan")}}, {"exact_match": "0.9"}, {"exact_match": {"ci_low": 0.1}}):
        d = evaluate_gate(cfg, student, None, None)
        assert not d.promoted, student
        assert only(d).reason
    champ = gate({"metric": "exact_match", "kind": "no_regression"})
    assert not evaluate_gate(champ, {"exact_match": float("nan")}, None, None).promoted  # even with no champion
    r = only(evaluate_gate(champ, {"exact_match": 0.5}, None, {"exact_match": float("nan")}))
    assert not r.passed and "NaN" in r.reason


def test_require_all_vs_any_and_summary():
    rules = ({"metric": "exact_match", "kind": "absolute", "threshold": 0.5}, {"metric": "rouge_l", "kind": "absolute", "threshold": 0.5})
    student = {"exact_match": 0.6, "rouge_l": 0.4}
    d = evaluate_gate(gate(*rules), student, None, None)
    assert not d.promoted and [r.passed for r in d.rules] == [True, False]
    assert "1 of 2" in d.summary and "rouge_l>=0.5" in d.summary and "\n" not in d.summary
    d = evaluate_gate(gate(*rules, require_all=False), student, None, None)
    assert d.promoted and "exact_match>=0.5" in d.summary
    d = evaluate_gate(gate(*rules), {"exact_match": 0.6, "rouge_l": 0.6}, None, None)
    assert d.promoted and d.summary.startswith("promoted")
    assert GateConfig.model_validate_json(gate(*rules).model_dump_json()) == gate(*rules)


# ----- seeded property test -----------------------------------------------------------


def oracle(rule: dict, student: dict, teacher: dict | None, champion: dict | None) -> tuple[bool, float | None]:
    """The rule semantics written out a second time, from the spec, independently of tasks/gate.py."""

    def point(metrics, name):
        raw = metrics.get(name)
        return raw["value"] if isinstance(raw, dict) else raw

    hib = rule.get("higher_is_better", True)
    value = point(student, rule["metric"])
    if value is None or math.isnan(value):
        return False, None
    kind = rule["kind"]
    if kind == "absolute":
        bound = rule["threshold"]
    elif kind == "relative_to_teacher":
        ref = None if teacher is None else point(teacher, rule["metric"])
        if ref is None:
            return False, None
        bound = rule["threshold"] * ref
    else:
        if champion is None:
            return True, None
        ref = point(champion, rule["metric"])
        if ref is None:
            return False, None
        sign = 1 if hib else -1
        bound = ref + sign * rule.get("margin", 0.0) if kind == "relative_to_champion" else ref - sign * rule.get("tolerance", 0.0)
        raw = student[rule["metric"]]
        if rule.get("use_interval") and isinstance(raw, dict) and raw.get("ci_low") is not None:
            value = raw["ci_low"] if hib else raw["ci_high"]
    if math.isnan(value) or math.isnan(bound):
        return False, bound
    return (value >= bound if hib else value <= bound), bound


def random_value(rng: random.Random):
    roll = rng.random()
    if roll < 0.05:
        return float("nan")
    # A coarse shared grid, so student, teacher and champion values often sit at or near
    # each other's bounds: ties must pass, and a CI bound must be able to flip the result.
    v = rng.choice([i / 20 for i in range(6, 15)])
    if roll < 0.5:
        return v
    half = rng.choice([0.0, 0.05, 0.1, 0.15])
    return {"value": v, "ci_low": v - half, "ci_high": v + half, "n": rng.randint(1, 500)}


def random_metrics(rng: random.Random, p_missing: float) -> dict:
    return {m: random_value(rng) for m in sorted(KNOWN) if rng.random() > p_missing}


def random_rule(rng: random.Random) -> dict:
    kind = rng.choice(["absolute", "relative_to_teacher", "relative_to_champion", "no_regression"])
    rule = {"metric": rng.choice(sorted(KNOWN)), "kind": kind, "higher_is_better": rng.random() < 0.7}
    if kind == "absolute":
        rule["threshold"] = rng.choice([i / 20 for i in range(4, 17)])
    elif kind == "relative_to_teacher":
        rule["threshold"] = rng.choice([0.5, 0.8, 0.9, 1.0, 1.1])
    elif kind == "relative_to_champion":
        rule["margin"] = rng.choice([0.0, 0.0, 0.05, 0.1])
        rule["use_interval"] = rng.random() < 0.3
    else:
        rule["tolerance"] = rng.choice([0.0, 0.05, 0.1])
        rule["use_interval"] = rng.random() < 0.3
    return rule


def test_property_decision_matches_independent_evaluation():
    rng = random.Random(20240611)
    outcomes = set()
    for case in range(500):
        rules = [random_rule(rng) for _ in range(rng.randint(1, 4))]
        require_all = rng.random() < 0.8
        student = random_metrics(rng, 0.15)
        teacher = None if rng.random() < 0.2 else random_metrics(rng, 0.15)
        champion = None if rng.random() < 0.3 else random_metrics(rng, 0.15)
        decision = evaluate_gate(gate(*rules, require_all=require_all), student, teacher, champion)

        expected = [oracle(rule, student, teacher, champion) for rule in rules]
        ctx = f"case {case}: rules={rules} student={student} teacher={teacher} champion={champion} -> {decision}"
        for (want, bound), got in zip(expected, decision.rules):
            assert got.passed is want, ctx
            assert got.reason, ctx
            if bound is not None and not math.isnan(bound):
                assert got.threshold == pytest.approx(bound), ctx
        oks = [want for want, _ in expected]
        assert decision.promoted is (all(oks) if require_all else any(oks)), ctx
        if require_all and not all(oks):
            assert not decision.promoted, ctx
        outcomes.add((require_all, decision.promoted))
    assert outcomes == {(True, True), (True, False), (False, True), (False, False)}, "generator covers every outcome"


# ----- config errors ------------------------------------------------------------------


def test_unknown_metric_is_rejected_with_rule_and_known_names():
    cfg = gate({"metric": "exact_match", "kind": "absolute", "threshold": 0.2}, {"name": "bleu gate", "metric": "bleu", "kind": "absolute", "threshold": 0.2})
    gate({"metric": "exact_match", "kind": "absolute", "threshold": 0.2}).validate_metrics(KNOWN)  # known: no error
    with pytest.raises(ValueError) as err:
        cfg.validate_metrics(KNOWN)
    text = str(err.value)
    assert "'bleu gate'" in text and "'bleu'" in text and "exact_match, kl_to_teacher, rouge_l" in text


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"metric": "exact_match", "kind": "absolute", "threshold": "high"}, "threshold"),
        ({"metric": "exact_match", "kind": "absolut", "threshold": 0.5}, "kind"),
        ({"metric": "exact_match", "kind": "absolute", "treshold": 0.5}, "treshold"),
        ({"metric": "exact_match", "kind": "no_regression", "tolerance": -0.1}, "tolerance"),
        ({"metric": "exact_match", "kind": "absolute", "threshold": float("nan")}, "threshold"),
        ({"kind": "absolute", "threshold": 0.5}, "metric"),
        ({"metric": "exact_match", "kind": "absolute"}, "threshold"),  # absolute needs one
        ({"metric": "exact_match", "kind": "relative_to_teacher"}, "threshold"),
        ({"metric": "exact_match", "kind": "relative_to_champion", "threshold": 0.5}, "threshold"),
        ({"metric": "exact_match", "kind": "absolute", "threshold": 0.5, "margin": 0.1}, "margin"),
        ({"metric": "exact_match", "kind": "relative_to_champion", "tolerance": 0.1}, "tolerance"),
        ({"metric": "exact_match", "kind": "absolute", "threshold": 0.5, "use_interval": True}, "use_interval"),
    ],
)
def test_bad_rule_config_names_the_field(rule, field):
    with pytest.raises(ValidationError) as err:
        gate(rule)
    assert field in str(err.value)


def test_bad_gate_config_names_the_field():
    with pytest.raises(ValidationError, match="require_al"):
        GateConfig.model_validate({"rules": [{"metric": "exact_match", "kind": "absolute", "threshold": 0.1}], "require_al": False})
    with pytest.raises(ValidationError, match="rules"):
        GateConfig.model_validate({"rules": []})
