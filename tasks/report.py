"""Per-run report: report.md (metrics with intervals, the gate's rules, links) and report.png (metric bars
with 95% whiskers, plus the training curve). The flow publishes the same markdown as a Prefect artifact."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from storage.atomic import tmp_path_for
from tasks.evaluate.metrics import LOWER_IS_BETTER, METRIC_NAMES

WHO = ("student", "teacher", "champion")
COLORS = {"student": "#1f77b4", "teacher": "#7f7f7f", "champion": "#ff7f0e"}


def write_report(run_dir: Path, metrics: dict, decision: dict, champion_metrics: dict | None, train_log: Path, *,
                 files: Mapping[str, str | Path] | None = None, reused_stages: list[str] | None = None) -> dict:
    """Write <run_dir>/report.md and <run_dir>/report.png.

    metrics: the evaluation's metrics.json content ({"student": {...}, "teacher": {...}, ...});
    decision: run_promotion_stage's record (promoted, summary, rules, version, ...);
    champion_metrics: the champion's student metrics before this run (or its whole metrics dict), None if none;
    train_log: train_log.jsonl (one JSON object per logged step: step, loss, loss_<part>, ...);
    files: extra or overriding links {label: path} (e.g. {"eval/metrics.json": evaluated["metrics_file"]} when
    stage outputs live outside the run folder); by default the run-folder layout is linked where it exists;
    reused_stages: stages whose outputs came from the content-keyed cache (said in the report).
    Returns {"report_md", "report_png", "markdown", "table"}; "table" holds comparison_rows() for a Prefect table artifact."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    champion = _champion_student(champion_metrics)
    sides = {"student": metrics.get("student", {}), "teacher": metrics.get("teacher", {}), "champion": champion}
    curve = read_train_log(train_log)
    png = run_dir / "report.png"
    _atomic_savefig(lambda path: plot_report(path, sides, curve, champion_label=_champion_label(decision)), png)
    markdown = render_markdown(run_dir, metrics, decision, champion, train_log, png, files, reused_stages)
    md = run_dir / "report.md"
    tmp = tmp_path_for(md)
    tmp.write_text(markdown)
    tmp.replace(md)
    return {"report_md": str(md), "report_png": str(png), "markdown": markdown, "table": comparison_rows(metrics, champion)}


def comparison_rows(metrics: Mapping, champion_metrics: Mapping | None) -> list[dict[str, Any]]:
    """Student vs teacher vs champion, one row per metric and model (value, ci_low, ci_high, n); None where absent.
    JSON-safe (NaN becomes None) for create_table_artifact."""
    sides = {"student": metrics.get("student", {}), "teacher": metrics.get("teacher", {}), "champion": _champion_student(champion_metrics)}
    rows = []
    for m in metric_order(sides):
        for who in WHO:
            st = _stat(sides[who], m)
            if st is None:
                continue
            clean = {k: (round(float(v), 6) if _finite(v) else None) for k, v in st.items() if k != "n"}
            rows.append({"metric": m, "model": who, **clean, "n": st.get("n"),
                         "better": "lower" if m in LOWER_IS_BETTER else "higher"})
    return rows


def _champion_student(champion_metrics: Mapping | None) -> dict | None:
    if not champion_metrics:
        return None
    inner = champion_metrics.get("student")
    return dict(inner) if isinstance(inner, Mapping) else dict(champion_metrics)


def _champion_label(decision: Mapping) -> str:
    before = decision.get("champion_before")
    return f"champion ({before})" if before else "champion"


def metric_order(sides: Mapping[str, Mapping | None]) -> list[str]:
    """Known metrics in METRIC_NAMES order, then any others (lm_eval:<task>, ...) alphabetically."""
    present = {m for s in sides.values() if s for m, v in s.items() if isinstance(v, (Mapping, int, float))}
    return [m for m in METRIC_NAMES if m in present] + sorted(present - set(METRIC_NAMES))


def _stat(side: Mapping | None, metric: str) -> dict | None:
    if not side or metric not in side:
        return None
    raw = side[metric]
    if isinstance(raw, Mapping):
        return {"value": raw.get("value"), "ci_low": raw.get("ci_low"), "ci_high": raw.get("ci_high"), "n": raw.get("n")}
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return {"value": float(raw), "ci_low": None, "ci_high": None, "n": None}
    return None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.4g}"
    return str(x)


