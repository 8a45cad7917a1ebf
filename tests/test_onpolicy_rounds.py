"""On-policy rounds end to end on tiny models (real vLLM teacher and student engines, real Ray).

The stage runs in a subprocess driver (its own Ray and engines) through the stage cache, like a Prefect
task would. Resume after SIGKILL between and during rounds is tested through the Prefect API on the deployed
flow (tests/test_prefect_server.py); the staleness checks in tests/test_onpolicy.py.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

DRIVER = """
import json, sys
from pathlib import Path
from tasks.contracts import SplitFile
from tasks.faults import FaultPlan
from tasks.onpolicy.config import OnPolicyConfig
from tasks.onpolicy.rounds import STAGE, OnPolicyInputs
from tasks.stage_cache import run_cached
args = json.loads(sys.argv[1])
cfg = OnPolicyConfig(**args["config"])
inputs = OnPolicyInputs(**args["inputs"])
out = run_cached(STAGE, cfg, inputs, cache_root=Path(args["cache_root"]), log=lambda line: print(line, flush=True),
                 faults=FaultPlan(**args.get("faults", {})))
print("RESULT " + out.model_dump_json(), flush=True)
"""


def _setup(tmp_path, tiny_student, prompts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.atomic import sha256_file
    from tests.conftest import perturbed_copy

    teacher_dir = tmp_path / "teacher"
    if not teacher_dir.exists():
        perturbed_copy(tiny_student, teacher_dir, seed=1, scale=0.5)
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(prompts), path)
    return {"student_dir": tiny_student, "teacher_dir": str(teacher_dir),
            "prompts": {"path": str(path), "rows": len(prompts), "sha256": sha256_file(path)}}


def _config(method, **extra):
    return {"method": method, "rounds": 2, "prompts_per_round": 4, "max_new_tokens": 6, "inner_epochs": 2, "batch_size": 2,
            "lm_batch_size": 2, "learning_rate": 1e-3, "top_k": 8, "cpus_per_actor": 0.5, **extra}


def _launch(args, log_path=None):
    stdout = open(log_path, "wb") if log_path else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], stdout=stdout, stderr=subprocess.STDOUT,
                            env=dict(os.environ), start_new_session=True)


def _run(args, timeout=900):
    proc = _launch(args)
    out = proc.communicate(timeout=timeout)[0].decode()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the driver left (its Ray head) after a SIGKILL
    except ProcessLookupError:
        pass
    return proc.returncode, out


def _stage_folder(cache_root):
    (folder,) = list((Path(cache_root) / "onpolicy").iterdir())
    return folder


@pytest.mark.parametrize("method,extra", [
    # minillm (teacher-mixed sampling, transformers lockstep) runs through the flow in tests/test_prefect_server.py
    # (killed and resumed between and during rounds) and in the resume test below; minillm with teacher_mix off is
    # left out to keep the suite short: the vLLM rollout path runs in these two cases, the MiniLLM loss in the unit tests.
    ("gkd", {"gkd_lambda": 0.5}),         # on-policy batches with probability 0.5, the stored teacher labels otherwise
    ("onpolicy_rkl", {}),
])
def test_rounds_run_and_record_metrics(request, tmp_path, tiny_student, prompts, method, extra):
    inputs = _setup(tmp_path, tiny_student, prompts)
    if method == "gkd" and extra.get("gkd_lambda", 1.0) < 1.0:
        inputs["labels_manifest"] = request.getfixturevalue("tiny_labels")
    args = {"config": _config(method, **extra), "inputs": inputs, "cache_root": str(tmp_path / "cache")}
    rc, out = _run(args)
    assert rc == 0, out[-4000:]
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert (Path(result["checkpoint"]) / "config.json").exists()
    lines = [line for line in out.splitlines() if line.startswith("onpolicy: round ")]
    assert [line.split()[2] for line in lines] == ["1/2", "2/2"], out[-3000:]
    rounds = [json.loads(line) for line in Path(result["log"]).read_text().splitlines()]
    assert [r["policy_version"] for r in rounds] == [0, 1]
    for r in rounds:
        assert r["rollouts"] == 4 and r["steps"] == 4 and r["reverse_kl"] >= 0 and r["mean_response_length"] >= 1
        assert set(r["seconds"]) == {"engine", "rollout", "scoring", "update"}
        assert abs(r["logprob_mismatch_max"]) < 1e-3, "rollout log-probs must be the trained student's own"
    if method == "gkd":
        # Seeded coin flips (seed 0): 3 of the 8 batches are rollouts, the rest stored labels, in both rounds.
        on_policy = [r["on_policy_batches"] for r in rounds]
        assert all(0 < n < r["steps"] for n, r in zip(on_policy, rounds)), on_policy
    meta = json.loads((_stage_folder(tmp_path / "cache") / "onpolicy_meta.json").read_text())
    mixes = method == "minillm" and extra.get("teacher_mix", "exact") == "exact"
    assert meta["sampler"] == ("teacher_mixed_hf" if mixes else "student_vllm")
    assert meta["alpha"] == (0.2 if mixes else 0.0)
    if mixes:
        assert rounds[0]["importance_weight_min"] < 1.0 or rounds[0]["importance_weight_mean"] != 1.0
    else:
        assert rounds[0]["importance_weight_mean"] == pytest.approx(1.0)
    a = load_file(Path(tiny_student) / "model.safetensors")
    b = load_file(Path(result["checkpoint"]) / "model.safetensors")
    assert any(not torch.equal(a[n], b[n]) for n in a), "the student did not change"
