"""Optional lm-eval-harness tasks on the student; skipped, with a reason, when the harness cannot run.

lm-eval-harness is not a dependency: it is large and its tasks download datasets from the
Hugging Face hub. When it is missing, or a task cannot load (offline, unknown name), the run
goes on and metrics.json records {"status": "skipped", "reason": ...} so nobody mistakes an
absent score for a pass.
"""

from __future__ import annotations

import math
from typing import Any

from tasks.evaluate.metrics import lm_eval_metric_name

# Headline metric per task, first match wins (lm-eval 0.4 keys are "<metric>,<filter>").
PREFERRED = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none", "f1,none", "mcc,none")
Z95 = 1.959963984540054


def run_lm_eval(model_dir: str, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
                log_fn=print) -> dict[str, Any]:
    """Run the named tasks on a local HF model folder. Returns
    {"status": "ok" | "skipped", "tasks": [...], "reason": str | None, "metrics": {"lm_eval:<task>": summary}, "results": {...}}."""
    tasks = list(tasks)
    try:
        import lm_eval
    except ImportError as exc:
        return _skipped(tasks, f"lm-eval-harness is not installed ({exc}); `pip install lm-eval` to run these tasks", log_fn)
    try:
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=tasks,
                                      limit=limit, batch_size=batch_size, log_samples=False)
    except Exception as exc:  # the harness raises many types (offline hub, unknown task, dataset errors)
        return _skipped(tasks, f"lm-eval-harness could not run ({exc.__class__.__name__}: {exc}); offline runs need the "
                               "tasks' datasets in the Hugging Face cache", log_fn)
    if not out or "results" not in out:  # simple_evaluate returns None on non-zero ranks
        return _skipped(tasks, "lm-eval-harness returned no results", log_fn)
    parsed = parse_lm_eval_results(out, tasks)
    log_fn("eval: lm-eval " + ", ".join(f"{name} {s['value']:.3f}" for name, s in parsed["metrics"].items()))
    return parsed


def _skipped(tasks: list[str], reason: str, log_fn) -> dict[str, Any]:
    log_fn(f"eval: lm-eval tasks {', '.join(tasks)} SKIPPED: {reason}")
    return {"status": "skipped", "tasks": tasks, "reason": reason, "metrics": {}, "results": {}}


def _num(x) -> float | None:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def parse_lm_eval_results(out: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """One headline metric per task as {"value", "ci_low", "ci_high", "n"}: a normal 95% interval from the
    harness's stderr (not a bootstrap), plus which harness key it came from."""
    results, counts = out.get("results", {}), out.get("n-samples", {})
    metrics, raw, missing = {}, {}, []
    for task in tasks:
        res = results.get(task)
        if not res:
            missing.append(task)
            continue
        raw[task] = {k: v for k, v in res.items() if _num(v) is not None}
        key = next((k for k in PREFERRED if _num(res.get(k)) is not None), None)
        if key is None:
            key = next((k for k in res if "_stderr" not in k and k != "alias" and _num(res[k]) is not None), None)
        if key is None:
            missing.append(task)
            continue
        value = _num(res[key])
        name, _, filt = key.partition(",")
        stderr = _num(res.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr"))
        n = counts.get(task, {}).get("effective") if isinstance(counts.get(task), dict) else None
        metrics[lm_eval_metric_name(task)] = {
            "value": value,
            "ci_low": value - Z95 * stderr if stderr is not None else float("nan"),
            "ci_high": value + Z95 * stderr if stderr is not None else float("nan"),
            "n": int(n) if n is not None else 0,
            "source": key,
        }
    status = "ok" if not missing else ("partial" if metrics else "skipped")
    reason = f"no results for task(s): {', '.join(missing)}" if missing else None
    return {"status": status, "tasks": tasks, "reason": reason, "metrics": metrics, "results": raw}
