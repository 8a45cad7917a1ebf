"""Expansion, curation and MixKD as flow stages: the curate stage's tokenisation equals prepare's, its counts are
exact, a MixKD training step's loss is MixKDLoss on the same batch, per-step pairs are a function of (step, rank)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tasks.augment import MixKDConfig, run_mixkd_teacher_stage, run_plan_stage
from tasks.augment.flow_stage import MixKDLabels
from tasks.augment.training import MixKDStep, build_loss, step_rows
from tasks.contracts import PreparedData, SplitFile
from tasks.curate import CurateConfig
from tasks.expand import EXPANDED_SCHEMA
from tasks.expand.flow_stage import ExpandedPrompts, fill, prompt_frame, unfill

QUIET = {"log": lambda _: None}


def test_prompt_frame_takes_the_template_off_and_puts_it_back():
    from tasks.config import DataConfig

    assert prompt_frame(DataConfig(), "prompt") is None  # the default template: prepare stores the prompt itself
    assert fill(None, "x") == unfill(None, "x") == "x"
    template = prompt_frame(DataConfig(prompt_template="{prompt}\nAnswer:"), "prompt")
    assert template == "{prompt}\nAnswer:"
    assert unfill(template, "What is 3 plus 5?\nAnswer:") == "What is 3 plus 5?"
    assert fill(template, "What is 3 plus 5?") == "What is 3 plus 5?\nAnswer:"
    assert unfill(template, "no frame here") == "no frame here"
    assert prompt_frame(DataConfig(prompt_template="Q: {prompt} ({{x}})"), "prompt") == "Q: {prompt} ({{x}})"
    assert unfill("Q: {prompt} ({{x}})", "Q: hi ({x})") == "hi"
    assert prompt_frame(DataConfig(prompt_template="{instruction}\n\n{input}"), "prompt") is None
    assert prompt_frame(DataConfig(), "alpaca") is None


# --- curation stage --------------------------------------------------------------------------------------------


def _prepared(tmp_path: Path, student: str, train: list[str], test: list[str]) -> PreparedData:
    from tasks.config import DataConfig
    from tasks.data import prepare

    src = tmp_path / "src"
    src.mkdir()
    for name, prompts in (("train", train), ("test", test)):
        with (src / f"{name}.jsonl").open("w") as f:
            for i, p in enumerate(prompts):
                f.write(json.dumps({"id": f"{name}-{i}", "prompt": p, "references": [f"r{i}"]}) + "\n")
    m = prepare(DataConfig(source=str(src)), str(src), student, student, tmp_path / "prompts", 16)
    return PreparedData(key="prepared-test", source=str(src), train=SplitFile(**m["splits"]["train"]),
                        eval=SplitFile(**m["splits"]["test"]), train_split="train", eval_split="test",
                        tokenizer_hash=m["tokenizer_hash"], vocab_size=m["vocab_size"], teacher_dir=student, student_dir=student,
                        teacher_hash="h", checks=m["checks"])


def _expanded(tmp_path: Path, prompts: list[str]) -> ExpandedPrompts:
    rows = [{"example_id": f"gen-0-{i:06d}", "prompt": p, "prompt_ids": [1], "references": [], "seed_ids": ["train-0"],
             "teacher": "t", "teacher_hash": "h", "sampling": "{}", "generation_seed": i, "round": 0, "raw_output": p}
            for i, p in enumerate(prompts)]
    path = tmp_path / "expanded.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=EXPANDED_SCHEMA), path)
    from storage.atomic import sha256_file

    return ExpandedPrompts(key="expanded-test", prompts=SplitFile(path=str(path), rows=len(rows), sha256=sha256_file(path)),
                           manifest=str(path), template=None, seeds=3, stats={}, complete=True)


TRAIN = ["What is 3 plus 5?", "Which is bigger, 12 or 40?", "What is the opposite of hot?", "What colour is the sky?",
         "What is 3 plus 5?"]  # the last one: a planted exact duplicate among the originals
TEST = ["What is 7 plus 2?", "What is the opposite of cold?"]


def test_curate_stage_counts_filters_and_tokenises_like_prepare(tmp_path, tiny_student):
    from tasks.config import DataConfig
    from tasks.curate import flow_stage as curate_stage
    from tasks.data import read_prompts
    from tasks.models import load_tokenizer
    from tasks.stage_cache import run_cached

    prepared = _prepared(tmp_path, tiny_student, TRAIN, TEST)
    expanded = _expanded(tmp_path, [
        "What is 9 plus 1?",                   # new: kept
        "what is 3  PLUS 5?",                  # exact duplicate of an original (normalised)
        "What is the opposite of cold?",       # a held-out prompt: decontaminated
        "Which is bigger, 12 or 40 ?",         # near duplicate (same words, other spacing around '?')
        "plus plus plus plus plus plus plus",  # repetition
    ])
    inputs = curate_stage.CurateInputs(prepared=prepared, expanded=expanded, data=DataConfig(), max_new_tokens=16)
    out = run_cached(curate_stage.STAGE, CurateConfig(), inputs, cache_root=tmp_path / "cache", **QUIET)
    assert out.removed_by == {"exact_dedup": 2, "near_dedup": 1, "repetition": 1, "decontaminate": 1}
    assert (out.rows_in, out.rows_out, out.original_rows, out.expanded_rows) == (10, 5, 5, 5)
    assert (out.kept_original, out.kept_expanded) == (4, 1)
    kept = read_prompts(out.train.path)
    assert [r["example_id"] for r in kept] == ["train-0", "train-1", "train-2", "train-3", "gen-0-000000"]
    original = {r["example_id"]: r for r in read_prompts(prepared.train.path)}
    for r in kept[:4]:  # prompt text, ids and references exactly as prepare wrote them
        assert (r["prompt"], r["prompt_ids"], r["references"]) == (original[r["example_id"]]["prompt"],
                                                                   original[r["example_id"]]["prompt_ids"],
                                                                   original[r["example_id"]]["references"])
    tok = load_tokenizer(tiny_student)
    assert kept[4]["prompt"] == "What is 9 plus 1?"  # stored like prepare stores prompts; tokenised with the answer cue
    assert kept[4]["prompt_ids"] == tok("What is 9 plus 1?\nAnswer:")["input_ids"]
    manifest = json.loads(Path(out.manifest).read_text())
    assert {f["name"]: f["removed"] for f in manifest["filters"]} == out.removed_by
    assert out.summary()["removed_by"] == out.removed_by
    again = run_cached(curate_stage.STAGE, CurateConfig(), inputs, cache_root=tmp_path / "cache", **QUIET)
    assert again.reused and again.train == out.train


def test_curated_eval_overlap_is_refused_unless_allowed(tmp_path, tiny_student):
    from storage.errors import UserError
    from tasks.config import DataConfig
    from tasks.curate import flow_stage as curate_stage
    from tasks.stage_cache import run_cached

    prepared = _prepared(tmp_path, tiny_student, TRAIN[:4], TEST)
    expanded = _expanded(tmp_path, ["What is the opposite of cold?"])
    cfg = CurateConfig(decontaminate=False)
    inputs = curate_stage.CurateInputs(prepared=prepared, expanded=expanded, data=DataConfig(), max_new_tokens=16)
    with pytest.raises(UserError, match="evaluation prompt"):
        run_cached(curate_stage.STAGE, cfg, inputs, cache_root=tmp_path / "cache", **QUIET)
    allowed = inputs.model_copy(update={"data": DataConfig(allow_eval_overlap=True)})
    assert run_cached(curate_stage.STAGE, cfg, allowed, cache_root=tmp_path / "cache", **QUIET).kept_expanded == 1


def test_pipeline_config_rules_for_expand_curate_mixkd():
    from tasks.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="expand needs curate"):
        load_config(None, {"expand": {}})
    with pytest.raises(ConfigError, match="no references to score"):
        load_config(None, {"expand": {}, "curate": {}, "teacher.mode": "score"})
    with pytest.raises(ConfigError, match="train.mixkd does not combine"):
        load_config(None, {"train.mixkd": {}, "train.fused_head": True})
    with pytest.raises(ConfigError, match="mixed_objective"):
        load_config(None, {"train.mixkd": {"mixed_objective": "ce"}})
    cfg = load_config(None, {"expand": {"num_prompts": 10}, "curate": {}, "train.mixkd": {"seed": 3}})
    assert cfg.expand.num_prompts == 10 and cfg.curate.decontaminate and cfg.train.mixkd.seed == 3
    assert load_config(None).expand is None and load_config(None).curate is None and load_config(None).train.mixkd is None


# --- MixKD in the training loop ------------------------------------------------------------------------------------


def test_step_rows_are_a_function_of_step_and_rank():
    one = [step_rows(13, s, 0, 1, 4) for s in range(8)]
    two = [step_rows(13, s, 0, 2, 4) + step_rows(13, s, 1, 2, 4) for s in range(8)]
    assert one == two
    assert one[0] == [0, 1, 2, 3] and one[3] == [12, 0, 1, 2]  # cycles through the plan in stored order


@pytest.fixture(scope="module")
def mixkd_labels(tmp_path_factory, tiny_student, tiny_labels):
    """A 2-epoch plan over the tiny labels and a teacher's labels on the mixed inputs (in-process): the teacher is
    the tiny student with perturbed weights, so the teacher-mixup term is not 0 at the student's init."""
    from tasks.models import load_causal_lm, load_tokenizer, save_pretrained_atomic

    root = tmp_path_factory.mktemp("mixkd")
    teacher = load_causal_lm(tiny_student)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    save_pretrained_atomic(teacher, load_tokenizer(tiny_student), root / "teacher")
    cfg = MixKDConfig(epochs=2, pairs_per_epoch=12, seed=3, top_k=8, batch_size=4)
    run_plan_stage(tiny_labels, root / "plan", cfg, log_fn=lambda _: None)
    manifests = run_mixkd_teacher_stage(str(root / "teacher"), tiny_labels, root / "plan", root / "labels", cfg, log_fn=lambda _: None)
    return cfg, MixKDLabels(key="mixkd-test", source_manifest=tiny_labels, plan_dir=str(root / "plan"),
                            label_manifests=manifests, pairs=24, epochs=2)


