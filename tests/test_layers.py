"""Imports point downward: flows → tasks (stages → shared libraries and infrastructure) → storage.

Read from the source (every import statement, function-level ones included), so
a hidden import cannot dodge the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The shared layer of tasks/: libraries (configs, contracts, objectives, metrics, models) and infrastructure (the
# stage cache, Ray, logging, tracking, run folders). Everything else under tasks/ is a stage package or module.
SHARED = {
    "tasks.config", "tasks.config_base", "tasks.contracts", "tasks.stage_cache", "tasks.identity", "tasks.faults",
    "tasks.runs", "tasks.models", "tasks.objectives", "tasks.gate", "tasks.prompting", "tasks.textnorm",
    "tasks.ray_runtime", "tasks.ray_logs", "tasks.user_errors_log", "tasks.tracking", "tasks.report", "tasks.model_card",
    "tasks.approval",
}
# Stage modules the shared layer may read: metric definitions (gate rules, reports and cards name them) and the
# config models that PipelineConfig composes.
SHARED_MAY_IMPORT = {"tasks.evaluate.metrics", "tasks.augment.config", "tasks.augment.loss", "tasks.curate.config",
                     "tasks.expand.config", "tasks.onpolicy.config"}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _graph(folder: str) -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in (REPO / folder).rglob("*.py")}


def test_storage_imports_nothing_above_it():
    bad = {m: sorted(d for d in deps if _within(d, "tasks") or _within(d, "flows")) for m, deps in _graph("storage").items()}
    assert not {m: d for m, d in bad.items() if d}


def test_tasks_never_import_flows():
    bad = {m: sorted(d for d in deps if _within(d, "flows")) for m, deps in _graph("tasks").items()}
    assert not {m: d for m, d in bad.items() if d}


def test_shared_layer_does_not_import_stages():
    def is_shared(name: str) -> bool:
        return any(_within(name, s) for s in SHARED)

    bad = {}
    for module, deps in _graph("tasks").items():
        if not is_shared(module):
            continue
        stage_deps = sorted(d for d in deps if _within(d, "tasks") and not is_shared(d) and d != "tasks"
                            and not any(_within(d, allowed) for allowed in SHARED_MAY_IMPORT))
        if stage_deps:
            bad[module] = stage_deps
    assert not bad, f"shared modules importing stage internals: {bad}"