def format_cell(stat: dict | None) -> str:
    """'0.4133 [0.3600, 0.4633] (n=300)'; '—' when the metric is absent."""
    if stat is None:
        return "—"
    text = _num(stat["value"])
    if _finite(stat.get("ci_low")) and _finite(stat.get("ci_high")):
        text += f" [{_num(stat['ci_low'])}, {_num(stat['ci_high'])}]"
    if stat.get("n") is not None:
        text += f" (n={stat['n']})"
    return text


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(run_dir: Path, metrics: Mapping, decision: Mapping, champion: Mapping | None, train_log: Path, png: Path,
                    files: Mapping[str, str | Path] | None = None, reused_stages: list[str] | None = None) -> str:
    sides = {"student": metrics.get("student", {}), "teacher": metrics.get("teacher", {}), "champion": champion}
    version = decision.get("version", "?")
    verdict = "Promoted" if decision.get("promoted") else "Not promoted"
    lines = [f"# Distillation report: {run_dir.name}", "",
             f"**{verdict}: {version}** — {decision.get('summary', '')}", ""]
    approval = decision.get("approval")
    if isinstance(approval, Mapping):
        who = approval.get("approver") or "nobody"
        lines += [f"Approval: {'approved' if approval.get('approved') else 'not approved'} by {who}"
                  + (f" — {approval['comment']}" if approval.get("comment") else ""), ""]
    lines += [f"Champion before: {decision.get('champion_before') or 'none'}; after: {decision.get('champion_after') or 'none'}.", ""]
    if reused_stages is not None:
        lines += [("Reused from the stage cache (same inputs and settings as an earlier run): " + ", ".join(reused_stages) + "."
                   if reused_stages else "Every stage ran; nothing was reused from the stage cache."), ""]

    lines += ["## Metrics", "",
              f"Held-out examples: {metrics.get('num_examples', '?')}. Each cell: value [95% CI] (n). "
              "Intervals are percentile bootstraps over examples (lm_eval:* rows: ±1.96 × the harness's stderr).", "",
              f"| metric | better | student | teacher | {_champion_label(decision)} |", "|---|---|---|---|---|"]
    for m in metric_order(sides):
        better = "lower" if m in LOWER_IS_BETTER else "higher"
        lines.append(f"| {m} | {better} | " + " | ".join(format_cell(_stat(sides[w], m)) for w in WHO) + " |")
    if champion is None:
        lines += ["", "No champion before this run: champion rules are not evaluable and were skipped (tasks/gate.py)."]
    notes = _eval_notes(metrics)
    if notes:
        lines += [""] + [f"- {n}" for n in notes]

    lines += ["", "## Gate rules", "", "| rule | metric | kind | value | threshold | passed | reason |", "|---|---|---|---|---|---|---|"]
    for r in decision.get("rules", []):
        lines.append(f"| {_cell(r.get('name'))} | {_cell(r.get('metric', ''))} | {_cell(r.get('kind', ''))} | {_num(r.get('value'))} | "
                     f"{_num(r.get('threshold'))} | {'n/a' if r.get('status') == 'not_evaluable' else 'pass' if r.get('passed') else 'FAIL'} | {_cell(r.get('reason', ''))} |")

    lines += ["", "## Files", "", f"![metrics and training curve]({png.name})", "", "| file | path |", "|---|---|"]
    for label, path in _files(run_dir, train_log, png, decision, files):
        rel = _relative(path, run_dir)
        lines.append(f"| [{label}]({rel}) | `{path}` |")
    return "\n".join(lines) + "\n"


def _eval_notes(metrics: Mapping) -> list[str]:
    notes = []
    sampling = metrics.get("sampling")
    if isinstance(sampling, Mapping) and sampling.get("seeds"):
        notes.append(f"rouge_l_sampled: temperature {sampling.get('temperature')}, seeds {sampling.get('seeds')}, "
                     "ROUGE-L averaged over seeds per example (student only).")
    if "perplexity" in metrics.get("student", {}):
        notes.append("perplexity: the first reference (plus EOS) under the student, teacher-forced; exp(total NLL / total tokens).")
    lm = metrics.get("lm_eval")
    if isinstance(lm, Mapping) and lm.get("status") != "ok":
        notes.append(f"lm-eval-harness tasks {', '.join(lm.get('tasks', []))}: **{lm.get('status')}** — {lm.get('reason')}")
    return notes


