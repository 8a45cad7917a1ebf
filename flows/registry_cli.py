"""`stillhouse registry ...`: inspect the model registry, move the champion, export a version.

The registry itself is `storage/registry.py`; this is its command line (moved out of
storage/ so that storage holds no user interface).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from storage.errors import UserError
from storage.registry import CHAMPION, ENTRY_NAME, ModelRegistry, RegistryError
from tasks.model_card import CARD_NAME, write_card_for_entry


class ExportError(RegistryError):
    """`registry export` cannot write where it was asked to; the message says what to do."""


def default_registry_path() -> str:
    if os.environ.get("STILLHOUSE_REGISTRY"):
        return os.environ["STILLHOUSE_REGISTRY"]
    data_dir = os.environ.get("STILLHOUSE_DATA_DIR")
    return str(Path(data_dir) / "registry") if data_dir else str(Path("stillhouse-data") / "registry")


def export_version(registry: ModelRegistry, ref: str, dest: str | Path, *, force: bool = False) -> Path:
    """Copy version (or alias) `ref` to `dest` with its model card; returns dest.

    The copy is built in a temporary sibling of `dest` and renamed into place, so `dest` is
    either absent, the old folder (with --force, until the rename) or the complete export.
    entry.json (registry bookkeeping with local paths) stays behind; the card carries the
    lineage. A version registered before cards existed gets one written into the export."""
    entry = registry.resolve(ref)
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and not force:
        raise ExportError(f"{dest} already exists; choose another folder or pass --force to replace it")
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{dest} exists and is not a folder; remove it or choose another folder")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {dest.parent}: {exc}; choose a writable folder") from exc
    staging = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    old = dest.with_name(f"{dest.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(entry.path, staging, ignore=lambda d, names: [ENTRY_NAME] if Path(d) == Path(entry.path) else [])
        if not (staging / CARD_NAME).exists():
            write_card_for_entry(staging, entry)
        if dest.exists():  # --force: move the old folder aside first; rename cannot replace a non-empty folder
            os.rename(dest, old)
        os.rename(staging, dest)
    except OSError as exc:
        if old.exists() and not dest.exists():
            os.rename(old, dest)  # put the previous export back
        raise ExportError(f"cannot export {entry.version} to {dest}: {exc}; choose a writable folder with enough space") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dest


def _metric_value(raw: Any) -> float | None:
    if isinstance(raw, dict):
        raw = raw.get("value")
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    return None


KEY_METRICS = ("exact_match", "rouge_l", "kl_to_teacher")


def _key_metrics(metrics: dict, limit: int = 3) -> str:
    if isinstance(metrics.get("student"), dict):  # the flow stores {"student": {...}, "teacher": {...}}
        metrics = metrics["student"]
    names = [m for m in KEY_METRICS if m in metrics] + sorted(m for m in metrics if m not in KEY_METRICS)
    shown = [f"{m}={v:.4g}" for m in names if (v := _metric_value(metrics[m])) is not None][:limit]
    return " ".join(shown) or "-"


def _table(registry: ModelRegistry) -> str:
    aliases = registry.aliases()
    by_version: dict[str, list[str]] = {}
    for name, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(name)
    rows = [("VERSION", "CREATED", "ALIASES", "GATE", "METRICS")]
    for e in registry.versions():
        gate = e.decision.get("promoted")
        rows.append((
            e.version, e.created_at, ",".join(by_version.get(e.version, [])) or "-",
            "-" if gate is None else ("pass" if gate else "fail"), _key_metrics(e.metrics),
        ))
    if len(rows) == 1:
        return f"(no versions in {registry.root})"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, help="registry folder (default: $STILLHOUSE_REGISTRY, else $STILLHOUSE_DATA_DIR/registry, else ./stillhouse-data/registry)")
    parser = argparse.ArgumentParser(prog="stillhouse registry", description="Inspect the model registry, move the champion, export a version.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", parents=[common], help="all versions with aliases and key metrics")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("show", parents=[common], help="one version's lineage, metrics and gate decision")
    p.add_argument("ref", metavar="VERSION|ALIAS")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("promote", parents=[common], help="make VERSION the champion (bypasses the gate; say why)")
    p.add_argument("ref", metavar="VERSION")
    p.add_argument("--reason", default="manual promotion (CLI)")
    p = sub.add_parser("rollback", parents=[common], help="restore the champion before the last promotion")
    p.add_argument("--reason", default="manual rollback (CLI)")
    p = sub.add_parser("export", parents=[common], help="copy a version's model folder (with its model card README.md) to DIR")
    p.add_argument("ref", metavar="VERSION|ALIAS")
    p.add_argument("dest", metavar="DIR")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    return parser


def registry_main(argv: list[str]) -> int:
    """`stillhouse registry ...`; returns the exit status (0 ok, 1 registry error, 2 usage)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on usage errors and --help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        registry = ModelRegistry(args.registry or default_registry_path(), create=False)
        if args.command == "list":
            if args.json:
                print(json.dumps({"versions": [e.model_dump() for e in registry.versions()], "aliases": registry.aliases()}, indent=2, default=str))
            else:
                print(_table(registry))
        elif args.command == "show":
            entry = registry.resolve(args.ref)
            marks = sorted(n for n, v in registry.aliases().items() if v == entry.version)
            if args.json:
                print(json.dumps({**entry.model_dump(), "aliases": marks}, indent=2, default=str))
            else:
                print(f"version:  {entry.version}\npath:     {entry.path}\ncreated:  {entry.created_at}\naliases:  {', '.join(marks) or '-'}")
                for key in ("decision", "metrics", "lineage"):
                    print(f"{key}:\n  " + json.dumps(getattr(entry, key), indent=2, sort_keys=True, default=str).replace("\n", "\n  "))
        elif args.command == "promote":
            before = registry.aliases().get(CHAMPION)
            entry = registry.resolve(args.ref)
            registry.promote(entry.version, reason=args.reason)
            print(f"champion: {before or '-'} -> {entry.version}")
        elif args.command == "rollback":
            before = registry.aliases().get(CHAMPION)
            entry = registry.rollback(reason=args.reason)
            print(f"champion: {before or '-'} -> {entry.version}")
        elif args.command == "export":
            entry = registry.resolve(args.ref)
            dest = export_version(registry, entry.version, args.dest, force=args.force)
            print(f"exported {entry.version} to {dest}")
    except (RegistryError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(registry_main(sys.argv[1:]))
