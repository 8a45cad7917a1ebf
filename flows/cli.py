"""`stillhouse` command line: run the flow, run the demo, inspect the registry, check a config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _parse_overrides(pairs: list[str]) -> dict:
    import yaml

    from storage.errors import UserError

    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UserError(f"--set {key}: the value {value!r} is not valid YAML ({str(exc).splitlines()[0]}); quote it") from None
    return overrides


def configure_runtime(data_dir: str) -> None:
    """Environment for an offline, local run; values the user already set win."""
    data = Path(data_dir).resolve()
    defaults = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(data / "prefect-results"),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "RAY_ACCEPT_AUTH_TOKEN_WARNING": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        # The temporary Prefect server's default 20 s start limit fails on a busy machine.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def _load(args) -> "PipelineConfig":  # noqa: F821
    from tasks.config import load_config

    return load_config(args.config, _parse_overrides(args.set))


def cmd_run(args) -> int:
    config = _load(args)
    configure_runtime(config.data_dir)
    from flows.console import Console
    from flows.distill import distill
    from flows.progress import StageProgress
    from tasks.ray_logs import ray_output_to

    _restore_prefect_level()  # a run before this one in the same process quieted Prefect for its exit
    progress = StageProgress(enabled=False if args.no_progress else None)  # bars on a terminal only
    ray_was_running = _ray_running()  # a Ray this process already ran (a caller's, a test session's) is left alone
    with Console(config.data_dir, verbose=args.verbose, progress=progress) as console:
        try:
            with ray_output_to(progress.feed):
                run_json = distill(config)
        except BaseException:
            console.failed()  # where the log is; the CLI's one-line error (main) stays the last line
            raise
        finally:
            if not ray_was_running:
                _shutdown_ray()
        # Keep the run.json path the last line: quiet Prefect's shutdown chatter (its temporary server logs
        # "Stopping temporary server" at exit), warnings still show.
        _quiet_prefect_until_exit()
        console.finish(run_json)  # the summary (stderr), then the run.json path alone on stdout
    return 0


_prefect_level_before_quiet: list[int] = []


def _quiet_prefect_until_exit() -> None:
    """Prefect's INFO lines off for the rest of the process (its temporary server says "Stopping" at exit)."""
    logger = logging.getLogger("prefect")
    _prefect_level_before_quiet.append(logger.level)
    logger.setLevel(logging.WARNING)


def _restore_prefect_level() -> None:
    """Undo `_quiet_prefect_until_exit` for another run in this process (else its stages' "done" lines, INFO
    records of prefect.task_runs, never reach the console)."""
    if _prefect_level_before_quiet:
        logging.getLogger("prefect").setLevel(_prefect_level_before_quiet[0])
        _prefect_level_before_quiet.clear()


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def _shutdown_ray() -> None:
    try:
        import ray

        ray.shutdown()
    except Exception:
        pass


def cmd_validate(args) -> int:
    config = _load(args)
    print(json.dumps(config.model_dump(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Errors a user can fix (storage.errors.UserError) print as one line and exit 2; anything else is a bug and keeps
    its traceback."""
    from storage.errors import UserError

    try:
        return _main(argv)
    except UserError as exc:
        print(f"stillhouse: error: {exc}", file=sys.stderr, flush=True)
        return UserError.exit_code


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "registry":
        from flows.registry_cli import registry_main

        return registry_main(argv[1:])
    parser = argparse.ArgumentParser(prog="stillhouse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run the distillation flow"), ("demo", "run the flow on the built-in demo task"),
                            ("validate", "check a configuration and print it with defaults")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="YAML file matching PipelineConfig")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=100")
        if name != "validate":
            p.add_argument("--no-progress", action="store_true", help="no progress bars (they show on a terminal only)")
            p.add_argument("--verbose", action="store_true",
                           help="print every line as Prefect, Ray and vLLM print it (by default: stage lines, warnings, "
                                "errors and a summary; the rest goes to the run's log file)")
    sub.add_parser("registry", help="list/show/promote/rollback/export registry versions (see 'stillhouse registry --help')")
    args = parser.parse_args(argv)
    if args.command == "validate":
        return cmd_validate(args)
    return cmd_run(args)


if __name__ == "__main__":
    raise SystemExit(main())
