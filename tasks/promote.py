"""Gate and promotion stage: apply the rules, register the student, move the champion alias."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.registry import ModelRegistry
from tasks.config import PromotionConfig
from tasks.gate import evaluate_gate


def run_promotion_stage(cfg: PromotionConfig, registry_dir: str, student_dir: str, metrics: dict[str, Any],
                        lineage: dict[str, Any], log_fn=print, approve=None) -> dict[str, Any]:
    """Every evaluated student is registered as the challenger; it becomes champion only if the gate passes
    (and, when `approve` is given, a person approves)."""
    registry = ModelRegistry(Path(registry_dir))
    champion = registry.alias("champion")
    champion_metrics = champion.metrics.get("student", {}) if champion else None
    decision = evaluate_gate(cfg.gate, student=metrics["student"], teacher=metrics.get("teacher"), champion=champion_metrics)
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
                again = evaluate_gate(cfg.gate, student=metrics["student"], teacher=metrics.get("teacher"),
                                      champion=now.metrics.get("student", {}) if now else None)
                record.update({k: v for k, v in again.model_dump().items() if k in ("promoted", "rules", "summary")})
                record["champion_before"] = now.version if now else None
    entry = registry.register(student_dir, lineage=lineage, metrics=metrics, decision=record)
    registry.set_alias("challenger", entry.version, reason="latest evaluated student")
    if record["promoted"]:
        registry.promote(entry.version, reason=record["summary"])
    record["version"] = entry.version
    record["registry_path"] = entry.path
    record["champion_after"] = registry.alias("champion").version if registry.alias("champion") else None
    for rule in decision.rules:
        log_fn(f"gate: {'PASS' if rule.passed else 'FAIL'} {rule.name}: {rule.reason}")
    log_fn(f"gate: {'promoted' if record['promoted'] else 'not promoted'} {entry.version} — {record['summary']}")
    return record
