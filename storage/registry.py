"""A local, file-based, versioned model registry with champion/challenger aliases.

Layout under the root::

    .lock                 filelock guarding version allocation and alias changes
    versions/v0001/       model files (HF format) + entry.json, published by one rename
    versions/*.tmp-*      half-copied versions; never listed
    aliases.json          {"champion": "v0003", ...}, replaced atomically
    history.jsonl         append-only audit log of every alias change

Plain files and renames only (no symlinks, no database), so the registry can
live on any local or shared filesystem and be inspected with `cat`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict

from storage.atomic import write_json

ENTRY_NAME = "entry.json"
VERSION_RE = re.compile(r"^v(\d{4,})$")
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CHAMPION = "champion"
LOCK_TIMEOUT_S = 120.0


class RegistryError(Exception):
    """A registry operation cannot proceed; the message names the path/version and what to do."""


class RegistryEntry(BaseModel):
    """What entry.json records about one registered model version."""

    model_config = ConfigDict(extra="allow")

    version: str
    path: str
    created_at: str
    lineage: dict
    metrics: dict
    decision: dict


def _version_number(name: str) -> int | None:
    match = VERSION_RE.match(name)
    return int(match.group(1)) if match else None


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _copy_durably(src: str, dst: str) -> str:
    """shutil copy that also fsyncs, so a published version never holds unflushed weights."""
    shutil.copy2(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
    return dst


def _whoami() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


class ModelRegistry:
    """Versioned model store; all writers serialise on one file lock, readers need none."""

    def __init__(self, root: str | Path, *, create: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        if not create and not (self.root / "versions").is_dir():
            raise RegistryError(f"no registry at {self.root}; pass --registry PATH or set STILLHOUSE_REGISTRY")
        try:
            (self.root / "versions").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create registry folder {self.root}: {exc}; choose a writable --registry path") from exc
        self._check_writable()
        self.versions_dir = self.root / "versions"
        self.aliases_path = self.root / "aliases.json"
        self.history_path = self.root / "history.jsonl"
        self._lock = FileLock(str(self.root / ".lock"), timeout=LOCK_TIMEOUT_S)

    def _check_writable(self) -> None:
        # os.access is not enough (root bypasses mode bits, ACLs vary), so really write.
        try:
            fd, probe = tempfile.mkstemp(prefix=".probe.tmp-", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise RegistryError(f"registry folder {self.root} is not writable: {exc}; fix its permissions or choose another --registry path") from exc

    def _acquire(self):
        try:
            return self._lock.acquire()
        except Timeout as exc:
            raise RegistryError(
                f"timed out after {LOCK_TIMEOUT_S:.0f}s waiting for {self._lock.lock_file}; another process is writing to the registry"
            ) from exc

    # ----- versions -------------------------------------------------------------------

    def register(self, model_dir: str | Path, *, lineage: dict, metrics: dict, decision: dict) -> RegistryEntry:
        """Copy a model folder in as the next version; visible to readers only once complete.

        The (slow) copy goes to a private temp folder outside the lock; the lock is held
        only to pick the number, write entry.json and rename, so writers never collide.
        """
        src = Path(model_dir)
        if not src.is_dir():
            raise RegistryError(f"cannot register {src}: not a folder; pass the folder the model was saved to")
        staging = self.versions_dir / f"incoming.tmp-{uuid.uuid4().hex}"
        try:
            shutil.copytree(
                src, staging, copy_function=_copy_durably,
                ignore=lambda d, names: [ENTRY_NAME] if Path(d) == src else [],
            )
            with self._acquire():
                number = max((n for n in map(_version_number, os.listdir(self.versions_dir)) if n is not None), default=0) + 1
                version = f"v{number:04d}"
                final = self.versions_dir / version
                entry = RegistryEntry(
                    version=version, path=str(final), created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    lineage=lineage, metrics=metrics, decision=decision,
                )
                write_json(staging / ENTRY_NAME, entry.model_dump())
                _fsync_dir(staging)
                os.rename(staging, final)
                _fsync_dir(self.versions_dir)
            return entry
        finally:
            if staging.exists() and ".tmp-" in staging.name:
                shutil.rmtree(staging, ignore_errors=True)

    def _load(self, folder: Path) -> RegistryEntry:
        path = folder / ENTRY_NAME
        try:
            data = json.loads(path.read_text())
            entry = RegistryEntry.model_validate(data)
        except FileNotFoundError as exc:
            raise RegistryError(f"{folder} has no {ENTRY_NAME}; it was not created by the registry, move it out of {self.versions_dir}") from exc
        except (ValueError, OSError) as exc:
            raise RegistryError(f"cannot read {path}: {exc}; restore it or move {folder} out of the registry") from exc
        # The folder's current location wins over the recorded one, so a moved registry still works.
        return entry.model_copy(update={"path": str(folder), "version": folder.name})

    def versions(self) -> list[RegistryEntry]:
        """All published versions, oldest first; temp folders are skipped."""
        names = [(n, name) for name in os.listdir(self.versions_dir) if (n := _version_number(name)) is not None]
        return [self._load(self.versions_dir / name) for _, name in sorted(names)]

    def get(self, version: str) -> RegistryEntry:
        if _version_number(version) is None:
            raise RegistryError(f"{version!r} is not a version name (expected e.g. 'v0001'); `stillhouse registry list` shows them")
        folder = self.versions_dir / version
        if not folder.is_dir():
            raise RegistryError(f"unknown version {version!r} in {self.root}; `stillhouse registry list` shows the registered ones")
        return self._load(folder)

    def resolve(self, ref: str) -> RegistryEntry:
        """A version name or an alias name."""
        if _version_number(ref) is not None:
            return self.get(ref)
        entry = self.alias(ref)
        if entry is None:
            raise RegistryError(f"{ref!r} is neither a version nor a set alias in {self.root} (aliases: {self.aliases() or 'none'})")
        return entry

    # ----- aliases --------------------------------------------------------------------

    def aliases(self) -> dict[str, str]:
        try:
            data = json.loads(self.aliases_path.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, OSError) as exc:
            raise RegistryError(f"cannot read {self.aliases_path}: {exc}; repair it from {self.history_path}") from exc
        if not isinstance(data, dict):
            raise RegistryError(f"{self.aliases_path} should hold a JSON object; repair it from {self.history_path}")
        return data

    def alias(self, name: str) -> RegistryEntry | None:
        version = self.aliases().get(name)
        if version is None:
            return None
        try:
            return self.get(version)
        except RegistryError as exc:
            raise RegistryError(f"alias {name!r} points to {version!r}, which is missing: {exc}") from exc

    def set_alias(self, name: str, version: str, *, reason: str = "") -> None:
        """Point an alias at a version atomically and record the move in history.jsonl."""
        self._move(name, version, action="set", reason=reason)

    def _move(self, name: str, version: str, *, action: str, reason: str) -> str | None:
        if not ALIAS_RE.match(name) or _version_number(name) is not None:
            raise RegistryError(f"bad alias name {name!r}: use letters, digits, '_', '-', '.' and not a version-like name")
        self.get(version)  # must exist before anything points to it
        with self._acquire():
            aliases = self.aliases()
            previous = aliases.get(name)
            if previous == version:
                return previous  # a no-op move is not logged, so it can never become a rollback target
            aliases[name] = version
            # State first, then the audit line: a crash in between loses a log line, never the pointer.
            write_json(self.aliases_path, aliases)
            self._append_history({
                "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                "alias": name, "from": previous, "to": version, "action": action, "reason": reason,
                "user": _whoami(), "host": socket.gethostname(), "pid": os.getpid(),
            })
        return previous

    def _append_history(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with self.history_path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def history(self) -> list[dict]:
        """Every alias change, oldest first."""
        try:
            lines = self.history_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise RegistryError(f"{self.history_path}:{number} is not valid JSON ({exc}); repair or remove that line") from exc
        return records

    # ----- champion -------------------------------------------------------------------

    def promote(self, version: str, *, reason: str = "") -> None:
        """champion := version (no-op if it already is); the old champion stays in history for rollback."""
        self._move(CHAMPION, version, action="promote", reason=reason)

    def _champion_stack(self) -> list[str]:
        # Replay history: each promotion/set pushes, each rollback pops — so repeated
        # rollbacks walk back through earlier champions instead of toggling.
        stack: list[str] = []
        for record in self.history():
            if record.get("alias") != CHAMPION:
                continue
            if record.get("action") == "rollback":
                if stack:
                    stack.pop()
                if not stack or stack[-1] != record.get("to"):
                    stack.append(record["to"])
            else:
                stack.append(record["to"])
        current = self.aliases().get(CHAMPION)
        if current is not None and (not stack or stack[-1] != current):
            stack.append(current)  # aliases.json is the truth if the log lost a line
        return stack

    def rollback(self, *, reason: str = "") -> RegistryEntry:
        """champion := the champion before the last promotion; RegistryError if there was none."""
        with self._acquire():  # reentrant: keeps the stack and the move consistent
            stack = self._champion_stack()
            if len(stack) < 2:
                current = stack[-1] if stack else None
                raise RegistryError(
                    f"no previous champion to roll back to in {self.root} (current: {current or 'none'}); "
                    "use `stillhouse registry promote VERSION` instead"
                )
            self._move(CHAMPION, stack[-2], action="rollback", reason=reason)
            return self.get(stack[-2])


# ----- CLI ----------------------------------------------------------------------------


def default_registry_path() -> str:
    if os.environ.get("STILLHOUSE_REGISTRY"):
        return os.environ["STILLHOUSE_REGISTRY"]
    data_dir = os.environ.get("STILLHOUSE_DATA_DIR")
    return str(Path(data_dir) / "registry") if data_dir else str(Path("stillhouse-data") / "registry")


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
    parser = argparse.ArgumentParser(prog="stillhouse registry", description="Inspect the model registry and move the champion.")
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
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(registry_main(sys.argv[1:]))