def _files(run_dir: Path, train_log: Path, png: Path, decision: Mapping, files: Mapping[str, str | Path] | None) -> list[tuple[str, Path]]:
    train_log = Path(train_log)
    extra = {label: Path(p) for label, p in (files or {}).items() if p}
    candidates = [
        ("run.json", run_dir / "run.json"),  # written by the flow when the run finishes
        ("config.json", run_dir / "config.json"),
        ("eval/metrics.json", run_dir / "eval" / "metrics.json"),
        ("eval/generations.jsonl", run_dir / "eval" / "generations.jsonl"),
        ("train/train_log.jsonl", train_log),
        ("student checkpoint", train_log.parent / "student"),
        ("labels (train manifest)", run_dir / "labels" / "train" / "manifest.json"),
        ("report.png", png),
    ]
    out = [(label, extra.pop(label, p)) for label, p in candidates]
    out = [(label, p) for label, p in out if label == "run.json" or p.exists()] + list(extra.items())
    if decision.get("registry_path"):
        out.append((f"registry entry {decision.get('version', '')}".strip(), Path(decision["registry_path"])))
    return out


def _relative(path: Path, base: Path) -> str:
    import os

    try:
        return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive
        return Path(path).resolve().as_uri()


def read_train_log(path: Path | None) -> list[dict[str, Any]]:
    """Rows of train_log.jsonl; unreadable lines are skipped, a missing file gives []."""
    if path is None or not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and _finite(row.get("step")):
            rows.append(row)
    return rows


def _atomic_savefig(draw, path: Path) -> None:
    tmp = tmp_path_for(path)  # savefig is told the format, so the suffix does not matter
    draw(tmp)
    tmp.replace(path)


def plot_report(path: Path, sides: Mapping[str, Mapping | None], curve: list[dict], champion_label: str = "champion") -> None:
    """Small multiples: one panel per metric (bars for student / teacher / champion with 95% whiskers),
    then the training loss and its parts against the step."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    names = metric_order(sides)
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig = plt.figure(figsize=(3.4 * cols + 0.6, 2.9 * rows + 3.4), dpi=110, layout="constrained")
    grid = GridSpec(rows + 1, cols, figure=fig, height_ratios=[1] * rows + [1.15])
    labels = {"student": "student", "teacher": "teacher", "champion": "champion"}

    for i, m in enumerate(names):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        xs, heights, errs, colors, ticks = [], [], [[], []], [], []
        missing = []
        for j, who in enumerate(WHO):
            st = _stat(sides.get(who), m)
            if st is None or not _finite(st["value"]):
                missing.append(j)
                continue
            v = float(st["value"])
            lo = float(st["ci_low"]) if _finite(st.get("ci_low")) else v
            hi = float(st["ci_high"]) if _finite(st.get("ci_high")) else v
            xs.append(j)
            heights.append(v)
            errs[0].append(max(v - lo, 0.0))
            errs[1].append(max(hi - v, 0.0))
            colors.append(COLORS[who])
            ticks.append(who)
        if xs:
            ax.bar(xs, heights, color=colors, width=0.65, yerr=errs, capsize=5, error_kw={"elinewidth": 1.2, "ecolor": "black"})
            top = max(h + e for h, e in zip(heights, errs[1]))
            for x, h, e in zip(xs, heights, errs[1]):
                ax.text(x, h + e + 0.02 * (top or 1), f"{h:.3g}", ha="center", va="bottom", fontsize=8)
            ax.set_ylim(0, (top or 1) * 1.18)
            for x in missing:
                ax.text(x, 0.02 * (top or 1), "n/a", ha="center", va="bottom", fontsize=8, color="grey")
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xticks(range(len(WHO)), [labels[w] for w in WHO], fontsize=8)
        ax.set_xlim(-0.6, len(WHO) - 0.4)
        arrow = "↓ lower is better" if m in LOWER_IS_BETTER else "↑ higher is better"
        ax.set_title(f"{m}\n{arrow}", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)

    ax = fig.add_subplot(grid[rows, :])
    if curve:
        steps = [r["step"] for r in curve]
        keys = ["loss"] + sorted(k for k in {k for r in curve for k in r} if k.startswith("loss_"))
        for k in keys:
            pts = [(r["step"], r[k]) for r in curve if _finite(r.get(k))]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, markersize=3,
                        linewidth=2.0 if k == "loss" else 1.2, label=k.removeprefix("loss_") if k != "loss" else "loss (total)")
        positive = all(r.get(k, 1) > 0 for r in curve for k in keys if _finite(r.get(k)))
        if positive:
            ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss" + (" (log scale)" if positive else ""))
        ax.legend(fontsize=8, loc="upper right")
        ax.set_xlim(min(steps), max(steps))
    else:
        ax.text(0.5, 0.5, "no training log", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title("Training curve (train_log.jsonl)", fontsize=10)
    ax.grid(alpha=0.3)
    champion_note = f"; {champion_label}" if sides.get("champion") else "; no champion before this run"
    fig.suptitle(f"Held-out metrics with 95% intervals{champion_note}", fontsize=11)
    fig.savefig(path, format="png")
    plt.close(fig)