def test_mixkd_training_step_loss_is_mixkd_loss_on_the_same_batch(tmp_path, tiny_student, tiny_labels, mixkd_labels):
    """One step of the production loop (LocalRuntime) logs exactly MixKDLoss of the initial student on the step's
    original batch and the plan's pairs for step 0, each normalised by its own token count."""
    from tasks.augment import frame_logits
    from tasks.config import TrainConfig
    from tasks.models import load_causal_lm, load_tokenizer, tokenizer_hash
    from tasks.objectives import SparseLabels
    from tasks.train.batches import collate, model_inputs
    from tasks.train.loop import open_stream, train
    from tasks.train.loop_config import LoopConfig
    from tasks.train.runtime import LocalRuntime

    cfg, data = mixkd_labels
    logged = {}
    for accum in (1, 2):
        train_cfg = TrainConfig(objective="fkl+ce", steps=1, batch_size=4, grad_accum_steps=accum, learning_rate=1e-2,
                                warmup_steps=1, checkpoint_every=1, mixkd=cfg)
        out = tmp_path / f"accum{accum}"
        config = LoopConfig.build(train_cfg, student_dir=tiny_student, manifest=tiny_labels, out_dir=out, mixkd=data)
        train(config, LocalRuntime())
        logged[accum] = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])

    tok = load_tokenizer(tiny_student)
    stream, k = open_stream(config, 0, 1, tokenizer_hash(tok), len(tok))
    _, batch = next(stream.iter_from(0))
    mb = collate(batch, tok.pad_token_id, k)  # the whole step as one micro-batch: the loss is the same sum
    step = MixKDStep.open(train_cfg, data, rank=0, world=1, pad_id=tok.pad_token_id, tokenizer_hash=tokenizer_hash(tok),
                          vocab_size=len(tok))
    assert [r["plan_row_id"] for r in step.plan_rows(0)] == ["e0000-r000000", "e0000-r000001", "e0000-r000002", "e0000-r000003"]
    assert [r["plan_row_id"] for r in step.plan_rows(3)] == ["e0001-r000000", "e0001-r000001", "e0001-r000002", "e0001-r000003"]
    (mix, teacher), = step.micro_batches(0, 1, "cpu")
    model = load_causal_lm(tiny_student)
    torch.manual_seed(train_cfg.seed)
    labels = SparseLabels(ids=mb["ids"], logprobs=mb["logprobs"], tail_logmass=mb["tail_logmass"], target_ids=mb["target_ids"])
    loss_fn = build_loss(train_cfg)
    with torch.no_grad():
        expected = loss_fn(model(**model_inputs(mb)).logits[:, :-1], labels, mb["mask"], frame_logits(model, mix), mix, teacher,
                           mb["mask"].sum().float(), mix.union_mask.sum().float())
    assert logged[1]["loss"] == float(expected)  # one micro-batch: the same computation, bit for bit
    assert {p: logged[1][f"loss_{p}"] for p in ("kd", "sm", "tmkd")} == {p: loss_fn.last_parts[p] for p in ("kd", "sm", "tmkd")}
    assert float(expected) == pytest.approx(sum(w * loss_fn.last_parts[p] for w, p in zip((1, 1, 1), ("kd", "sm", "tmkd"))), rel=1e-6)
    # two micro-batches: each term is still divided by the step's global count, so the sums agree (float round-off)
    for name in ("loss", "loss_kd", "loss_sm", "loss_tmkd"):
        assert logged[2][name] == pytest.approx(logged[1][name], rel=1e-5)


