"""Training loop: exact gradients across workers and accumulation, exact resume, Ray Train with a crashed worker."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tasks.train.loop import train
from tasks.train.runtime import LocalRuntime


def _config(student, manifest, out_dir, **over):
    """The loop's typed config, built the one way the stage builds it (LoopConfig.build from a TrainConfig)."""
    from tasks.config import TrainConfig
    from tasks.train.loop_config import LoopConfig

    settings = {"objective": "fkl+ce", "steps": 6, "batch_size": 8, "learning_rate": 1e-2, "warmup_steps": 1,
                "checkpoint_every": 3, **over}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return LoopConfig.build(TrainConfig(**settings), student_dir=student, manifest=manifest, out_dir=out_dir)


def _weights(out_dir):
    return load_file(Path(out_dir) / "student" / "model.safetensors")


def gradient_worker(config):
    """Ray worker: this rank's rows in two micro-batches; rank 0 saves the DDP-averaged gradient."""
    from storage import soft_labels
    from tasks.models import load_causal_lm, load_tokenizer, tokenizer_hash
    from tasks.objectives import build_objective
    from tasks.train.batches import collate
    from tasks.train.loop import accumulate_gradients
    from tasks.train.runtime import RayRuntime
    from tasks.train.stream import worker_shards

    runtime = RayRuntime()
    torch.set_num_threads(1)
    tok = load_tokenizer(config["student"])
    shards = worker_shards(len(soft_labels.load_manifest(config["manifest"])["shards"]), runtime.rank, runtime.world)
    records = list(soft_labels.read(config["manifest"], expected_tokenizer_hash=tokenizer_hash(tok), vocab_size=len(tok), shards=shards))
    model = runtime.prepare_model(load_causal_lm(config["student"]))
    micro = [collate(records[i::2], tok.pad_token_id, 8) for i in range(2)]
    accumulate_gradients(model, build_objective("akl+ce"), micro, runtime)
    if runtime.rank == 0:
        core = model.module if hasattr(model, "module") else model
        save_file({n: p.grad.contiguous() for n, p in core.named_parameters()}, config["out"])


