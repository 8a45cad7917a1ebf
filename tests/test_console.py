"""The CLI console (flows/console.py): the summary read from run.json, what reaches the console and the run log.
The CLI's whole console on tiny models (short, no line twice, no traceback, the run.json path last) is checked on
every `stillhouse run` of tests/test_formats_flow.py."""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from pathlib import Path

from flows.console import Console, notify_stage_started, render_summary
from flows.progress import StageProgress
from tasks import ray_logs


def _stat(value, low, high):
    return {"value": value, "ci_low": low, "ci_high": high, "n": 300}


def _fabricated_run(root: Path) -> Path:
    """A finished run as the flow leaves it: run.json, metrics.json, report.md, and a registry whose v0001 was the
    champion before this run's v0002."""
    run_dir = root / "runs" / "nightly"
    run_dir.mkdir(parents=True)
    versions = root / "registry" / "versions"
    (versions / "v0001").mkdir(parents=True)
    (versions / "v0002").mkdir()
    (versions / "v0001" / "entry.json").write_text(json.dumps(
        {"version": "v0001", "metrics": {"student": {"exact_match": _stat(0.65, 0.6, 0.7), "perplexity": _stat(2.5, 2.25, 2.75)}}}))
    metrics = {"num_examples": 300,
               "student": {"exact_match": _stat(0.7133, 0.66, 0.7633), "kl_to_teacher": _stat(0.4211, 0.39, 0.455),
                           "perplexity": _stat(1.8123, 1.7, 1.93), "lm_eval:arc": _stat(0.31, 0.28, 0.34)},
               "teacher": {"exact_match": _stat(0.9767, 0.96, 0.99), "perplexity": _stat(1.21, 1.18, 1.25)}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "report.md").write_text("# report")
    decision = {
        "promoted": False, "version": "v0002", "champion_before": "v0001", "champion_after": "v0001",
        "registry_path": str(versions / "v0002"), "report": {"md": str(run_dir / "report.md")},
        "summary": "not promoted: 1 of 3 rule(s) failed: beats-champion",
        "rules": [
            {"name": "quality-floor", "status": "passed", "passed": True, "reason": "exact_match 0.7133 >= 0.5"},
            {"name": "beats-champion", "status": "failed", "passed": False, "reason": "perplexity 1.8123 > champion 1.5"},
            {"name": "near-teacher", "status": "not_evaluable", "passed": False, "reason": "not evaluable: teacher metric is NaN"},
        ],
    }
    # run.json's own headline metrics are plain numbers: the table must come from metrics.json (intervals).
    run = {"status": "completed", "run_name": "nightly", "run_dir": str(run_dir), "metrics_file": str(run_dir / "metrics.json"),
           "metrics": {"student": {"exact_match": 0.7133}}, "decision": decision, "reused_stages": ["teacher-labels"],
           "wall_seconds": 754.2}
    (run_dir / "run.json").write_text(json.dumps(run))
    return run_dir / "run.json"


def test_summary_is_read_from_run_json_metrics_and_the_champions_entry(tmp_path):
    run_json = _fabricated_run(tmp_path)
    run_dir = run_json.parent
    lines = render_summary(run_json, log_path=run_dir / "run.log")
    assert lines == [
        "",
        "summary of run nightly (12m34s); reused: teacher-labels",
        "  metric         better  student               teacher               champion v0001",
        "  exact_match    higher  0.713 [0.660, 0.763]  0.977 [0.960, 0.990]  0.650 [0.600, 0.700]",
        "  kl_to_teacher  lower   0.421 [0.390, 0.455]  —                     —",
        "  perplexity     lower   1.812 [1.700, 1.930]  1.210 [1.180, 1.250]  2.500 [2.250, 2.750]",
        "  lm_eval:arc    higher  0.310 [0.280, 0.340]  —                     —",
        "  value [95% interval] over 300 held-out examples",
        "decision: v0002 not promoted — 1 of 3 rule(s) failed: beats-champion",
        "  PASS quality-floor: exact_match 0.7133 >= 0.5",
        "  FAIL beats-champion: perplexity 1.8123 > champion 1.5",
        "  N/A  near-teacher: not evaluable: teacher metric is NaN",
        "champion: v0001 (unchanged)",
        f"report:   {run_dir / 'report.md'}",
        f"log:      {run_dir / 'run.log'}",
        "run.json:",
    ]