def test_loop_config_needs_the_mixkd_labels_with_train_mixkd(tiny_student, tiny_labels, tmp_path):
    from tasks.config import TrainConfig
    from tasks.train.loop_config import LoopConfig

    with pytest.raises(ValueError, match="go together"):
        LoopConfig.build(TrainConfig(mixkd=MixKDConfig()), student_dir=tiny_student, manifest=tiny_labels, out_dir=tmp_path)


@pytest.mark.integration
def test_mixkd_stage_through_run_cached_then_reused(tmp_path, tiny_student, tiny_labels, ray_local):
    from tasks.augment import flow_stage as mixkd_stage
    from tasks.contracts import TeacherLabels
    from tasks.stage_cache import run_cached

    labels = TeacherLabels(key="labels-test", train_manifest=tiny_labels, eval_manifest=tiny_labels)
    inputs = mixkd_stage.MixKDInputs(teacher_dir=tiny_student, teacher_model="tiny", labels=labels)
    cfg = MixKDConfig(pairs_per_epoch=10, top_k=8, seed=1)
    out = run_cached(mixkd_stage.STAGE, cfg, inputs, cache_root=tmp_path, **QUIET)
    assert (out.pairs, out.epochs, len(out.label_manifests), out.reused) == (10, 1, 1, False)
    assert run_cached(mixkd_stage.STAGE, cfg, inputs, cache_root=tmp_path, **QUIET).reused
    other = run_cached(mixkd_stage.STAGE, cfg.model_copy(update={"seed": 2}), inputs, cache_root=tmp_path, **QUIET)
    assert other.key != out.key and not other.reused