def test_two_workers_with_accumulation_match_one_process(tiny_student, tiny_labels, tmp_path, ray_local):
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from storage import soft_labels
    from tasks.models import load_causal_lm, load_tokenizer
    from tasks.objectives import build_objective
    from tasks.train.batches import collate
    from tasks.train.loop import accumulate_gradients

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = str(tmp_path / "grads.safetensors")
    TorchTrainer(gradient_worker, train_loop_config={"student": tiny_student, "manifest": tiny_labels, "out": out},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="grad", storage_path=str(tmp_path / "ray"))).fit()
    distributed = load_file(out)

    tok = load_tokenizer(tiny_student)
    model = load_causal_lm(tiny_student)
    records = list(soft_labels.read(tiny_labels))
    accumulate_gradients(model, build_objective("akl+ce"), [collate(records, tok.pad_token_id, 8)], LocalRuntime())
    for name, param in model.named_parameters():
        torch.testing.assert_close(distributed[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_resume_from_checkpoint_equals_uninterrupted(tiny_student, tiny_labels, tmp_path, lora):
    """Kill after the step-3 checkpoint, resume: same weights as one run (with LoRA dropout: the RNG state is restored)."""
    full = _config(tiny_student, tiny_labels, tmp_path / "full", lora=lora)
    train(full, LocalRuntime())

    class Crash(RuntimeError):
        pass

    class CrashAfterFirstCheckpoint(LocalRuntime):
        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            raise Crash

    resumed = _config(tiny_student, tiny_labels, tmp_path / "resumed", lora=lora)
    with pytest.raises(Crash):
        train(resumed, CrashAfterFirstCheckpoint(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "step-3").exists() and not (tmp_path / "resumed" / "student").exists()
    train(resumed, LocalRuntime(tmp_path / "ckpt"))
    log = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert [int(__import__("json").loads(line)["step"]) for line in log] == [1, 2, 3, 4, 5, 6]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    # and training moved the weights at all
    init = load_file(Path(tiny_student) / "model.safetensors")
    assert any(not torch.allclose(init[n], a[n]) for n in init)


def test_checkpoint_from_another_model_is_rejected(tiny_student, tiny_labels, tmp_path):
    from transformers import LlamaForCausalLM

    from tasks.demo.models import llama_config
    from tasks.models import load_tokenizer
    from tasks.train.checkpoint import load_checkpoint, save_checkpoint

    tok = load_tokenizer(tiny_student)
    other = LlamaForCausalLM(llama_config(tok, hidden=128, layers=1, heads=2))
    opt = torch.optim.AdamW(other.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path / "c", model=other, optimizer=opt, scheduler=sched, step=1, extra={})
    mine = LlamaForCausalLM(llama_config(tok, hidden=64, layers=1, heads=1))
    opt2 = torch.optim.AdamW(mine.parameters())
    with pytest.raises((ValueError, RuntimeError), match="size mismatch|does not fit"):
        load_checkpoint(tmp_path / "c", model=mine, optimizer=opt2, scheduler=torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0))


def test_fsdp_worker_killed_and_restarted_matches_a_clean_ddp_run(tiny_student, tiny_labels, tmp_path, ray_local):
    """Two Ray Train workers with gradient accumulation. Clean: DDP. Then FSDP2 (sharded parameters and optimizer
    state), SIGKILL of rank 0 at step 5; Ray restarts the workers from the last gathered checkpoint.
    Same weights either way: sharding, checkpoint gathering and restart change nothing."""
    from tasks.config import TrainConfig
    from tasks.faults import FaultPlan
    from tasks.train.stage import run_train_stage

    cfg = TrainConfig(steps=6, batch_size=8, learning_rate=1e-2, warmup_steps=1, checkpoint_every=2, max_failures=1,
                      objective="fkl+ce", num_workers=2, grad_accum_steps=2)
    run_train_stage(cfg, tiny_student, tiny_labels, tmp_path / "clean")
    marker = tmp_path / "killed-once"
    # Checkpoints through a URI (pyarrow filesystem), as on a cluster with an object store.
    sharded = cfg.model_copy(update={"strategy": "fsdp", "checkpoint_storage": f"file://{tmp_path}/shared-ckpt"})
    run_train_stage(sharded, tiny_student, tiny_labels, tmp_path / "crashed",
                    faults=FaultPlan(kill_train_at_step=5, kill_marker=str(marker)))
    assert marker.exists(), "the fault was not injected"
    assert list((tmp_path / "shared-ckpt" / "train-crashed").glob("checkpoint_*")), "no checkpoint at the URI"
    steps = [__import__("json").loads(line)["step"] for line in (tmp_path / "crashed" / "train_log.jsonl").read_text().splitlines()]
    # Ray Train registers a reported checkpoint when its controller next polls the workers, so a kill right after
    # a report may lose that one: the restart resumes from the step-4 or the step-2 checkpoint, never from scratch.
    assert steps[:4] == [1, 2, 3, 4] and steps[4] in (3, 5) and steps[-1] == 6 and steps.count(1) == 1, steps
    # The final checkpoint carries the student: a driver without the workers' filesystem fetches it from there.
    import shutil

    from ray.train import Checkpoint

    from tasks.train.stage import fetch_student

    final = sorted(p for p in (tmp_path / "shared-ckpt" / "train-crashed").glob("checkpoint_*") if p.is_dir())[-1]
    shutil.rmtree(tmp_path / "crashed" / "student")
    fetch_student(Checkpoint(path=str(final)), tmp_path / "crashed" / "student")
    a, b = _weights(tmp_path / "clean"), _weights(tmp_path / "crashed")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_resume_with_other_batch_settings_is_refused(tiny_student, tiny_labels, tmp_path):
    """The checkpoint records where the data stood; a resume that would read other batches stops with a message."""
    train(_config(tiny_student, tiny_labels, tmp_path / "a", steps=3), LocalRuntime(tmp_path / "ckpt"))
    state = __import__("json").loads((tmp_path / "ckpt" / "step-3" / "trainer_state.json").read_text())
    # 2 shards of 8 rows, batch 8: one batch per shard, so step 3 is epoch 1's second shard, batch 0.
    assert state["data_position"]["epoch"] == 1 and state["data_position"]["batch"] == 0
    assert (tmp_path / "ckpt" / "step-3" / "rng.safetensors").exists()
    with pytest.raises(ValueError, match="data position"):
        train(_config(tiny_student, tiny_labels, tmp_path / "b", steps=6, batch_size=4), LocalRuntime(tmp_path / "ckpt"))


def test_lora_trains_only_the_adapted_layers_and_saves_a_plain_model(tiny_student, tiny_labels, tmp_path):
    from transformers import AutoModelForCausalLM

    train(_config(tiny_student, tiny_labels, tmp_path / "out", steps=3, lora=LORA), LocalRuntime())
    init, out = load_file(Path(tiny_student) / "model.safetensors"), _weights(tmp_path / "out")
    assert set(out) == set(init), "the saved student must be a plain HF model (adapters merged, no lora_ tensors)"
    changed = {name for name in init if not torch.equal(init[name], out[name])}
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed), changed
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "student")


def test_lora_on_modules_the_student_lacks_is_an_error(tiny_student, tiny_labels, tmp_path):
    with pytest.raises(ValueError, match="target_modules"):
        train(_config(tiny_student, tiny_labels, tmp_path / "out", steps=1, lora={**LORA, "target_modules": ["nope_proj"]}),
              LocalRuntime())


def test_training_from_labels_at_a_uri_equals_training_from_the_local_copy(tiny_student, tiny_labels, tmp_path):
    import fsspec

    memory = fsspec.filesystem("memory")
    for f in Path(tiny_labels).parent.iterdir():
        memory.pipe(f"/train-uri/{f.name}", f.read_bytes())
    train(_config(tiny_student, tiny_labels, tmp_path / "local", steps=3), LocalRuntime())
    train(_config(tiny_student, "memory://train-uri/manifest.json", tmp_path / "uri", steps=3), LocalRuntime())
    a, b = _weights(tmp_path / "local"), _weights(tmp_path / "uri")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_unwritable_checkpoint_storage_is_refused_before_training(tiny_student, tiny_labels, tmp_path, ray_local):
    from tasks.config import TrainConfig
    from tasks.train.stage import TrainingError, run_train_stage

    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(TrainingError, match="train.checkpoint_storage .* is not writable"):
        run_train_stage(TrainConfig(steps=1, checkpoint_storage=f"file://{blocker}/ckpt"), tiny_student, tiny_labels, tmp_path / "out")
    assert not (tmp_path / "out" / "train_log.jsonl").exists()
