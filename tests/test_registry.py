"""Model registry: versioning, aliases, rollback, atomicity and concurrent writers."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from storage.errors import UserError
from storage.registry import ModelRegistry, RegistryError, check_registry_dir


def make_model(folder: Path, tag: str) -> Path:
    """A stand-in HF model folder; `tag` makes its bytes unique so copies can be traced."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "tag": tag}))
    (folder / "model.safetensors").write_bytes(tag.encode() * 64)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def register(reg: ModelRegistry, tmp_path: Path, tag: str, **metrics: float):
    return reg.register(make_model(tmp_path / f"src-{tag}", tag), lineage={"teacher": "t", "tag": tag}, metrics=metrics, decision={"promoted": True})


def test_register_copies_files_and_entry(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    src = make_model(tmp_path / "model", "a")
    entry = reg.register(src, lineage={"teacher": "tiny", "manifest_sha256": "abc"}, metrics={"exact_match": 0.5}, decision={"promoted": True})

    assert entry.version == "v0001"
    dest = Path(entry.path)
    assert dest == tmp_path / "reg" / "versions" / "v0001" and dest.is_absolute()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (dest / name).read_bytes() == (src / name).read_bytes()
    on_disk = json.loads((dest / "entry.json").read_text())
    assert on_disk["lineage"]["manifest_sha256"] == "abc" and on_disk["metrics"] == {"exact_match": 0.5}
    assert reg.get("v0001") == entry
    assert src.exists(), "register copies, it must not move the source"


def test_versions_increase_and_unknown_version_raises(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    made = [register(reg, tmp_path, t).version for t in "abc"]
    assert made == ["v0001", "v0002", "v0003"]
    assert [e.version for e in reg.versions()] == made
    with pytest.raises(RegistryError, match="v0009"):
        reg.get("v0009")
    with pytest.raises(RegistryError, match="not a version name"):
        reg.get("../etc")


def test_register_rejects_missing_folder(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="nope"):
        reg.register(tmp_path / "nope", lineage={}, metrics={}, decision={})
    assert reg.versions() == []


def test_alias_moves_and_is_audited(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    register(reg, tmp_path, "a")
    register(reg, tmp_path, "b")
    assert reg.alias("challenger") is None
    reg.set_alias("challenger", "v0001", reason="first")
    reg.set_alias("challenger", "v0002", reason="second")
    assert reg.aliases() == {"challenger": "v0002"}
    assert reg.alias("challenger").version == "v0002"
    moves = [(h["alias"], h["from"], h["to"], h["reason"]) for h in reg.history()]
    assert moves == [("challenger", None, "v0001", "first"), ("challenger", "v0001", "v0002", "second")]
    with pytest.raises(RegistryError, match="v0007"):
        reg.set_alias("challenger", "v0007")


def test_promote_then_rollback_restores_previous_champion(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    for tag in "abc":
        register(reg, tmp_path, tag)
    reg.promote("v0001", reason="first")
    reg.promote("v0002")
    reg.promote("v0002")  # re-promoting the champion is a no-op, not a rollback target
    reg.promote("v0003")
    assert reg.alias("champion").version == "v0003"

    assert reg.rollback(reason="bad canary").version == "v0002"
    assert reg.alias("champion").version == "v0002"
    assert reg.rollback().version == "v0001"  # repeated rollbacks walk further back
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback()
    assert reg.alias("champion").version == "v0001"

    actions = [(h["action"], h["from"], h["to"]) for h in reg.history()]
    assert actions == [
        ("promote", None, "v0001"), ("promote", "v0001", "v0002"), ("promote", "v0002", "v0003"),
        ("rollback", "v0003", "v0002"), ("rollback", "v0002", "v0001"),
    ]
    assert reg.history()[3]["reason"] == "bad canary"


def test_rollback_without_previous_champion_raises(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback()
    register(reg, tmp_path, "a")
    reg.promote("v0001")
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback()


def test_unwritable_root_raises_at_construction(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file, so nothing can be created below it")
    with pytest.raises(RegistryError, match="file.txt"):
        ModelRegistry(blocker / "registry")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_root_raises_at_construction(tmp_path):
    root = tmp_path / "reg"
    (root / "versions").mkdir(parents=True)
    root.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(RegistryError, match="not writable"):
            ModelRegistry(root)
    finally:
        root.chmod(stat.S_IRWXU)


def test_root_that_refuses_writes_raises_at_construction(tmp_path, monkeypatch):
    # Stands in for a read-only mount, which even root cannot write to.
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    root = tmp_path / "reg"
    root.mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(RegistryError, match="not writable.*Read-only"):
        ModelRegistry(root)


# ----- check_registry_dir: the registry folder checked before any compute ---------------------


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders): to show a check changed nothing."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@contextlib.contextmanager
def read_only(folder: Path):
    """Make `folder` really unwritable: mode bits for a normal user, the immutable attribute for root."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            yield
        finally:
            folder.chmod(stat.S_IRWXU)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a filesystem without the immutable attribute: no way to make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_registry_errors_are_user_errors():
    assert issubclass(RegistryError, UserError) and issubclass(RegistryError, ValueError)


def test_check_registry_dir_accepts_a_good_registry_and_a_new_path_without_changing_anything(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    reg.promote(register(reg, tmp_path, "a").version)
    reg.set_alias("challenger", register(reg, tmp_path, "b").version)
    before = tree(tmp_path)
    check_registry_dir(tmp_path / "reg")
    check_registry_dir(str(tmp_path / "not" / "yet" / "there"))  # created at promotion, not by the check
    assert tree(tmp_path) == before
    (tmp_path / "bare").mkdir()
    check_registry_dir(tmp_path / "bare")  # an existing empty folder: fine
    assert list((tmp_path / "bare").iterdir()) == []


def test_check_registry_dir_refuses_a_file(tmp_path):
    blocker = tmp_path / "registry"
    blocker.write_text("a file where the registry folder should be")
    with pytest.raises(RegistryError, match=f"registry path {blocker} is a file, not a folder.*promotion.registry_dir"):
        check_registry_dir(blocker)
    with pytest.raises(RegistryError, match=f"registry path {blocker}/sub/reg cannot be created: {blocker} is a file"):
        check_registry_dir(blocker / "sub" / "reg")
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "versions").write_text("not a folder")
    with pytest.raises(RegistryError, match=f"{reg}/versions is a file"):
        check_registry_dir(reg)


def test_check_registry_dir_refuses_an_unwritable_folder(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    register(reg, tmp_path, "a")
    with read_only(reg.root):
        with pytest.raises(RegistryError, match=f"registry folder {reg.root} is not writable: .*choose another"):
            check_registry_dir(reg.root)
    with read_only(reg.versions_dir):  # versions/ is where a new version is staged
        with pytest.raises(RegistryError, match=f"registry folder {reg.versions_dir} is not writable"):
            check_registry_dir(reg.root)
    parent = tmp_path / "locked"
    parent.mkdir()
    with read_only(parent):
        with pytest.raises(RegistryError, match=f"registry path {parent}/reg cannot be created: {parent} is not writable"):
            check_registry_dir(parent / "reg")
    check_registry_dir(reg.root)  # writable again: fine


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: p.write_text('{"champion": "v00'), "cannot read .*aliases.json: .*repair it from .*history.jsonl"),
    (lambda p: p.write_text('["v0001"]'), "aliases.json should hold a JSON object of alias -> version names"),
    (lambda p: p.write_text('{"champion": 1}'), "aliases.json should hold a JSON object"),
    (lambda p: (p.unlink(), p.mkdir()), "cannot read .*aliases.json: .*Is a directory"),  # unreadable, even for root
    (lambda p: p.write_text('{"champion": "v0009"}'), "alias 'champion' points to 'v0009', which is missing"),
])
def test_check_registry_dir_refuses_unreadable_aliases(tmp_path, damage, message):
    reg = ModelRegistry(tmp_path / "reg")
    reg.promote(register(reg, tmp_path, "a").version)
    check_registry_dir(reg.root)
    damage(reg.aliases_path)
    with pytest.raises(RegistryError, match=message):
        check_registry_dir(reg.root)
    # A registry folder without versions/ yet is checked the same way.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "aliases.json").write_text("{")
    with pytest.raises(RegistryError, match=f"cannot read {bare}/aliases.json"):
        check_registry_dir(bare)


def test_leftover_tmp_folders_are_ignored(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    register(reg, tmp_path, "a")
    # What a writer killed mid-copy leaves behind, with and without an entry.json.
    crashed = reg.versions_dir / "v0002.tmp-deadbeef"
    make_model(crashed, "crashed")
    (crashed / "entry.json").write_text("{}")
    make_model(reg.versions_dir / "incoming.tmp-0123abcd", "half")
    assert [e.version for e in reg.versions()] == ["v0001"]
    assert register(reg, tmp_path, "b").version == "v0002"
    assert [e.version for e in reg.versions()] == ["v0001", "v0002"]
    assert json.loads((Path(reg.get("v0002").path) / "config.json").read_text())["tag"] == "b"


def _race_worker(root: str, index: int, barrier) -> None:
    import time

    import storage.registry as registry_module

    # Widen the critical sections (number chosen -> folder renamed; aliases read -> written)
    # so that, without the lock, the workers would reliably interleave and collide.
    real_write_json = registry_module.write_json

    def slow_write_json(path, payload):
        time.sleep(0.3 if Path(path).name == "aliases.json" else 0.1)
        return real_write_json(path, payload)

    registry_module.write_json = slow_write_json
    reg = ModelRegistry(root)
    src = make_model(Path(root).parent / f"src-{index}", f"worker{index}")
    barrier.wait()
    entry = reg.register(src, lineage={"worker": index}, metrics={"exact_match": index / 10}, decision={})
    reg.promote(entry.version, reason=f"worker {index}")


def test_concurrent_processes_never_collide(tmp_path):
    n = 4
    root = tmp_path / "reg"
    ModelRegistry(root)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n, timeout=60)
    procs = [ctx.Process(target=_race_worker, args=(str(root), i, barrier)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * n

    reg = ModelRegistry(root)
    entries = reg.versions()
    assert [e.version for e in entries] == [f"v{i:04d}" for i in range(1, n + 1)]
    assert sorted(e.lineage["worker"] for e in entries) == list(range(n)), "each worker's model landed in its own version"
    for e in entries:
        assert f"worker{e.lineage['worker']}".encode() in (Path(e.path) / "model.safetensors").read_bytes()
    aliases = json.loads((root / "aliases.json").read_text())
    assert aliases["champion"] in {e.version for e in entries}
    lines = (root / "history.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    promotes = [r for r in records if r["action"] == "promote"]
    assert len(promotes) == n and sorted(r["to"] for r in promotes) == [e.version for e in entries]
    # Serialised moves: each promotion starts from the previous one's target.
    assert [r["from"] for r in promotes] == [None] + [r["to"] for r in promotes[:-1]]
    assert promotes[-1]["to"] == aliases["champion"]
    assert not list(reg.versions_dir.glob("*.tmp-*"))


def _promotion(tmp_path, train_key: str, exact_match: float, threshold: float = 0.5):
    from tasks.config import PromotionConfig
    from tasks.promote import run_promotion_stage

    cfg = PromotionConfig.model_validate({"gate": {"rules": [{"metric": "exact_match", "kind": "absolute", "threshold": threshold}]}})
    metrics = {"student": {"exact_match": {"value": exact_match, "ci_low": exact_match, "ci_high": exact_match, "n": 10}}}
    student = make_model(tmp_path / f"student-{train_key}", train_key)
    return run_promotion_stage(cfg, str(tmp_path / "reg"), str(student), metrics, {"train_key": train_key}, log_fn=lambda _: None)


def test_same_student_again_is_not_registered_twice(tmp_path):
    first = _promotion(tmp_path, "k1", 0.8)
    assert first["promoted"] and first["version"] == "v0001"
    # A scheduled run with nothing new: same training key, already champion -> registry unchanged.
    again = _promotion(tmp_path, "k1", 0.8)
    assert again["promoted"] is False and again["already_registered"] and again["version"] == "v0001"
    assert "already the champion" in again["summary"]
    reg = ModelRegistry(tmp_path / "reg")
    assert [e.version for e in reg.versions()] == ["v0001"]
    # A failing student, then the same student under laxer rules: promoted without a second copy.
    failing = _promotion(tmp_path, "k2", 0.3)
    assert failing["promoted"] is False and failing["version"] == "v0002"
    relaxed = _promotion(tmp_path, "k2", 0.3, threshold=0.2)
    assert relaxed["promoted"] and relaxed["version"] == "v0002" and relaxed["already_registered"]
    assert ModelRegistry(tmp_path / "reg").alias("champion").version == "v0002"
    assert [e.version for e in reg.versions()] == ["v0001", "v0002"]