def test_summary_of_a_first_promotion_and_of_a_failed_run(tmp_path):
    run_json = _fabricated_run(tmp_path)
    run = json.loads(run_json.read_text())
    run["decision"].update(promoted=True, champion_before=None, champion_after="v0002", summary="promoted: 1 of 1 rule(s) passed",
                           rules=[{"name": "quality-floor", "status": "passed", "reason": "ok"}])
    run_json.write_text(json.dumps(run))
    lines = render_summary(run_json)
    assert lines[2].endswith("champion") and lines[3].endswith("—"), "no champion before: an empty column"
    assert "decision: v0002 promoted — 1 of 1 rule(s) passed" in lines and "champion: none → v0002" in lines
    assert not any(line.startswith("log:") for line in lines)

    run_json.write_text(json.dumps({"status": "failed", "run_name": "nightly", "failed_stage": "train-student", "error": "boom"}))
    assert render_summary(run_json, log_path="x.log") == ["run nightly failed in train-student: boom", "log:      x.log"]


def _record(name: str, level: int, msg: str, **extra) -> logging.LogRecord:
    return logging.makeLogRecord({"name": name, "levelno": level, "levelname": logging.getLevelName(level), "msg": msg,
                                  "args": None, "created": time.time(), **extra})


def test_quiet_console_keeps_stage_lines_warnings_and_errors_and_sends_worker_lines_to_the_log(tmp_path):
    """Records go through the root logger's handlers as Prefect's would; worker batches through Ray's dispatcher, where
    a stand-in takes the place of Ray's driver printer (log_to_driver) and a forwarder plays the task's ray_output_to."""
    dispatcher = ray_logs._dispatcher()
    echoed: list[dict] = []
    dispatcher.add_handler(ray_logs.RAY_PRINTER, echoed.append)  # Ray's printer: the second copy of every worker line
    root = logging.getLogger()
    task = {"task_run_id": "tr-1", "task_name": "teacher-labels", "task_run_name": "teacher-labels-abc"}
    out = io.StringIO()
    run_dir = tmp_path / "runs" / "r1"
    try:
        with Console(tmp_path, progress=StageProgress(stream=out, enabled=False)) as console, \
                ray_logs.ray_output_to(lambda line: root.handle(_record("prefect.task_runs", logging.INFO, line, **task))):
            first_log = console.run_log.path
            notify_stage_started("teacher-labels", "tr-1", str(run_dir))
            root.handle(_record("prefect.task_runs", logging.INFO, "teacher-labels: reusing finished labels /x (same inputs)", **task))
            for batch in (
                {"actor_name": "TeacherReplica", "pid": 7, "lines": ["INFO 12-01 10:00:00 [llm_engine.py:1] Initializing an engine"]},
                {"actor_name": "TeacherReplica", "pid": 7, "lines": ["WARNING 12-01 10:00:01 [cpu.py:2] Pin memory is not supported"]},
                {"actor_name": "TeacherReplica", "pid": 7, "lines": ["ERROR 12-01 10:00:02 [core.py:3] EngineCore died"]},
                {"actor_name": "TeacherReplica", "pid": 7, "lines": ["ERROR 12-01 10:00:02 [core.py:3] EngineCore died"]},
            ):
                dispatcher.emit(batch)
            for _ in range(2):
                root.handle(_record("prefect.flow_runs", logging.WARNING, "tracking: could not record the run"))
            try:
                raise RuntimeError("disk full")
            except RuntimeError as exc:
                for name in ("prefect.task_runs", "prefect.flow_runs"):  # Prefect logs one exception per task and flow
                    root.handle(_record(name, logging.ERROR, "Task run failed with exception", exc_info=(type(exc), exc, exc.__traceback__)))
            root.handle(_record("prefect.task_runs", logging.INFO, "Finished in state Completed()", **task))
            root.handle(_record("prefect", logging.INFO, "Starting temporary server on http://127.0.0.1:8105"))
        assert echoed == [], "Ray's own driver printer is off while the quiet console runs"
    finally:
        dispatcher.remove_handler(ray_logs.RAY_PRINTER)

    lines = out.getvalue().splitlines()
    assert lines[0] == f"log of this run (everything, vLLM and Ray output included): {run_dir / 'run.log'}"
    assert lines[1].endswith("  teacher-labels    started") and "  teacher-labels    reused in " in lines[-1], lines
    shown = "\n".join(lines)
    assert shown.count("tracking: could not record the run") == 1 and "WARNING  prefect.flow_runs: tracking" in shown
    assert shown.count("RuntimeError: disk full") == 1 and shown.count("Traceback") == 1
    for chatter in ("Initializing an engine", "Pin memory", "EngineCore died", "reusing finished", "Starting temporary server",
                    "Finished in state"):
        assert chatter not in shown, chatter
    assert len(lines) == len(set(lines)), Counter(lines).most_common(3)

    log = (run_dir / "run.log").read_text()  # moved into the run folder when the stage named it
    assert not first_log.exists()
    assert log.count("Initializing an engine") == 1 and log.count("Pin memory is not supported") == 1, "raw copy once, no forwarded copy"
    assert log.count("EngineCore died") == 1, "a repeated batch of one process is written once"
    assert "reusing finished" in log and "Starting temporary server" in log and "teacher-labels    started" in log


