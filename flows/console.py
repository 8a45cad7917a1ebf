"""What `stillhouse run` / `demo` print, and where everything else goes.

The quiet console (the default) shows one line when each stage starts and when it finishes (done, reused or failed,
with its duration), warnings and errors, progress bars on a terminal (flows.progress), and at the end a summary read
from run.json and the files it names (`render_summary`). Everything else goes to the run's log file, which starts
as `<data_dir>/logs/<time>-<pid>.log` and moves to `<run_dir>/run.log` as soon as the first stage names the run
folder (so a run that fails in a later stage keeps its log there too):

| what | console | run log file | Prefect run log (UI) |
|---|---|---|---|
| the flow's and stages' INFO records, Prefect's own | no | yes | unchanged |
| WARNING and above, any logger | yes, once | yes | unchanged |
| worker lines (vLLM engines, Ray Train) forwarded by tasks.ray_logs.ray_output_to | no | no: the raw copy is there | unchanged |
| Ray's driver copy of the worker lines (log_to_driver's printer) | no | yes | not sent |
| Ray's driver logger ("ray") | WARNING and above | yes | not sent |

Why every worker line used to appear twice: `ray.init(log_to_driver=True)` registers a printer on Ray's log
dispatcher that writes each worker batch to the driver's stdout/stderr, and `ray_output_to` logs the same batch to
the Prefect run logger, whose records propagate to the root logger's PrefectConsoleHandler. `log_to_driver` must
stay on (it feeds the dispatcher, so the Prefect UI keeps the workers' lines); for the console only, Ray's printer
is swapped for one that writes to the log file (tasks.ray_logs.driver_echo_to) and Prefect's console handler is
replaced by ours, which drops forwarded lines (tasks.ray_logs.is_forwarded). The flow's `log_prints=True` turns
print() in the flow into Prefect records: it adds no copy of its own.

`--verbose` installs none of this (today's console: every line as Prefect and Ray print it); the log file is
written as well, and the summary follows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Mapping

from flows.progress import StageProgress

RUN_LOG_NAME = "run.log"
_listeners: list[Callable[[str, str, str | None], None]] = []
_started_runs: set[str] = set()


def stage_started() -> None:
    """Hook for the flow's tasks (flows.distill._log): tell a listening console that the current Prefect task
    started. No log record, so the Prefect run log does not change; a no-op when no console listens."""
    if not _listeners:
        return
    try:
        from prefect.context import TaskRunContext

        ctx = TaskRunContext.get()
    except Exception:
        return
    if ctx is None or ctx.task_run is None:
        return
    run_id = str(ctx.task_run.id)
    if run_id in _started_runs:
        return
    _started_runs.add(run_id)
    run_dir = ctx.parameters.get("run_dir") if isinstance(ctx.parameters, Mapping) else None
    notify_stage_started(ctx.task.name, run_id, run_dir)


def notify_stage_started(name: str, run_id: str, run_dir: str | None = None) -> None:
    """Tell listening consoles that stage `name` (Prefect task run `run_id`) started; `run_dir`: the run folder,
    when the task knows it."""
    for listener in list(_listeners):
        listener(name, run_id, run_dir)


# ----------------------------------------------------------------------------------------------------------------
# What reaches the console


FINISHED = "Finished in state "
REUSED = ": reusing finished "  # tasks.stage_cache.run_cached's line for a stage taken from the cache


def console_keeps(record: logging.LogRecord) -> bool:
    """Whether a log record is printed on the quiet console: warnings and errors, never a forwarded worker line
    (the run log has its raw copy) nor Prefect's "Finished in state" (a stage line instead)."""
    from tasks.ray_logs import is_forwarded

    if is_forwarded():
        return False
    if record.getMessage().startswith(FINISHED) and record.name in ("prefect.task_runs", "prefect.flow_runs"):
        return False
    return record.levelno >= logging.WARNING


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _clock() -> str:
    now = time.time()
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"


def _source(record: logging.LogRecord) -> str:
    for attr in ("task_run_name", "flow_run_name"):
        value = getattr(record, attr, None)
        if value and value != "<unknown>":
            return value
    return record.name


class _RecordFormatter(logging.Formatter):
    """'HH:MM:SS.mmm | LEVEL   | <task run, flow run or logger> - message' (Prefect's console layout)."""

    def __init__(self):
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self.formatTime(record, self.datefmt)}.{int(record.msecs):03d} | {record.levelname:<7} | {_source(record)} - {record.getMessage()}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        return text


