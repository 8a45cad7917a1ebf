"""SIGKILL the whole training driver (Ray head included) after a checkpoint; a rerun resumes and matches a clean run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

DRIVER = """
import sys
from pathlib import Path
from tasks.config import TrainConfig
from tasks.faults import FaultPlan
from tasks.train.stage import run_train_stage
cfg = TrainConfig(steps=6, batch_size=8, learning_rate=1e-2, warmup_steps=1, checkpoint_every=2, objective="fkl+ce")
run_train_stage(cfg, sys.argv[1], sys.argv[2], Path(sys.argv[3]), faults=FaultPlan(step_pause_s=float(sys.argv[4])))
"""


def _run(student, labels, out_dir, step_pause_s=0.0, stdout=subprocess.PIPE):
    return subprocess.Popen([sys.executable, "-c", DRIVER, student, labels, str(out_dir), str(step_pause_s)], env=dict(os.environ),
                            stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)


def test_driver_sigkill_then_rerun_resumes(tiny_student, tiny_labels, tmp_path):
    # The clean reference and the run to kill start together (the victim mostly sleeps); each has its own Ray.
    clean_log = (tmp_path / "clean.log").open("wb")
    clean = _run(tiny_student, tiny_labels, tmp_path / "clean", stdout=clean_log)
    # Slow the steps down so the kill lands mid-run, after at least one checkpoint.
    victim = _run(tiny_student, tiny_labels, tmp_path / "killed", step_pause_s=1.0)
    log = tmp_path / "killed" / "train_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if log.exists() and any(json.loads(line)["step"] >= 3 for line in log.read_text().splitlines()):
            break
        time.sleep(0.5)
    os.killpg(victim.pid, signal.SIGKILL)  # the driver, its Ray head and workers: nothing survives
    victim.wait(timeout=60)
    assert not (tmp_path / "killed" / "student").exists(), "killed too late: training had finished"

    assert clean.wait(timeout=300) == 0, (tmp_path / "clean.log").read_text()[-3000:]

    rerun = _run(tiny_student, tiny_labels, tmp_path / "killed")
    out = rerun.communicate(timeout=300)[0].decode()
    assert rerun.returncode == 0, out[-3000:]
    assert "resumed from checkpoint at step" in out
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps[-1] == 6 and steps.count(1) == 1, f"the rerun must not start again from step 1: {steps}"
    a = load_file(tmp_path / "clean" / "student" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "student" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