def test_verbose_console_leaves_the_terminal_to_prefect_and_ray(tmp_path):
    dispatcher = ray_logs._dispatcher()
    echoed: list[dict] = []
    dispatcher.add_handler(ray_logs.RAY_PRINTER, echoed.append)
    out = io.StringIO()
    try:
        with Console(tmp_path, verbose=True, progress=StageProgress(stream=out, enabled=False)) as console:
            dispatcher.emit({"actor_name": "TeacherReplica", "pid": 7, "lines": ["INFO engine up"]})
            log_path = console.run_log.path
    finally:
        dispatcher.remove_handler(ray_logs.RAY_PRINTER)
    assert len(echoed) == 1, "Ray's printer still prints"
    assert "[TeacherReplica pid=7] INFO engine up" in log_path.read_text(), "and the run log has the line too"


def test_ray_printer_registered_later_is_swapped_and_restored():
    """ray.init registers its printer after the console started (the stages start Ray lazily)."""
    dispatcher = ray_logs._dispatcher()
    printer, sink = [], []
    with ray_logs.driver_echo_to(sink.append) as swapped:
        assert swapped
        dispatcher.add_handler(ray_logs.RAY_PRINTER, printer.append)
        dispatcher.emit({"pid": 1, "lines": ["x"]})
    dispatcher.emit({"pid": 1, "lines": ["y"]})
    dispatcher.remove_handler(ray_logs.RAY_PRINTER)
    assert [d["lines"] for d in sink] == [["x"]] and [d["lines"] for d in printer] == [["y"]]


def test_a_second_run_in_the_process_gets_prefect_info_records_again():
    """After a run the CLI quiets Prefect for the process's exit; the next run in the same process (a notebook, a
    test session) must get its INFO records back, or its stages' "done" lines never reach the console."""
    from flows import cli

    logger = logging.getLogger("prefect")
    before = logger.level
    try:
        logger.setLevel(logging.INFO)
        cli._quiet_prefect_until_exit()
        assert not logger.isEnabledFor(logging.INFO)
        cli._restore_prefect_level()
        assert logger.isEnabledFor(logging.INFO) and logger.level == logging.INFO
        cli._restore_prefect_level()  # nothing to undo: unchanged
        assert logger.level == logging.INFO
    finally:
        logger.setLevel(before)
