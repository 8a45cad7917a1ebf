"""`stillhouse registry ...` (flows/registry_cli.py): list, show, promote, rollback, export."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard

from flows.cli import main
from flows.registry_cli import registry_main
from storage.registry import ModelRegistry
from tasks.model_card import write_card_for_entry
from tests.test_registry import make_model, register  # one stand-in model for both files


def test_cli_list_show_promote_rollback(tmp_path, capsys, monkeypatch):
    root = tmp_path / "reg"
    reg = ModelRegistry(root)
    register(reg, tmp_path, "a", exact_match=0.25)
    register(reg, tmp_path, "b", exact_match=0.5)
    reg.register(make_model(tmp_path / "src-c", "c"), lineage={}, metrics={"student": {"exact_match": {"value": 0.75, "ci_low": 0.7, "ci_high": 0.8, "n": 9}}}, decision={})
    reg.promote("v0001")

    assert registry_main(["list", "--json", "--registry", str(root)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in listed["versions"]] == ["v0001", "v0002", "v0003"]
    assert listed["aliases"] == {"champion": "v0001"}
    assert listed["versions"][1]["metrics"] == {"exact_match": 0.5}

    monkeypatch.setenv("STILLHOUSE_REGISTRY", str(root))
    assert registry_main(["list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["VERSION", "CREATED"]
    assert "champion" in table[1] and "exact_match=0.25" in table[1]
    assert table[0].index("ALIASES") == table[1].index("champion"), "columns are aligned"
    assert "exact_match=0.75" in table[3], "nested {'student': ...} metrics are shown too"

    assert registry_main(["promote", "v0002", "--reason", "canary ok"]) == 0
    assert "v0001 -> v0002" in capsys.readouterr().out
    assert registry_main(["show", "champion", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v0002"
    assert registry_main(["rollback"]) == 0
    assert reg.alias("champion").version == "v0001"
    assert registry_main(["show", "v0042"]) == 1
    assert "v0042" in capsys.readouterr().err
    assert registry_main(["list", "--registry", str(tmp_path / "missing")]) == 1
    assert not (tmp_path / "missing").exists(), "read commands must not create a registry at a mistyped path"
    assert registry_main(["frobnicate"]) == 2


def test_stillhouse_registry_dispatches_to_the_registry_cli(tmp_path, capsys):
    root = tmp_path / "reg"
    register(ModelRegistry(root), tmp_path, "a", exact_match=0.25)
    assert main(["registry", "list", "--json", "--registry", str(root)]) == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)["versions"]] == ["v0001"]


def test_export_copies_a_version_with_its_card(tmp_path, capsys):
    root = tmp_path / "reg"
    reg = ModelRegistry(root)
    lineage = {"train_config": {"student": "gpt2", "objective": "fkl", "steps": 5}, "teacher": {"model": "t", "hash": "h"}}
    reg.register(make_model(tmp_path / "src-a", "a"), lineage=lineage, metrics={"student": {"exact_match": {"value": 0.5}}},
                 decision={"promoted": True}, before_publish=write_card_for_entry)
    register(reg, tmp_path, "b", exact_match=0.4)  # registered without a card (as before cards existed)
    reg.promote("v0001")

    out = tmp_path / "out" / "champion-model"
    assert registry_main(["export", "champion", str(out), "--registry", str(root)]) == 0
    assert f"exported v0001 to {out}" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == b"a" * 64
    assert not (out / "entry.json").exists(), "registry bookkeeping stays in the registry"
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "gpt2" and card.data.eval_results[0].metric_value == 0.5

    # An existing folder is refused, and left as it was.
    assert registry_main(["export", "v0002", str(out), "--registry", str(root)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"a" * 64
    # --force replaces it; a version without a card gets one written into the export.
    assert registry_main(["export", "v0002", str(out), "--force", "--registry", str(root)]) == 0
    assert (out / "model.safetensors").read_bytes() == b"b" * 64
    assert ModelCard.load(out / "README.md").data.eval_results[0].metric_value == 0.4
    assert not (Path(reg.get("v0002").path) / "README.md").exists(), "export never writes into the registry"
    assert sorted(p.name for p in out.parent.iterdir()) == ["champion-model"], "no temporary or old folders left"

    assert registry_main(["export", "challenger", str(tmp_path / "x"), "--registry", str(root)]) == 1
    assert "neither a version nor a set alias" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
