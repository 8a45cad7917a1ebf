"""Promotion gate: each rule kind by hand, not-evaluable rules and the evaluation-set check, the promotion stage
on a real registry, a seeded property test against an independent oracle, and config errors.
(Hypothesis properties: tests/test_gate_property.py.)"""

from __future__ import annotations

import json
import math
import random

import pytest
from pydantic import ValidationError

from storage.errors import UserError
from storage.registry import ModelRegistry
from tasks.gate import GateConfig, GateConfigError, RuleResult, evaluate_gate

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
    d = evaluate_gate(cfg, {"rouge_l": 0.9}, None, None)
    r = only(d)
    assert not d.promoted and not r.passed and r.status == "not_evaluable" and "teacher" in r.reason
    d = evaluate_gate(cfg, {"rouge_l": 0.9}, {"exact_match": 0.9}, None)
    r = only(d)
    assert not d.promoted and r.status == "not_evaluable" and "teacher metrics have no 'rouge_l'" in r.reason
    r = only(evaluate_gate(cfg, {"rouge_l": 0.9}, {"rouge_l": float("nan")}, None))
    assert r.status == "not_evaluable" and "NaN" in r.reason


def test_relative_to_champion_margin_and_first_model():
    cfg = gate({"metric": "exact_match", "kind": "relative_to_champion", "margin": 0.02})
    # No champion: the rule is not evaluable (it used to "pass" as "no champion yet"), and a gate of champion
    # rules only promotes nothing, since nothing was compared.
    d = evaluate_gate(cfg, {"exact_match": 0.1}, None, None)
    r = only(d)
    assert r.status == "not_evaluable" and r.skipped and not r.passed and "no champion yet" in r.reason
    assert not d.promoted and "no rule could be evaluated" in d.summary and "registry promote" in d.summary
    assert evaluate_gate(cfg, {"exact_match": 0.52}, None, {"exact_match": 0.5}).promoted
    r = only(evaluate_gate(cfg, {"exact_match": 0.51}, None, {"exact_match": 0.5}))
    assert not r.passed and r.status == "failed" and r.threshold == pytest.approx(0.52)
    d = evaluate_gate(cfg, {"exact_match": 0.9}, None, {"rouge_l": 0.5})
    r = only(d)
    assert not d.promoted and r.status == "not_evaluable" and not r.skipped and "champion metrics have no 'exact_match'" in r.reason

    lower = gate({"metric": "kl_to_teacher", "kind": "relative_to_champion", "margin": 0.1, "higher_is_better": False})
    assert evaluate_gate(lower, {"kl_to_teacher": 0.4}, None, {"kl_to_teacher": 0.5}).promoted
    assert not evaluate_gate(lower, {"kl_to_teacher": 0.45}, None, {"kl_to_teacher": 0.5}).promoted


def test_no_regression_tolerance():
    cfg = gate({"metric": "exact_match", "kind": "no_regression", "tolerance": 0.01})
    assert cfg.rules[0].name == "exact_match>=champion-0.01"
    assert evaluate_gate(cfg, {"exact_match": 0.495}, None, {"exact_match": 0.5}).promoted
    assert not evaluate_gate(cfg, {"exact_match": 0.48}, None, {"exact_match": 0.5}).promoted
    d = evaluate_gate(cfg, {"exact_match": 0.0}, None, None)  # first model, nothing to compare with
    assert not d.promoted and only(d).status == "not_evaluable"


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
    d = evaluate_gate(champ, {"exact_match": 0.5}, None, {"exact_match": float("nan")})
    assert not d.promoted and not only(d).passed and only(d).status == "not_evaluable" and "NaN" in only(d).reason


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


# ----- not-evaluable rules and the evaluation set --------------------------------------

FLOORS = ({"metric": "exact_match", "kind": "absolute", "threshold": 0.5}, {"metric": "rouge_l", "kind": "relative_to_teacher", "threshold": 0.9})
BAD = {"exact_match": 0.1, "rouge_l": 0.1}  # below every floor
TEACHER = {"exact_match": 0.8, "rouge_l": 0.8}