class RunLog:
    """The run's log file: line-buffered, thread-safe, movable while open (a rename keeps the open file)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.write(text.rstrip("\n") + "\n")

    def worker_line(self, line: str) -> None:
        self.write(f"{_clock()} | worker  | {line}")

    def move_to(self, target: Path) -> bool:
        """Move the file to `target` (same filesystem: a rename); False, and the file stays, if that fails."""
        target = Path(target)
        with self._lock:
            if target == self.path:
                return True
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.path, target)
            except OSError:
                return False
            self.path = target
            return True

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _FileHandler(logging.Handler):
    """Every record into the run log, except forwarded worker lines (the run log has their raw copy)."""

    def __init__(self, run_log: RunLog):
        super().__init__(logging.NOTSET)
        self.run_log = run_log
        self.setFormatter(_RecordFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        from tasks.ray_logs import is_forwarded

        if is_forwarded():
            return
        try:
            self.run_log.write(self.format(record))
        except Exception:
            self.handleError(record)


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: "Console"):
        super().__init__(logging.NOTSET)
        self.console = console
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.on_record(record, self)
        except Exception:
            self.handleError(record)


def _is_console_handler(handler: logging.Handler) -> bool:
    """Handlers that print on the terminal: Prefect's console handler, Ray's, plain StreamHandlers on stdout/stderr
    (not file handlers nor pytest's capture handlers)."""
    if isinstance(handler, (logging.FileHandler, _ConsoleHandler, _FileHandler)):
        return False
    if type(handler).__name__ in ("PrefectConsoleHandler", "PlainRayHandler", "_SafeStreamHandler"):
        return True
    return type(handler) in (logging.StreamHandler, logging._StderrHandler) and getattr(handler, "stream", None) in (
        sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


class Console:
    """The CLI's console for one run (see the module docstring). Use as a context manager around the flow call."""

    def __init__(self, data_dir: str | Path, *, verbose: bool = False, progress: StageProgress | None = None):
        self.verbose = verbose
        self.progress = progress or StageProgress(enabled=False)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_log = RunLog(Path(data_dir).resolve() / "logs" / f"{stamp}-{os.getpid()}.log")
        self._stages: dict[str, dict[str, Any]] = {}  # task run id -> {"name", "start", "reused"}
        self._shown: set[str] = set()  # console lines already printed (no line twice)
        self._shown_errors: set[int] = set()  # exceptions already printed (Prefect logs one per task and flow)
        self._lock = threading.RLock()
        self._stack = ExitStack()
        self._restore: list[Callable[[], None]] = []
        self._last_finish: float | None = None
        self._log_named = False  # the log's path printed (once it is in the run folder)

    # ---- installation -------------------------------------------------------------------------------------------

    def __enter__(self) -> "Console":
        from tasks.ray_logs import driver_echo_to, ray_output_to

        root = logging.getLogger()
        file_handler = _FileHandler(self.run_log)
        root.addHandler(file_handler)
        self._restore.append(lambda: root.removeHandler(file_handler))
        self._stack.enter_context(ray_output_to(self.run_log.worker_line))
        if not self.verbose:
            self._quiet_loggers(root)
            self._stack.enter_context(driver_echo_to(self._worker_batch))
            self._quiet_progress_bars()
        _listeners.append(self._stage_started)
        self._restore.append(lambda: _listeners.remove(self._stage_started))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        while self._restore:
            self._restore.pop()()
        self.progress.close()

    def _quiet_loggers(self, root: logging.Logger) -> None:
        """Take the terminal from Prefect's and Ray's console handlers; their records reach ours through the root."""
        import ray  # noqa: F401  (configures the "ray" logger's own console handler on import: take it now)

        console_handler = _ConsoleHandler(self)
        root.addHandler(console_handler)
        self._restore.append(lambda: root.removeHandler(console_handler))
        loggers = [root] + [logger for logger in list(logging.root.manager.loggerDict.values()) if isinstance(logger, logging.Logger)]
        for logger in loggers:
            taken = [h for h in logger.handlers if _is_console_handler(h)]
            if not taken:
                continue
            for handler in taken:
                logger.removeHandler(handler)
            propagate = logger.propagate
            logger.propagate = True

            def restore(logger=logger, taken=taken, propagate=propagate):
                logger.propagate = propagate
                for handler in taken:
                    logger.addHandler(handler)

            self._restore.append(restore)

    def _quiet_progress_bars(self) -> None:
        """No Hugging Face download/save bars ("Writing model shards") on the quiet console."""
        try:
            from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
        except ImportError:
            return
        if not are_progress_bars_disabled():
            disable_progress_bars()
            self._restore.append(enable_progress_bars)
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            return
        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            self._restore.append(hf_logging.enable_progress_bar)

    # ---- lines ----------------------------------------------------------------------------------------------------

    def say(self, text: str, *, stamp: bool = True, echo: bool = False) -> None:
        """A console line. The console's own lines (stage lines) also go to the run log; an `echo` of a record or
        worker line that the run log has already is printed once at most."""
        line = f"{time.strftime('%H:%M:%S')}  {text}" if stamp else text
        with self._lock:
            if echo:
                if text in self._shown:
                    return
                self._shown.add(text)
            else:
                self.run_log.write(f"{_clock()} | console | {text}")
            self.progress.write(line)

    def _stage_started(self, name: str, run_id: str, run_dir: str | None) -> None:
        with self._lock:
            self._stages[run_id] = {"name": name, "start": time.time(), "reused": False}
        if run_dir and not self._log_named and self.run_log.move_to(Path(run_dir) / RUN_LOG_NAME):
            self._log_named = True
            self.say(f"log of this run (everything, vLLM and Ray output included): {self.run_log.path}", stamp=False)
        self.say(f"{name:<17} started")

    def _stage_finished(self, record: logging.LogRecord) -> None:
        run_id = str(getattr(record, "task_run_id", "") or "")
        with self._lock:
            # A task that finished without calling the hook: the flow runs its tasks one after another, so it began
            # when the one before it finished.
            info = self._stages.pop(run_id, None) or {"name": getattr(record, "task_name", "task"), "start": self._last_finish,
                                                      "reused": False}
            self._last_finish = record.created
        took = f" in {format_duration(record.created - info['start'])}" if info["start"] else ""
        state = record.getMessage()[len(FINISHED):]
        if state.startswith("Completed"):
            word = "reused" if info["reused"] else "done"
        elif state.startswith("Cached"):
            word = "cached (Prefect result)"
        else:
            word = "failed"
        self.progress.close()  # the stage's bars stay on screen, finished; the next lines go below them
        self.say(f"{info['name']:<17} {word}{took}")

    def on_record(self, record: logging.LogRecord, handler: logging.Handler) -> None:
        message = record.getMessage()
        if record.name == "prefect.task_runs":
            self.progress.feed(message)  # demo asset bars; worker lines reach the bars through ray_output_to
            if REUSED in message:
                with self._lock:
                    stage = self._stages.get(str(getattr(record, "task_run_id", "")))
                    if stage is not None:
                        stage["reused"] = True
            if message.startswith(FINISHED):
                self._stage_finished(record)
                return
        if not console_keeps(record):
            return
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            if id(exc) in self._shown_errors:
                record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
            else:
                self._shown_errors.add(id(exc))
        text = f"{record.levelname}  {_source(record)}: {message}"
        if record.exc_info:
            text += "\n" + handler.formatter.formatException(record.exc_info)
        self.say(text, stamp=False, echo=True)

    def _worker_batch(self, data: dict) -> None:
        """In place of Ray's driver printer: nothing on the console. The run log has every worker line (through
        ray_output_to), and a worker's failure reaches the console as the driver's exception (an ERROR record).
        Worker-side errors alone are not a failure: under load Ray Train's controller logs tracebacks of timeouts it
        retries ("safe to ignore"), and vLLM logs errors when its engine is stopped."""

    # ---- the end ----------------------------------------------------------------------------------------------------

    def finish(self, run_json: str | Path) -> None:
        """Move the log into the run folder (if no stage did), print the summary, then the run.json path alone on
        stdout (the last line; scripts read it)."""
        run_json = Path(run_json)
        self.run_log.move_to(run_json.parent / RUN_LOG_NAME)
        self.progress.close()
        for line in render_summary(run_json, log_path=self.run_log.path):
            self.progress.write(line)
            self.run_log.write(f"{_clock()} | console | {line}")
        sys.stderr.flush()
        print(run_json, flush=True)

    def failed(self) -> None:
        """After a failed run: where its log is (printed before the CLI's one-line error, which stays last)."""
        self.progress.close()
        self.say(f"log of this run: {self.run_log.path}", stamp=False)


# ----------------------------------------------------------------------------------------------------------------
# The summary


def _fmt(x: Any) -> str:
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return "—"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.4g}"


def format_stat(stat: Any) -> str:
    """'0.413 [0.360, 0.463]' from {"value", "ci_low", "ci_high"}; a bare number as itself; '—' when absent."""
    if isinstance(stat, Mapping):
        text = _fmt(stat.get("value"))
        low, high = stat.get("ci_low"), stat.get("ci_high")
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and math.isfinite(low) and math.isfinite(high):
            text += f" [{_fmt(low)}, {_fmt(high)}]"
        return text
    return _fmt(stat)


def _read_json(path: Path | str | None) -> dict | None:
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _champion_metrics(decision: Mapping) -> tuple[str | None, dict | None]:
    """The champion before this run and its recorded student metrics (its registry entry.json, next to this run's
    version: decision["registry_path"] is <registry>/versions/<version>)."""
    before = decision.get("champion_before")
    path = decision.get("registry_path")
    if not before or not path:
        return before, None
    entry = _read_json(Path(path).parent / before / "entry.json")
    metrics = (entry or {}).get("metrics") or {}
    student = metrics.get("student") if isinstance(metrics.get("student"), Mapping) else None
    return before, student


RULE_WORD = {"passed": "PASS", "failed": "FAIL", "not_evaluable": "N/A"}


def render_summary(run_json: str | Path, *, log_path: str | Path | None = None) -> list[str]:
    """The run's summary as console lines, from run.json and the files it names (metrics.json, the champion's
    registry entry); nothing is computed again. The caller prints the run.json path after these lines."""
    from tasks.evaluate.metrics import LOWER_IS_BETTER, METRIC_NAMES

    run_json = Path(run_json)
    run = _read_json(run_json) or {}
    if run.get("status") == "failed":
        lines = [f"run {run.get('run_name', run_json.parent.name)} failed in {run.get('failed_stage', '?')}: {run.get('error', '')}"]
        if log_path:
            lines.append(f"log:      {log_path}")
        return lines
    decision = run.get("decision") or {}
    metrics = _read_json(run.get("metrics_file")) or {}
    sides = {"student": metrics.get("student") or (run.get("metrics") or {}).get("student") or {},
             "teacher": metrics.get("teacher") or (run.get("metrics") or {}).get("teacher") or {}}
    champion_version, champion = _champion_metrics(decision)
    columns = [("student", sides["student"]), ("teacher", sides["teacher"]),
               (f"champion {champion_version}" if champion_version else "champion", champion or {})]
    present = {m for _, side in columns for m in side}
    order = [m for m in METRIC_NAMES if m in present] + sorted(present - set(METRIC_NAMES))

    head = f"summary of run {run.get('run_name', run_json.parent.name)}"
    if isinstance(run.get("wall_seconds"), (int, float)):
        head += f" ({format_duration(run['wall_seconds'])})"
    reused = run.get("reused_stages") or []
    if reused:
        head += "; reused: " + ", ".join(reused)
    lines = ["", head]
    n = metrics.get("num_examples")
    table = [["metric", "better", *[name for name, _ in columns]]]
    for m in order:
        table.append([m, "lower" if m in LOWER_IS_BETTER else "higher", *[format_stat(side.get(m)) for _, side in columns]])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    lines.append("  value [95% interval]" + (f" over {n} held-out examples" if n is not None else ""))

    version = decision.get("version") or "?"
    verdict = "promoted" if decision.get("promoted") else "not promoted"
    summary = str(decision.get("summary") or "")
    for prefix in ("promoted: ", "not promoted: "):  # the gate's summary starts with the verdict: say it once
        summary = summary[len(prefix):] if summary.startswith(prefix) else summary
    lines.append(f"decision: {version} {verdict}" + (f" — {summary}" if summary else ""))
    for rule in decision.get("rules") or []:
        word = RULE_WORD.get(rule.get("status") or ("passed" if rule.get("passed") else "failed"), "?")
        lines.append(f"  {word:<4} {rule.get('name', '?')}: {rule.get('reason', '')}")
    before, after = decision.get("champion_before"), decision.get("champion_after")
    lines.append(f"champion: {before or 'none'} → {after or 'none'}" if before != after else f"champion: {after or 'none'} (unchanged)")
    report = (decision.get("report") or {}).get("md") or (str(run_json.parent / "report.md") if (run_json.parent / "report.md").exists() else None)
    if report:
        lines.append(f"report:   {report}")
    if log_path:
        lines.append(f"log:      {log_path}")
    lines.append("run.json:")
    return lines