@pytest.mark.integration
def test_expand_stage_through_run_cached(tmp_path, tiny_student, ray_local, monkeypatch):
    """The tiny model as teacher in a Ray actor (vLLM): seeds are the prepared prompts without the template."""
    from tasks.config import TeacherConfig
    from tasks.expand import ExpandConfig
    from tasks.expand import flow_stage as expand_stage
    from tasks.stage_cache import run_cached

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    prepared = _prepared(tmp_path, tiny_student, TRAIN[:4], TEST)
    inputs = expand_stage.ExpandInputs(prepared=prepared, teacher=TeacherConfig(model="tiny"), template=None)
    cfg = ExpandConfig(num_prompts=4, shots=2, samples_per_request=2, requests_per_round=4, max_rounds=2, max_new_tokens=12)
    out = run_cached(expand_stage.STAGE, cfg, inputs, cache_root=tmp_path / "cache", **QUIET)
    seeds = pq.read_table(Path(out.prompts.path).parent / expand_stage.SEEDS_NAME).to_pylist()
    assert [s["prompt"] for s in seeds] == TRAIN[:4]
    rows = pq.read_table(out.prompts.path).to_pylist()
    assert len(rows) == out.prompts.rows == out.stats["accepted"] <= 4
    assert all(set(r["seed_ids"]) <= {"train-0", "train-1", "train-2", "train-3"} for r in rows)
    assert run_cached(expand_stage.STAGE, cfg, inputs, cache_root=tmp_path / "cache", **QUIET).reused


def test_curate_stage_judge_filter_asks_the_teacher_about_the_survivors(tmp_path, tiny_student):
    """curate.judge_template through the stage: the teacher's judgement of each prompt decides among what the other
    filters kept (the judge filter runs last), prompts below judge_min are dropped and reported, and the judged run
    is its own cache entry."""
    import statistics

    from tasks.config import DataConfig
    from tasks.curate import flow_stage as curate_stage
    from tasks.data import read_prompts
    from tasks.stage_cache import run_cached

    prepared = _prepared(tmp_path, tiny_student, TRAIN, TEST)
    expanded = _expanded(tmp_path, ["What is 9 plus 1?", "What is the opposite of cold?"])
    inputs = curate_stage.CurateInputs(prepared=prepared, expanded=expanded, data=DataConfig(), max_new_tokens=16)
    plain = run_cached(curate_stage.STAGE, CurateConfig(), inputs, cache_root=tmp_path / "cache", **QUIET)
    survivors = read_prompts(plain.train.path)
    template = "Question: {prompt}\nIs it one of the bigger ones? Say bigger or plus:"
    probe = CurateConfig(judge_template=template, judge_yes=" bigger", judge_no=" plus")
    judged = curate_stage.teacher_judgements(prepared.teacher_dir, survivors, probe)
    cut = statistics.median(judged.values())
    cfg = probe.model_copy(update={"judge_min": cut})
    out = run_cached(curate_stage.STAGE, cfg, inputs, cache_root=tmp_path / "cache", **QUIET)
    assert not out.reused
    kept = [r["example_id"] for r in read_prompts(out.train.path)]
    assert kept == [r["example_id"] for r in survivors if judged[r["example_id"]] >= cut] and 0 < len(kept) < len(survivors)
    assert out.removed_by["judge"] == len(survivors) - len(kept)