def test_any_gate_on_empty_registry_does_not_promote_a_student_failing_every_floor():
    # The reported bug: require_all false, a champion rule, no champion -> the champion rule "passed" and a
    # student that failed every quality threshold became champion.
    cfg = gate(*FLOORS, {"metric": "exact_match", "kind": "relative_to_champion"}, require_all=False)
    d = evaluate_gate(cfg, BAD, TEACHER, None)
    assert not d.promoted
    assert [r.status for r in d.rules] == ["failed", "failed", "not_evaluable"] and [r.passed for r in d.rules] == [False] * 3
    assert d.rules[2].skipped and "no champion yet" in d.rules[2].reason
    assert d.summary.startswith("not promoted: none of 3 rule(s) passed")
    # The same gate promotes a student above one floor.
    assert evaluate_gate(cfg, {"exact_match": 0.6, "rouge_l": 0.1}, TEACHER, None).promoted


def test_require_all_first_student_is_promoted_on_its_floors_with_champion_rules_skipped():
    cfg = gate(*FLOORS, {"metric": "exact_match", "kind": "no_regression"})
    good = {"exact_match": 0.6, "rouge_l": 0.75}
    d = evaluate_gate(cfg, good, TEACHER, None)
    assert d.promoted and [r.status for r in d.rules] == ["passed", "passed", "not_evaluable"]
    assert "2 of 3 rule(s) passed" in d.summary and "1 champion rule(s) skipped (no champion yet)" in d.summary
    assert not evaluate_gate(cfg, {**good, "rouge_l": 0.7}, TEACHER, None).promoted  # one floor fails: all must pass
    # A champion that exists but lacks the metric is not skipped: it blocks, as the student cannot be compared.
    d = evaluate_gate(cfg, good, TEACHER, {"rouge_l": 0.5})
    assert not d.promoted and d.rules[2].status == "not_evaluable" and not d.rules[2].skipped
    assert "could not be evaluated (all must pass)" in d.summary


def test_any_gate_champion_rule_alone_cannot_rescue_a_student_below_every_floor():
    cfg = gate(*FLOORS, {"metric": "kl_to_teacher", "kind": "relative_to_champion", "higher_is_better": False}, require_all=False)
    student = {**BAD, "kl_to_teacher": 0.2}
    d = evaluate_gate(cfg, student, TEACHER, {"kl_to_teacher": 0.5})
    assert [r.status for r in d.rules] == ["failed", "failed", "passed"]
    assert not d.promoted and "only champion rule(s) passed" in d.summary
    # With a floor passed as well, any one suffices again.
    assert evaluate_gate(cfg, {**student, "exact_match": 0.5}, TEACHER, {"kl_to_teacher": 0.5}).promoted
    # A gate of champion rules only has no floor: beating the champion promotes.
    champ_only = gate({"metric": "kl_to_teacher", "kind": "relative_to_champion", "higher_is_better": False}, require_all=False)
    assert evaluate_gate(champ_only, student, None, {"kl_to_teacher": 0.5}).promoted


def test_champion_scored_on_another_eval_set_is_not_compared():
    champion = {"exact_match": 0.3}
    better = {"exact_match": 0.9, "rouge_l": 0.9}
    rule = {"metric": "exact_match", "kind": "relative_to_champion"}
    other = {"student_eval_set": "aaaa" * 16, "champion_eval_set": "bbbb" * 16}

    d = evaluate_gate(gate(rule), better, None, champion, **other)  # require_all: safe choice, not promoted
    r = only(d)
    assert not d.promoted and r.status == "not_evaluable" and not r.skipped and r.value == 0.9 and r.threshold is None
    assert "different evaluation set (hash bbbbbbbbbbbb vs aaaaaaaaaaaa" in r.reason and "re-evaluate the champion" in r.reason
    assert "different evaluation set" in d.summary
    d = evaluate_gate(gate(*FLOORS, rule), better, TEACHER, champion, **other)
    assert not d.promoted and [r.status for r in d.rules] == ["passed", "passed", "not_evaluable"]

    d = evaluate_gate(gate(rule, require_all=False), better, None, champion, **other)  # any: the champion rule does not count
    assert not d.promoted and only(d).status == "not_evaluable"
    d = evaluate_gate(gate(*FLOORS, rule, require_all=False), better, TEACHER, champion, **other)
    assert d.promoted and d.rules[2].status == "not_evaluable"  # promoted on its floors, not over the champion's numbers

    # One side unrecorded is not "the same set" either; both the same (or both unrecorded) compare.
    assert only(evaluate_gate(gate(rule), better, None, champion, student_eval_set="a" * 64)).status == "not_evaluable"
    assert evaluate_gate(gate(rule), better, None, champion, student_eval_set="a" * 64, champion_eval_set="a" * 64).promoted
    assert evaluate_gate(gate(rule), better, None, champion).promoted
    # No champion at all: the hashes do not matter, the rule is skipped.
    assert only(evaluate_gate(gate(rule), better, None, None, **other)).skipped


