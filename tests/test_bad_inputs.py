"""A catalogue of bad inputs and faults, each tried the way a user meets it.

Config-time cases go through the CLI (`stillhouse validate` / `run`): exit code
2, one line naming the field or file, and nothing written. Prepare-time cases
run the real flow (Prefect, Ray) on tiny models and must fail in `prepare-data`,
before any teacher compute, within seconds, with run.json recording the failure
and no stage output taken for finished. Storage faults go through the readers the
training stage uses.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from flows.cli import main as cli_main
from tasks.config import PipelineConfig  # noqa: F401  (imported once here, so the timings below measure the checks)

# --------------------------------------------------------------------------------------------------------------
# Config-time: the CLI refuses before any flow starts.

CONFIG_CASES = {
    "misspelt objective": (["--set", "train.objective=fkll"], "train.objective 'fkll'"),
    "bad mixture": (["--set", "train.objective=0.5*fkl+"], "ends with '+'"),
    "unknown objective parameter": (["--set", "train.objective=jsd", "--set", "train.objective_params={gamma: 1}"], "'gamma'"),
    "objective parameter out of range": (["--set", "train.objective=jsd", "--set", "train.objective_params={beta: 2}"], "beta"),
    "run name with a path": (["--set", "run_name=../../x"], "run_name"),
    "absolute run name": (["--set", "run_name=/tmp/x"], "run_name"),
    "unknown setting": (["--set", "train.stepz=3"], "train.stepz"),
    "wrong type": (["--set", "teacher.top_k=many"], "teacher.top_k"),
    "override value is broken YAML": (["--set", "train.steps=[1"], "--set train.steps"),
    "override without =": (["--set", "train.steps"], "--set expects key=value"),
    "greedy teacher with several samples": (["--set", "teacher.temperature=0", "--set", "teacher.samples_per_prompt=4"],
                                            "teacher.temperature=0"),
    "gate rule on an unknown metric": (["--set", "promotion.gate.rules=[{metric: bleu, kind: absolute, threshold: 1}]"], "bleu"),
    "sampled metric without sampling": (["--set", "promotion.gate.rules=[{metric: rouge_l_sampled, kind: absolute, threshold: 0.1}]"],
                                        "eval.sample_seeds"),
    "more workers than batch rows": (["--set", "train.num_workers=8", "--set", "train.batch_size=4"], "train.num_workers"),
    "same split for training and evaluation": (["--set", "data.eval_split=train"], "data.train_split"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_errors_are_one_line_and_exit_2(case, capsys, tmp_path):
    args, expected = CONFIG_CASES[case]
    started = time.time()
    code = cli_main(["validate", *args, "--set", f"data_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("stillhouse: error:"), err
    assert expected in err, err
    assert time.time() - started < 30  # generous: these machines are noisy; the checks themselves take milliseconds
    assert not list(tmp_path.iterdir()), "nothing may be written for a refused config"


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.mark.parametrize("content, expected", [
    (b"train:\n  steps: [1\n", "invalid YAML at line 3"),
    (b"train:\n\tsteps: 3\n", "invalid YAML at line 2"),
    (b"- a\n- b\n", "expected a mapping"),
    (b"train:\n  steps: 3\n  objective: \xff\xfe\n", "not UTF-8"),
], ids=["unclosed list", "tab indent", "top-level list", "not utf-8"])
def test_broken_config_files_name_file_and_line(content, expected, capsys, tmp_path):
    path = _write(tmp_path / "bad.yaml", content)
    assert cli_main(["run", "--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err and expected in err, err


def test_missing_config_file(capsys, tmp_path):
    assert cli_main(["validate", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Prepare-time: the real flow fails in prepare-data, before the teacher starts.


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_student):
    """A dataset folder with disjoint train/test prompts, and the tiny model as both teacher and student."""
    from tests.conftest import write_demo_dataset

    root = tmp_path_factory.mktemp("bad-inputs")
    data = root / "data"
    rows = write_demo_dataset(data, n_train=60, n_test_drawn=60, n_test=10)
    assert len(rows["test"]) >= 5
    return {"root": root, "data": data, "rows": rows, "model": tiny_student}


def _dataset(workspace, name: str, train=None, test=None, raw_train: bytes | None = None) -> Path:
    folder = workspace["root"] / name
    folder.mkdir(exist_ok=True)
    for split, rows in (("train", train if train is not None else workspace["rows"]["train"]),
                        ("test", test if test is not None else workspace["rows"]["test"])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if raw_train is not None:
        (folder / "train.jsonl").write_bytes(raw_train)
    return folder


def _flow_config(workspace, data_dir: Path, **sections) -> dict:
    config = {
        "data_dir": str(data_dir),
        "data": {"source": str(workspace["data"])},
        "teacher": {"model": workspace["model"], "top_k": 8, "max_new_tokens": 8, "engine": {"max_model_len": 128}},
        "train": {"student": workspace["model"], "steps": 2, "batch_size": 4},
        "eval": {"max_new_tokens": 8, "engine": {"max_model_len": 128}},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


def _run_flow(config: dict, tmp_path: Path, capsys) -> tuple[int, str, float]:
    """`stillhouse run --config` in this process (the session's Prefect server and Ray), with the environment restored."""
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    saved = dict(os.environ)
    started = time.time()
    try:
        code = cli_main(["run", "--config", str(path), "--no-progress"])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, capsys.readouterr().err, time.time() - started


def _only_run(data_dir: Path) -> dict:
    runs = list((data_dir / "runs").glob("*/run.json"))
    assert len(runs) == 1, runs
    return json.loads(runs[0].read_text())


def _model_folder(workspace, name: str, keep=("config.json",), extra: dict[str, bytes] | None = None) -> str:
    import shutil

    source = Path(workspace["model"])
    folder = workspace["root"] / name
    folder.mkdir(exist_ok=True)
    for item in source.iterdir():
        if item.name in keep or (item.suffix != ".safetensors" and item.name != "config.json"):
            shutil.copy(item, folder / item.name)
    for file, payload in (extra or {}).items():
        (folder / file).write_bytes(payload)
    return str(folder)


def _registry_file(workspace) -> str:
    path = workspace["root"] / "registry-is-a-file"
    path.write_text("not a folder")
    return str(path)


def _other_tokenizer_model(workspace) -> str:
    from tasks.demo.models import llama_config, train_tokenizer

    folder = workspace["root"] / "other-tokenizer"
    if not (folder / "config.json").exists():
        tok = train_tokenizer(["completely different text", "another corpus entirely"] * 50, folder, vocab_size=300)
        llama_config(tok, hidden=64, layers=1, heads=1).save_pretrained(folder)
        (folder / "model.safetensors").write_bytes(Path(workspace["model"], "model.safetensors").read_bytes())
    return str(folder)


def _long_prompt_rows(workspace):
    row = dict(workspace["rows"]["train"][0], prompt=" ".join(["seven plus three"] * 200))
    return [row, *workspace["rows"]["train"][1:]]


PREPARE_CASES = {
    "data source does not exist": (lambda w: {"data": {"source": str(w["root"] / "nowhere")}}, "nowhere"),
    "no evaluation split file": (lambda w: {"data": {"source": str(_dataset(w, "no-test", test=[]).joinpath("train.jsonl").parent),
                                                      "eval_split": "validation"}}, "validation"),
    "empty training split": (lambda w: {"data": {"source": str(_dataset(w, "empty-train", train=[]))}}, "train"),
    "references of the wrong type": (lambda w: {"data": {"source": str(_dataset(w, "refs-42", train=[
        {"id": "a", "prompt": "What is 1 plus 1?", "references": 42}, *w["rows"]["train"]]))}}, "references"),
    "bytes that are not UTF-8": (lambda w: {"data": {"source": str(_dataset(w, "latin1", raw_train=(
        json.dumps(w["rows"]["train"][0]) + "\n").encode() + b'{"id": "x", "prompt": "caf\xe9", "references": ["a"]}\n'))}},
        "train.jsonl"),
    "missing prompt field": (lambda w: {"data": {"source": str(w["data"]), "prompt_field": "question", "format": "prompt"}}, "question"),
    "evaluation prompts seen in training": (lambda w: {"data": {"source": str(_dataset(w, "leaky", test=w["rows"]["train"][:5]))}},
                                            "training"),
    "one file for both splits": (lambda w: {"data": {"source": str(w["data"] / "train.jsonl")}}, "train.jsonl"),
    "teacher weights only as pickle": (lambda w: {"teacher": {"model": _model_folder(w, "pickle-only", keep=("config.json",),
                                                                                     extra={"pytorch_model.bin": b"\x80\x04"})}},
                                       "safetensors"),
    "teacher folder without config.json": (lambda w: {"teacher": {"model": _model_folder(w, "no-config", keep=(),
                                                                                         extra={"model.safetensors": b""})}},
                                           "config.json"),
    "teacher and student tokenizers differ": (lambda w: {"train": {"student": _other_tokenizer_model(w)}}, "tokenizer"),
    "top_k above the vocabulary": (lambda w: {"teacher": {"top_k": 1000}}, "teacher.top_k"),
    "more training workers than CPUs": (lambda w: {"train": {"num_workers": 3, "batch_size": 6}}, "train.num_workers"),
    "registry path is a file": (lambda w: {"promotion": {"registry_dir": _registry_file(w)}}, "registry"),
    "prompt longer than the context": (lambda w: {"data": {"source": str(_dataset(w, "long", train=_long_prompt_rows(w)))}},
                                       "tokens"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(PREPARE_CASES))
def test_bad_inputs_fail_in_prepare_before_the_teacher(case, workspace, tmp_path, capsys, prefect_server, ray_local):
    make_sections, expected = PREPARE_CASES[case]
    data_dir = tmp_path / "data"
    code, err, seconds = _run_flow(_flow_config(workspace, data_dir, **make_sections(workspace)), tmp_path, capsys)
    assert code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stillhouse: error:") and expected in last, last
    assert "Traceback" not in err, "a user error is reported as its message, without a traceback"
    run = _only_run(data_dir)
    assert run["status"] == "failed" and run["failed_stage"] == "prepare-data" and expected in run["error"], run
    assert not (data_dir / "cache" / "labels").exists(), "the teacher stage must not have started"
    assert seconds < 60, f"took {seconds:.0f}s to fail"


# --------------------------------------------------------------------------------------------------------------
# Storage faults: what the training stage reads.


def _copy_labels(tiny_labels: str, target: Path) -> Path:
    import shutil

    shutil.copytree(Path(tiny_labels).parent, target)
    return target / "manifest.json"


@pytest.mark.parametrize("case", ["escaping shard path", "absolute shard path", "row count mismatch", "truncated manifest",
                                  "corrupt shard"])
def test_label_manifest_faults_are_refused_with_the_file(case, tiny_labels, tmp_path):
    from storage import soft_labels
    from storage.errors import UserError

    manifest_path = _copy_labels(tiny_labels, tmp_path / "labels")
    manifest = json.loads(manifest_path.read_text())
    if case == "escaping shard path":
        manifest["shards"][0]["path"] = "../../../etc/passwd"
    elif case == "absolute shard path":
        manifest["shards"][0]["path"] = "/etc/passwd"
    elif case == "row count mismatch":
        manifest["shards"][0]["rows"] += 1
    if case == "truncated manifest":
        manifest_path.write_text(manifest_path.read_text()[:50])
    elif case == "corrupt shard":
        shard = manifest_path.parent / manifest["shards"][1]["path"]
        shard.write_bytes(shard.read_bytes()[:-30])
    else:
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError) as caught:
        list(soft_labels.read(manifest_path))
    message = str(caught.value)
    assert "manifest.json" in message or "shard-" in message, message


def test_existing_run_name_is_never_overwritten(tmp_path):
    from tasks.runs import claim_run_dir

    first = claim_run_dir(tmp_path, "nightly", owner="flow-run-a")
    (first / "run.json").write_text("{}")
    second = claim_run_dir(tmp_path, "nightly", owner="flow-run-b")
    assert first.name == "nightly" and second.name == "nightly-2" and (first / "run.json").read_text() == "{}"
    assert claim_run_dir(tmp_path, "nightly", owner="flow-run-a") == first, "a retried flow run continues in its own folder"


def test_interrupted_stage_is_not_taken_for_finished(tmp_path):
    """A stage that dies before its completion record is written runs again in the same folder on the next call."""
    from pydantic import BaseModel

    from tasks.contracts import StageOutput
    from tasks.stage_cache import StageSpec, run_cached

    class Cfg(BaseModel):
        x: int = 1

    calls = []

    def body(config, inputs, ctx):
        calls.append(ctx.out_dir)
        (ctx.out_dir / "partial").write_text("half")
        if len(calls) == 1:
            raise RuntimeError("killed")
        return StageOutput(key=ctx.key)

    spec = StageSpec(name="demo-stage", version=1, output_type=StageOutput, run=body, key_parts=lambda c, i: {})
    with pytest.raises(RuntimeError):
        run_cached(spec, Cfg(), None, cache_root=tmp_path, log=lambda m: None)
    out = run_cached(spec, Cfg(), None, cache_root=tmp_path, log=lambda m: None)
    assert len(calls) == 2 and calls[0] == calls[1] and not out.reused
    again = run_cached(spec, Cfg(), None, cache_root=tmp_path, log=lambda m: None)
    assert again.reused and len(calls) == 2
