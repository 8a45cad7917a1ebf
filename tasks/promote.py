"""Gate and promotion stage: apply the rules, register the student, move the champion alias."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.registry import ModelRegistry, RegistryEntry
from tasks.config import PromotionConfig
from tasks.gate import GateDecision, evaluate_gate
from tasks.model_card import write_card_for_entry


def run_promotion_stage(cfg: PromotionConfig, registry_dir: str, student_dir: str, metrics: dict[str, Any],
                        lineage: dict[str, Any], log_fn=print, approve=None) -> dict[str, Any]:
    """Every evaluated student is registered as the challenger; it becomes champion only if the gate passes
    (and, when `approve` is given, a person approves). Champion rules compare with the champion only when both
    were scored on the same evaluation set (`eval_set_sha256` in `lineage` and in the champion's lineage);
    otherwise they are not evaluable and the gate decides as tasks/gate.py describes."""
    registry = ModelRegistry(Path(registry_dir))
    champion = registry.alias("champion")
    same = _registered_with_train_key(registry, lineage.get("train_key"))
    if same is not None and champion is not None and champion.version == same.version:
        # A scheduled run with nothing new: the student is the champion already; no second copy, no self-comparison.
        record = {"promoted": False, "rules": same.decision.get("rules", []), "champion_before": champion.version,
                  "champion_after": champion.version, "version": same.version, "registry_path": same.path, "already_registered": True,
                  "summary": f"no new student: {same.version} was trained from the same labels, student and settings "
                             "and is already the champion; registry unchanged"}
        log_fn(f"gate: {record['summary']}")
        return record
    decision = _decide(cfg, metrics, lineage, champion)
    record = decision.model_dump()
    record["champion_before"] = champion.version if champion else None
    if decision.promoted and approve is not None:
        record["approval"] = approve(record)
        if not record["approval"]["approved"]:
            record["promoted"] = False
            record["summary"] += f"; not approved ({record['approval'].get('comment') or record['approval'].get('approver')})"
        else:
            # The champion may have moved while we waited for a person: decide again against the current one.
            now = registry.alias("champion")
            if (now.version if now else None) != record["champion_before"]:
                again = _decide(cfg, metrics, lineage, now)
                record.update({k: v for k, v in again.model_dump().items() if k in ("promoted", "rules", "summary")})
                record["champion_before"] = now.version if now else None
    # The same student evaluated again (e.g. after the gate rules changed) keeps its version: no second copy.
    entry = same if same is not None else registry.register(
        student_dir, lineage=lineage, metrics=metrics, decision=record, before_publish=write_card_for_entry)  # with its model card
    if same is not None:
        record["already_registered"] = True
    registry.set_alias("challenger", entry.version, reason="latest evaluated student")
    if record["promoted"]:
        registry.promote(entry.version, reason=record["summary"])
    record["version"] = entry.version
    record["registry_path"] = entry.path
    record["champion_after"] = registry.alias("champion").version if registry.alias("champion") else None
    for rule in record["rules"]:  # the decision made last (after an approval wait it may be a second one)
        log_fn(f"gate: {_STATUS_WORD[rule['status']]} {rule['name']}: {rule['reason']}")
    log_fn(f"gate: {'promoted' if record['promoted'] else 'not promoted'} {entry.version} — {record['summary']}")
    return record


_STATUS_WORD = {"passed": "PASS", "failed": "FAIL", "not_evaluable": "N/A "}


def _decide(cfg: PromotionConfig, metrics: dict[str, Any], lineage: dict[str, Any], champion: RegistryEntry | None) -> GateDecision:
    """The gate against `champion`; champion rules need the challenger and champion scored on the same evaluation set."""
    return evaluate_gate(
        cfg.gate, student=metrics["student"], teacher=metrics.get("teacher"),
        champion=champion.metrics.get("student", {}) if champion else None,
        student_eval_set=lineage.get("eval_set_sha256"),
        champion_eval_set=champion.lineage.get("eval_set_sha256") if champion else None,
    )


def _registered_with_train_key(registry: ModelRegistry, train_key: str | None):
    """The version trained from the same content-keyed training stage (same labels, student, settings), if any."""
    if not train_key:
        return None
    return next((e for e in reversed(registry.versions()) if e.lineage.get("train_key") == train_key), None)