def test_rule_status_and_passed_agree_old_records_still_load():
    cfg = gate(*FLOORS, {"metric": "exact_match", "kind": "no_regression"})
    for r in evaluate_gate(cfg, {"exact_match": 0.6, "rouge_l": 0.1}, TEACHER, None).rules:
        assert r.passed is (r.status == "passed")
        assert RuleResult.model_validate(r.model_dump()) == r
    old = {"name": "x", "metric": "exact_match", "kind": "absolute", "value": 0.4, "threshold": 0.2, "passed": True, "reason": "ok"}
    assert RuleResult.model_validate(old).status == "passed"
    assert RuleResult.model_validate({**old, "passed": False}).status == "failed"
    # status wins over a contradicting passed flag
    assert RuleResult.model_validate({**old, "status": "not_evaluable"}).passed is False


# ----- the promotion stage on a real registry ------------------------------------------


def promote(tmp_path, tag: str, student: dict, rules: list[dict], *, eval_set: str | None, require_all: bool = True) -> dict:
    from tasks.config import PromotionConfig
    from tasks.promote import run_promotion_stage

    model = tmp_path / f"model-{tag}"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"tag": tag}))
    cfg = PromotionConfig.model_validate({"gate": {"rules": rules, "require_all": require_all}})
    lineage = {"train_key": tag} | ({"eval_set_sha256": eval_set} if eval_set else {})
    lines: list[str] = []
    record = run_promotion_stage(cfg, str(tmp_path / "reg"), str(model), {"student": student, "teacher": TEACHER}, lineage, log_fn=lines.append)
    record["log"] = lines
    return record


def test_promotion_stage_empty_registry_any_gate_keeps_a_bad_student_out(tmp_path):
    rules = [FLOORS[0], {"metric": "exact_match", "kind": "relative_to_champion"}]
    record = promote(tmp_path, "bad", BAD, rules, eval_set="e" * 64, require_all=False)
    reg = ModelRegistry(tmp_path / "reg")
    assert not record["promoted"] and record["champion_after"] is None and reg.alias("champion") is None
    assert reg.alias("challenger").version == record["version"] == "v0001"
    assert [r["status"] for r in record["rules"]] == ["failed", "not_evaluable"]
    assert any(line.startswith("gate: N/A ") and "no champion yet" in line for line in record["log"])


def test_promotion_stage_compares_with_the_champion_only_on_the_same_eval_set(tmp_path):
    rules = [FLOORS[0], {"metric": "exact_match", "kind": "relative_to_champion", "margin": 0.05}]
    first = promote(tmp_path, "first", {"exact_match": 0.6}, rules, eval_set="a" * 64)
    assert first["promoted"] and first["champion_after"] == "v0001"  # champion rule skipped, floor passed

    # A better student scored on another evaluation set: require_all -> not promoted, and the reason says why.
    other = promote(tmp_path, "other", {"exact_match": 0.9}, rules, eval_set="b" * 64)
    assert not other["promoted"] and other["champion_after"] == "v0001"
    assert other["rules"][1]["status"] == "not_evaluable"
    assert "different evaluation set (hash aaaaaaaaaaaa vs bbbbbbbbbbbb" in other["rules"][1]["reason"]
    assert "different evaluation set" in other["summary"]
    # The same under "any" with only the champion rule: not promoted over the champion on that basis.
    champ_only = promote(tmp_path, "other-any", {"exact_match": 0.9}, rules[1:], eval_set="b" * 64, require_all=False)
    assert not champ_only["promoted"] and champ_only["champion_after"] == "v0001"

    # Same evaluation set: compared, and a better student is promoted.
    same = promote(tmp_path, "same", {"exact_match": 0.9}, rules, eval_set="a" * 64)
    assert same["promoted"] and same["champion_after"] == same["version"]
    assert same["rules"][1]["status"] == "passed" and same["rules"][1]["threshold"] == pytest.approx(0.65)


