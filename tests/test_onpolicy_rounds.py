"""On-policy rounds end to end on tiny models (real vLLM teacher, real Ray), and resume after SIGKILL.

The stage runs in a subprocess driver (its own Ray and engines) through the stage cache, like a Prefect
task would; the resume test SIGKILLs it at a round boundary and mid-round (FaultPlan), reruns it in the
same folder, and compares the final weights with an uninterrupted run's.
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
    from transformers import LlamaForCausalLM

    from storage.atomic import sha256_file
    from tasks.models import load_tokenizer, save_pretrained_atomic

    teacher_dir = tmp_path / "teacher"
    if not teacher_dir.exists():
        model = LlamaForCausalLM.from_pretrained(tiny_student)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        save_pretrained_atomic(model, load_tokenizer(tiny_student), teacher_dir)
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


def test_kill_between_and_during_rounds_then_resume_matches_uninterrupted(tmp_path, tiny_student, prompts):
    inputs = _setup(tmp_path, tiny_student, prompts)
    config = _config("minillm", rounds=3)
    clean = {"config": config, "inputs": inputs, "cache_root": str(tmp_path / "clean")}
    victim = {"config": config, "inputs": inputs, "cache_root": str(tmp_path / "victim")}

    # The clean reference runs alongside the first victim run.
    clean_proc = _launch(clean, tmp_path / "clean.log")
    rc, out = _run({**victim, "faults": {"kill_onpolicy_round": 1, "kill_onpolicy_phase": "start"}})
    assert rc == -signal.SIGKILL, out[-3000:]
    folder = _stage_folder(tmp_path / "victim")
    assert (folder / "round-0" / "round.json").exists() and not (folder / "round-1").exists()

    # Rerun: round 0 is skipped; killed again in round 2 after its rollouts were written, before scoring.
    rc, out = _run({**victim, "faults": {"kill_onpolicy_round": 2, "kill_onpolicy_phase": "rollouts"}})
    assert rc == -signal.SIGKILL, out[-3000:]
    assert "round 1/3 already complete" in out and "onpolicy: round 2/3 policy v1" in out
    assert (folder / "round-2" / "rollouts.parquet").exists() and not (folder / "round-2" / "round.json").exists()

    # Plant a stale rollout table (policy version 1) where round 2's belongs: it must be discarded, not trained on.
    (folder / "round-2" / "rollouts.parquet").write_bytes((folder / "round-1" / "rollouts.parquet").read_bytes())
    rc, out = _run(victim)
    assert rc == 0, out[-4000:]
    assert "round 1/3 already complete" in out and "round 2/3 already complete" in out
    assert "onpolicy: round 3/3 policy v2" in out and "(rollouts reused)" not in out
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rounds] == [0, 1, 2]

    assert clean_proc.wait(timeout=900) == 0, (tmp_path / "clean.log").read_text()[-3000:]
    # Exact equality of weights: sampling is seeded per prompt and round (transformers, CPU), the teacher's scores
    # are deterministic for the same inputs, batches are a function of (seed, round, epoch) and the optimizer state
    # is carried in each round's checkpoint.
    a = load_file(_stage_folder(tmp_path / "clean") / "student" / "model.safetensors")
    b = load_file(folder / "student" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)

    # The trainer's own check: labels whose manifest says another policy version are refused.
    from tasks.onpolicy.rollout import StaleRolloutError
    from tasks.onpolicy.rounds import load_round_records

    with pytest.raises(StaleRolloutError, match="policy_version is 1, expected 2"):
        load_round_records(folder / "round-1", 2)
