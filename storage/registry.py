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

import getpass
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict

from storage.atomic import write_json
from storage.errors import UserError

ENTRY_NAME = "entry.json"
VERSION_RE = re.compile(r"^v(\d{4,})$")
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CHAMPION = "champion"
LOCK_TIMEOUT_S = 120.0


class RegistryError(UserError):
    """A registry operation cannot proceed; the message names the path/version and what to do (a UserError)."""


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


def _probe_writable(folder: Path, what: str) -> None:
    """Really create and delete a file in `folder`: os.access is not enough (root bypasses mode bits, ACLs vary)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe.tmp-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RegistryError(f"{what}: {exc}; fix its permissions or choose another --registry path (promotion.registry_dir)") from exc


def _read_aliases(path: Path, history_path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as exc:
        raise RegistryError(f"cannot read {path}: {exc}; repair it from {history_path}") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise RegistryError(f"{path} should hold a JSON object of alias -> version names; repair it from {history_path}")
    return data


def check_registry_dir(path: str | Path) -> None:
    """Raise RegistryError (a UserError) now if promotion into `path` would fail later; create and change nothing.

    For the flow to call before any compute. Refused: the path (or a folder above it, or its `versions`) is a
    file; it cannot be written (or, when it does not exist yet, its nearest existing folder cannot); its
    `aliases.json` is unreadable, not JSON or not an object of names; an alias points at a missing or unreadable
    version (promotion reads the champion's metrics and lineage).
    """
    root = Path(path).expanduser().absolute()
    if not root.exists():
        ancestor = root.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise RegistryError(f"registry path {root} cannot be created: {ancestor} is a file, not a folder; "
                                "choose another registry path (promotion.registry_dir / --registry)")
        _probe_writable(ancestor, f"registry path {root} cannot be created: {ancestor} is not writable")
        return
    if not root.is_dir():
        raise RegistryError(f"registry path {root} is a file, not a folder; move it away or choose another registry path "
                            "(promotion.registry_dir / --registry)")
    versions = root / "versions"
    if versions.exists() and not versions.is_dir():
        raise RegistryError(f"{versions} is a file, not the registry's versions folder; move it away or choose another registry path")
    _probe_writable(root, f"registry folder {root} is not writable")
    if not versions.is_dir():  # a registry folder without versions yet: only its aliases file can be wrong
        _read_aliases(root / "aliases.json", root / "history.jsonl")
        return
    _probe_writable(versions, f"registry folder {versions} is not writable")
    registry = ModelRegistry(root, create=False)
    for name in registry.aliases():
        registry.alias(name)  # raises, naming the alias and the version, if it points at nothing readable


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
        _probe_writable(self.root, f"registry folder {self.root} is not writable")

    def _acquire(self):
        try:
            return self._lock.acquire()
        except Timeout as exc:
            raise RegistryError(
                f"timed out after {LOCK_TIMEOUT_S:.0f}s waiting for {self._lock.lock_file}; another process is writing to the registry"
            ) from exc

    # ----- versions -------------------------------------------------------------------

    def register(self, model_dir: str | Path, *, lineage: dict, metrics: dict, decision: dict,
                 before_publish: Callable[[Path, RegistryEntry], Any] | None = None) -> RegistryEntry:
        """Copy a model folder in as the next version; visible to readers only once complete.

        The (slow) copy goes to a private temp folder outside the lock; the lock is held
        only to pick the number, write entry.json and rename, so writers never collide.
        `before_publish(staging_folder, entry)` adds files (e.g. the model card,
        tasks.model_card.write_card_for_entry) before the version becomes visible.
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
                if before_publish is not None:
                    before_publish(staging, entry)
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
        return _read_aliases(self.aliases_path, self.history_path)

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


# The command line (`stillhouse registry ...`) is flows/registry_cli.py.