# ----- seeded property test -----------------------------------------------------------


def oracle(rule: dict, student: dict, teacher: dict | None, champion: dict | None) -> tuple[str, float | None]:
    """The rule semantics written out a second time, from the spec, independently of tasks/gate.py.

    Returns (status, bound); status is passed / failed / not_evaluable / skipped (not evaluable, no champion).
    """

    def point(metrics, name):
        raw = metrics.get(name)
        return raw["value"] if isinstance(raw, dict) else raw

    hib = rule.get("higher_is_better", True)
    value = point(student, rule["metric"])
    if value is None or math.isnan(value):
        return "failed", None
    kind = rule["kind"]
    if kind == "absolute":
        bound = rule["threshold"]
    elif kind == "relative_to_teacher":
        ref = None if teacher is None else point(teacher, rule["metric"])
        if ref is None or math.isnan(ref):
            return "not_evaluable", None
        bound = rule["threshold"] * ref
    else:
        if champion is None:
            return "skipped", None
        ref = point(champion, rule["metric"])
        if ref is None or math.isnan(ref):
            return "not_evaluable", None
        sign = 1 if hib else -1
        bound = ref + sign * rule.get("margin", 0.0) if kind == "relative_to_champion" else ref - sign * rule.get("tolerance", 0.0)
        raw = student[rule["metric"]]
        if rule.get("use_interval") and isinstance(raw, dict) and raw.get("ci_low") is not None:
            value = raw["ci_low"] if hib else raw["ci_high"]
    if math.isnan(value):
        return "failed", bound
    return ("passed" if (value >= bound if hib else value <= bound) else "failed"), bound


def oracle_decision(rules: list[dict], statuses: list[str], require_all: bool) -> bool:
    """The decision rule from tasks/gate.py's docstring, written out again."""
    passed = [s == "passed" for s in statuses]
    if require_all:
        return any(passed) and all(s in ("passed", "skipped") for s in statuses)
    floors = [s for rule, s in zip(rules, statuses) if rule["kind"] in ("absolute", "relative_to_teacher")]
    return any(passed) and (not floors or "passed" in floors)


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
            assert got.status == ("not_evaluable" if want == "skipped" else want), ctx
            assert got.skipped is (want == "skipped"), ctx
            assert got.passed is (want == "passed"), ctx
            assert got.reason, ctx
            if bound is not None and not math.isnan(bound):
                assert got.threshold == pytest.approx(bound), ctx
        statuses = [want for want, _ in expected]
        assert decision.promoted is oracle_decision(rules, statuses, require_all), ctx
        outcomes.add((require_all, decision.promoted))
    assert outcomes == {(True, True), (True, False), (False, True), (False, False)}, "generator covers every outcome"


# ----- config errors ------------------------------------------------------------------


def test_unknown_metric_is_rejected_with_rule_and_known_names():
    cfg = gate({"metric": "exact_match", "kind": "absolute", "threshold": 0.2}, {"name": "bleu gate", "metric": "bleu", "kind": "absolute", "threshold": 0.2})
    gate({"metric": "exact_match", "kind": "absolute", "threshold": 0.2}).validate_metrics(KNOWN)  # known: no error
    with pytest.raises(GateConfigError) as err:
        cfg.validate_metrics(KNOWN)
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
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
