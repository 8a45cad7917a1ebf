"""Dynamic KD and multi-teacher labels in the flow: lazy labelling (selection -> teacher on the chosen prompts ->
one label set with reference rows for the rest), the KD/CE mixed loss, paired labels for dynamic teacher adoption,
and the multi-teacher stage (merge and routing) on real vLLM captures of tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from storage import soft_labels
from tasks.data import PROMPT_SCHEMA
from tasks.objectives import SparseLabels, build_objective
from tasks.objectives.weighting import NO_TEACHER_PART, DynamicTeacher, TeacherMasked, UncertaintyWeighted

# --- the mixed KD / CE loss (exact) ---------------------------------------------------------------------------------

def _batch(seed=0, B=4, T=5, V=13, k=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, -1)
    top = teacher.topk(k, -1)
    tail = torch.log1p(-top.values.exp().sum(-1))
    target = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    mask[3, 4] = False
    return logits, SparseLabels(ids=top.indices, logprobs=top.values, tail_logmass=tail, target_ids=target), mask


def _dense_reference(logits, labels, mask, kd_rows):
    """float64, by hand: fkl over top-k + tail bucket and ce on labelled rows; ce alone on the others; / all tokens."""
    total = 0.0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not mask[b, t]:
                continue
            q = torch.log_softmax(logits[b, t], -1)
            ce = -float(q[labels.target_ids[b, t]])
            if kd_rows[b]:
                p = labels.logprobs[b, t].exp()
                p_tail = float(labels.tail_logmass[b, t].exp())
                z = float(p.sum()) + p_tail  # stored labels are normalised over the k entries + the tail bucket
                p, p_tail = p / z, p_tail / z
                q_top = q[labels.ids[b, t]].exp()
                q_tail = 1.0 - float(q_top.sum())
                fkl = float((p * (p.log() - q_top.log())).sum())
                fkl += p_tail * (math.log(p_tail) - math.log(q_tail)) if p_tail > 0 else 0.0
                total += fkl + ce
            else:
                total += ce
    return total / int(mask.sum())


def test_mixed_label_set_loss_is_kd_on_labelled_rows_and_ce_elsewhere():
    logits, labels, mask = _batch()
    kd_rows = torch.tensor([True, False, True, False])
    masked = TeacherMasked(build_objective("fkl+ce"))
    got = masked(logits, labels, mask, kd_rows=kd_rows)
    assert float(got) == pytest.approx(_dense_reference(logits, labels, mask, kd_rows), rel=1e-10, abs=1e-12)
    assert set(masked.last_parts) == {"fkl", "ce", NO_TEACHER_PART}
    # All rows labelled: exactly the plain objective; none labelled: exactly ce over every valid token.
    plain = build_objective("fkl+ce")(logits, labels, mask)
    assert float(masked(logits, labels, mask)) == pytest.approx(float(plain), rel=1e-12)
    none = masked(logits, labels, mask, kd_rows=torch.zeros(4, dtype=torch.bool))
    assert float(none) == pytest.approx(float(build_objective("ce")(logits, labels, mask)), rel=1e-12)
    assert masked.last_parts["fkl"] == 0.0 and set(masked.last_parts) == {"fkl", "ce", NO_TEACHER_PART}


def test_mixed_loss_gradients_ignore_teacher_labels_of_rows_without_them():
    logits, labels, mask = _batch(seed=3)
    kd_rows = torch.tensor([True, True, False, False])
    garbage = SparseLabels(ids=labels.ids.clone(), logprobs=labels.logprobs.clone(), tail_logmass=labels.tail_logmass.clone(),
                           target_ids=labels.target_ids)
    garbage.logprobs[2:] = torch.log_softmax(torch.randn_like(garbage.logprobs[2:]), -1)  # other "teacher" values there
    grads = []
    for lab in (labels, garbage):
        x = logits.clone().requires_grad_(True)
        TeacherMasked(build_objective("fkl+ce"))(x, lab, mask, kd_rows=kd_rows).backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def test_uncertainty_weighting_composes_with_the_mask():
    logits, labels, mask = _batch(seed=5)
    kd_rows = torch.tensor([True, False, True, True])
    weighted = TeacherMasked(UncertaintyWeighted(build_objective("fkl+ce")))
    got = weighted(logits, labels, mask, kd_rows=kd_rows)
    kd_mask = mask & kd_rows[:, None]
    n = int(mask.sum())
    ref = UncertaintyWeighted(build_objective("fkl+ce"))(logits, labels, kd_mask, n) + build_objective("ce")(logits, labels, mask & ~kd_mask, n)
    assert float(got) == pytest.approx(float(ref), rel=1e-12)


# --- the loop's view of a selected label set ------------------------------------------------------------------------

def _write_set(out, rows, meta):
    records = [soft_labels.write_shard(out, i, rows[i * 3:(i + 1) * 3], meta) for i in range(math.ceil(len(rows) / 3))]
    return soft_labels.write_manifest(out, records, meta)


def _label_rows(tok, n, k, seed, prefix="e"):
    from tasks.teacher.extract import tail_logmass

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        t = 2 + i % 3
        logp = torch.log_softmax(torch.randn(t, len(tok), generator=g) * 3, -1)
        top = logp.topk(k, -1)
        response = torch.randint(4, len(tok), (t,), generator=g)
        rows.append({"sample_id": f"{prefix}{i}-s{seed}", "example_id": f"{prefix}{i}", "split": "train",
                     "response_source": "teacher_sample", "prompt_ids": [1, 5 + i], "response_ids": response.tolist(),
                     "topk_ids": top.indices.numpy(), "topk_logprobs": top.values.numpy(),
                     "token_logprob": logp.gather(1, response[:, None])[:, 0].numpy(),
                     "tail_logmass": tail_logmass(top.values.numpy()).astype(np.float32)})
    return rows


def _meta(tok, k, key="t1", codec="compact-v1"):
    from tasks.models import tokenizer_hash

    return {"k": k, "tokenizer_hash": tokenizer_hash(tok), "vocab_size": len(tok), "schema_version": soft_labels.SCHEMA_VERSION,
            "teacher_key": key, "codec": codec, "split": "train", "response_source": "teacher_sample", "teacher_model": "t"}


def _prompts(path, tok, n, refs=True):
    from tasks.prompting import format_prompt

    rows = [{"example_id": f"u{i}", "prompt": f"What is {i} plus 1?", "prompt_ids": tok(format_prompt(f"What is {i} plus 1?"))["input_ids"],
             "references": [str(i + 1)] if refs else []} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA), path)
    return rows


def _loop_config(tiny_student, manifest, out_dir, **train):
    from tasks.config import TrainConfig
    from tasks.train.loop_config import LoopConfig

    cfg = TrainConfig(batch_size=4, steps=2, warmup_steps=1, checkpoint_every=2, **train)
    return LoopConfig.build(cfg, student_dir=tiny_student, manifest=str(manifest), out_dir=out_dir)


def _student_logits(tiny_student, mb):
    from tasks.models import load_causal_lm
    from tasks.train.batches import model_inputs

    model = load_causal_lm(tiny_student).double()
    return model, model(**model_inputs(mb)).logits[:, :-1]


def test_selected_label_set_links_increments_and_trains_ce_on_reference_rows(tmp_path, tiny_student):
    import os

    from storage.atomic import sha256_file
    from tasks.config import SelectConfig
    from tasks.contracts import SplitFile, TeacherLabels
    from tasks.models import load_tokenizer, tokenizer_hash
    from tasks.select import labels as select_labels
    from tasks.select.stage import SelectedPrompts
    from tasks.stage_cache import run_cached
    from tasks.train.batches import collate
    from tasks.train.loop import build_loss, open_stream, student_loss, with_label_extras

    tok, k = load_tokenizer(tiny_student), 4
    rows = _label_rows(tok, 6, k, seed=1)
    parts = [TeacherLabels(key=f"p{i}", train_manifest=str(_write_set(tmp_path / f"inc{i}" / "train", chunk, _meta(tok, k))),
                           eval_manifest="unused") for i, chunk in enumerate((rows[:4], rows[4:]))]
    unselected = _prompts(tmp_path / "unselected.parquet", tok, 3)
    split = SplitFile(path=str(tmp_path / "unselected.parquet"), rows=3, sha256=sha256_file(tmp_path / "unselected.parquet"))
    selection = SelectedPrompts(key="sel", manifest=str(tmp_path / "selection.json"), train=split, increments=[split, split],
                                unselected=split, fraction=0.6, method="entropy", num_prompts=9, num_selected=6, num_to_label=2,
                                teacher_tokens_saved=17, teacher_tokens_saved_fraction=0.3)
    inputs = select_labels.SelectedLabelsInputs(selection=selection, parts=parts, student_dir=tiny_student)
    labels = run_cached(select_labels.STAGE, SelectConfig(enabled=True, unlabelled="ce"), inputs, cache_root=tmp_path / "cache",
                        log=lambda _: None)
    manifest = soft_labels.load_manifest(labels.train_manifest)
    folder = Path(manifest["_dir"])
    # Every shard lies in the set's own folder; the teacher's shards are the increments' files (hard links).
    assert all("/" not in s["path"] and (folder / s["path"]).exists() for s in manifest["shards"])
    assert os.stat(folder / "shard-00000.parquet").st_ino == os.stat(tmp_path / "inc0" / "train" / "shard-00000.parquet").st_ino
    flags = [s.get("teacher_labels", True) for s in manifest["shards"]]
    assert flags == [True, True, True, False]
    meta = manifest["metadata"]["selection"]
    assert (meta["rows_with_teacher_labels"], meta["rows_without_teacher_labels"], meta["teacher_tokens_saved"]) == (6, 3, 17)
    read = list(soft_labels.read(labels.train_manifest, expected_tokenizer_hash=tokenizer_hash(tok), vocab_size=len(tok)))
    assert [r["example_id"] for r in read] == [f"e{i}" for i in range(6)] + ["u0", "u1", "u2"]
    for r, p in zip(read[6:], unselected):
        assert list(r["response_ids"]) == tok(" " + p["references"][0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert r["response_source"] == "reference"
    # The loop tags rows by shard and trains: KD + CE on teacher rows, CE only on reference rows, one denominator.
    config = _loop_config(tiny_student, labels.train_manifest, tmp_path / "train")
    stream, k_read = open_stream(config, 0, 1, tokenizer_hash(tok), len(tok))
    teacher_rows, reference_rows = stream.read_shard(0)[:2], stream.read_shard(3)[:2]
    assert [r["teacher_labels"] for r in teacher_rows + reference_rows] == [True, True, False, False]
    batch = teacher_rows + reference_rows
    mb = with_label_extras(collate(batch, tok.pad_token_id, k_read), batch, tok.pad_token_id, k_read)
    objective = build_loss(config.train, True)
    assert isinstance(objective, TeacherMasked)
    model, logits = _student_logits(tiny_student, mb)
    got = student_loss(model, objective, {**mb, "logprobs": mb["logprobs"].double(), "tail_logmass": mb["tail_logmass"].double()},
                       int(mb["mask"].sum()))
    labels_t = SparseLabels(ids=mb["ids"], logprobs=mb["logprobs"].double(), tail_logmass=mb["tail_logmass"].double(),
                            target_ids=mb["target_ids"])
    assert float(got.detach()) == pytest.approx(_dense_reference(logits.detach(), labels_t, mb["mask"], mb["kd_rows"]), rel=1e-9)
    # And the production loop trains on it (in this process).
    from tasks.train.loop import train
    from tasks.train.runtime import LocalRuntime

    train(config, LocalRuntime())
    assert (tmp_path / "train" / "student" / "config.json").exists()
    logged = (tmp_path / "train" / "train_log.jsonl").read_text()
    assert NO_TEACHER_PART in logged


def test_unlabelled_none_leaves_the_unselected_prompts_out(tmp_path, tiny_student):
    from tasks.config import SelectConfig
    from tasks.contracts import SplitFile, TeacherLabels
    from tasks.models import load_tokenizer
    from tasks.select import labels as select_labels
    from tasks.select.stage import SelectedPrompts
    from tasks.stage_cache import run_cached

    tok, k = load_tokenizer(tiny_student), 4
    part = TeacherLabels(key="p", train_manifest=str(_write_set(tmp_path / "inc" / "train", _label_rows(tok, 4, k, 2), _meta(tok, k))),
                         eval_manifest="unused")
    _prompts(tmp_path / "u.parquet", tok, 2, refs=False)
    split = SplitFile(path=str(tmp_path / "u.parquet"), rows=2, sha256="x")
    selection = SelectedPrompts(key="s", manifest="m", train=split, increments=[split], unselected=split, fraction=0.5,
                                method="random", num_prompts=6, num_selected=4, num_to_label=4, teacher_tokens_saved=5,
                                teacher_tokens_saved_fraction=0.2)
    inputs = select_labels.SelectedLabelsInputs(selection=selection, parts=[part], student_dir=tiny_student)
    none = run_cached(select_labels.STAGE, SelectConfig(unlabelled="none"), inputs, cache_root=tmp_path / "c1", log=lambda _: None)
    assert soft_labels.load_manifest(none.train_manifest)["num_rows"] == 4
    from tasks.select.scores import SelectionError

    with pytest.raises(SelectionError, match="has no reference"):  # ce needs references, named by example
        run_cached(select_labels.STAGE, SelectConfig(unlabelled="ce"), inputs, cache_root=tmp_path / "c2", log=lambda _: None)


def test_paired_labels_read_in_lockstep_and_feed_dynamic_teacher(tmp_path, tiny_student):
    from tasks.models import load_tokenizer, tokenizer_hash
    from tasks.teacher.ensemble import attach_pair, write_pair
    from tasks.train.batches import collate
    from tasks.train.loop import build_loss, open_stream, student_loss, with_label_extras

    tok, k = load_tokenizer(tiny_student), 4
    large_rows = _label_rows(tok, 5, k, seed=7)
    small_rows = [{**r, "sample_id": r["sample_id"] + "-small", "topk_logprobs": r["topk_logprobs"] - 0.5 * np.arange(k)}
                  for r in large_rows]  # same responses, other labels
    for r in small_rows:
        from tasks.teacher.extract import tail_logmass

        r["topk_logprobs"] = np.sort(r["topk_logprobs"], axis=1)[:, ::-1].copy()
        r["tail_logmass"] = tail_logmass(r["topk_logprobs"]).astype(np.float32)
    large = _write_set(tmp_path / "large", large_rows, _meta(tok, k, "L"))
    small = _write_set(tmp_path / "small", small_rows, _meta(tok, k, "S"))
    paired = write_pair(str(large), small, tmp_path / "pair")
    meta = soft_labels.load_manifest(paired)["metadata"]
    assert meta["pair"]["manifest"] == "small/manifest.json" and (tmp_path / "pair" / "small" / "shard-00000.parquet").exists()
    config = _loop_config(tiny_student, paired, tmp_path / "train", dynamic_teacher="hard")
    stream, k_read = open_stream(config, 0, 1, tokenizer_hash(tok), len(tok))
    batch = stream.read_shard(0) + stream.read_shard(1)[:1]
    small_read = list(soft_labels.read(small))
    for r, s in zip(batch, small_read):
        np.testing.assert_array_equal(r["small"]["topk_logprobs"], s["topk_logprobs"])
    mb = with_label_extras(collate(batch, tok.pad_token_id, k_read), batch, tok.pad_token_id, k_read)
    objective = build_loss(config.train, False)
    assert isinstance(objective, DynamicTeacher)
    model, logits = _student_logits(tiny_student, mb)
    dbl = {n: (t.double() if t.is_floating_point() else t) for n, t in mb.items()}
    got = student_loss(model, objective, dbl, int(mb["mask"].sum()))
    lab = lambda p: SparseLabels(ids=dbl[f"{p}ids"], logprobs=dbl[f"{p}logprobs"], tail_logmass=dbl[f"{p}tail_logmass"],  # noqa: E731
                                 target_ids=dbl["target_ids"])
    ref = DynamicTeacher(build_objective("fkl+ce"), "hard")(logits, lab("small_"), lab(""), mb["mask"], int(mb["mask"].sum()))
    assert float(got) == pytest.approx(float(ref), rel=1e-12)
    assert objective.last_small_weight.sum() == len(batch) // 2
    # Sets whose rows differ are refused by row, naming both samples.
    with pytest.raises(soft_labels.SoftLabelError, match="row 0 is example"):
        attach_pair([dict(r) for r in large_rows[1:2]], small_rows[:1], where="test")
    # Without a pair, dynamic_teacher is refused with the fix.
    with pytest.raises(soft_labels.SoftLabelError, match="paired label set"):
        open_stream(_loop_config(tiny_student, large, tmp_path / "t2", dynamic_teacher="soft"), 0, 1, tokenizer_hash(tok), len(tok))


def test_config_refuses_combinations_before_any_compute():
    from tasks.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="exactly one `teachers:` entry"):
        load_config(None, {"train.dynamic_teacher": "hard"})
    with pytest.raises(ConfigError, match="needs a KD term"):
        load_config(None, {"train.dynamic_teacher": "hard", "train.objective": "ce", "teachers": [{"model": "demo-small"}]})
    with pytest.raises(ConfigError, match="fused_head does not support"):
        load_config(None, {"train.uncertainty_weighting": True, "train.fused_head": True})
    with pytest.raises(ConfigError, match="fused_head does not"):
        load_config(None, {"select.enabled": True, "train.fused_head": True})
    assert load_config(None, {"select.enabled": True, "train.packing": True}).train.packing == "on"  # packed kd_rows: test_packing
    with pytest.raises(ConfigError, match="select.enabled with train.dynamic_teacher"):
        load_config(None, {"select.enabled": True, "teachers": [{"model": "demo-small"}], "train.dynamic_teacher": "hard"})
    both = load_config(None, {"select.enabled": True, "teachers": [{"model": "demo-small"}], "ensemble.mode": "mean"})
    assert both.select.enabled and both.teachers  # merged per increment: tests/test_teacher_signal_flow.py
    with pytest.raises(ConfigError, match="route_column"):
        load_config(None, {"teachers": [{"model": "demo-small"}], "ensemble.mode": "route"})
    ok = load_config(None, {"select.enabled": True, "select.fraction": 0.3, "train.uncertainty_weighting": True})
    assert ok.select.fraction == 0.3 and ok.train.uncertainty_weighting


# --- real stages on tiny vLLM models ----------------------------------------------------------------------------------

def _tiny_prepared(tmp_path, tiny_student, n_train=8):
    from storage.atomic import sha256_file
    from tasks.contracts import PreparedData, SplitFile
    from tasks.models import load_tokenizer, tokenizer_hash
    from tasks.prompting import format_prompt

    tok = load_tokenizer(tiny_student)
    files = {}
    for split, n in (("train", n_train), ("test", 2)):
        rows = [{"example_id": f"{split}-{i}", "prompt": f"What is {i} plus {i + 2}?",
                 "prompt_ids": tok(format_prompt(f"What is {i} plus {i + 2}?"))["input_ids"], "references": [str(2 * i + 2)]}
                for i in range(n)]
        path = tmp_path / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA), path)
        files[split] = SplitFile(path=str(path), rows=n, sha256=sha256_file(path))
    return PreparedData(key="prepared-tiny", source=str(tmp_path), train=files["train"], eval=files["test"], train_split="train",
                        eval_split="test", tokenizer_hash=tokenizer_hash(tok), vocab_size=len(tok), teacher_dir=tiny_student,
                        student_dir=tiny_student, teacher_hash="tiny")


def _teacher_config(**update):
    from tasks.config import EngineConfig, TeacherConfig

    return TeacherConfig(top_k=8, max_new_tokens=6, shard_rows=2, codec="plain-f32", engine=EngineConfig(max_model_len=128),
                         **update)


@pytest.mark.integration
@pytest.mark.timeout(2400)  # three vLLM engine starts (about 25 s each on an idle 2-core machine)
def test_selection_stage_labels_only_the_chosen_prompts_and_growing_r_only_the_difference(ray_local, tiny_student, tmp_path):
    from tasks.config import EngineConfig, SelectConfig
    from tasks.select import labels as select_labels
    from tasks.select import stage as select_stage
    from tasks.select.selection import load_selection
    from tasks.stage_cache import run_cached
    from tasks.teacher import stage as teacher_stage

    prepared = _tiny_prepared(tmp_path, tiny_student)
    cache, quiet = tmp_path / "cache", (lambda _: None)
    select_cfg = SelectConfig(enabled=True, fraction=0.25, top_k=8, max_new_tokens=6, engine=EngineConfig(max_model_len=128))
    inputs = select_stage.SelectInputs(prepared=prepared, student_dir=tiny_student)
    first = run_cached(select_stage.STAGE, select_cfg, inputs, cache_root=cache, log=quiet)
    manifest, table = load_selection(first.manifest)
    chosen = {r["example_id"] for r in table if r["selected"]}
    assert len(chosen) == 2 and first.num_to_label == 2 and first.train.rows == 2 and first.unselected.rows == 6
    assert 0 < first.teacher_tokens_saved == manifest["teacher_tokens_saved"] < manifest["teacher_tokens"]["all"]
    assert {r["example_id"] for r in table} == {f"train-{i}" for i in range(8)} and all(r["score"] == r["entropy"] for r in table)
    teacher_cfg = _teacher_config()
    labelled = [run_cached(teacher_stage.STAGE, teacher_cfg, prepared.model_copy(update={"train": inc}), cache_root=cache, log=quiet)
                for inc in first.increments]
    assert {r["example_id"] for r in soft_labels.read(labelled[0].train_manifest)} == chosen  # only the chosen prompts
    # r 0.25 -> 0.5: the scores are reused, the first increment's labels come from the cache, the teacher labels 2 rows.
    lines = []
    second = run_cached(select_stage.STAGE, select_cfg.model_copy(update={"fraction": 0.5}), inputs, cache_root=cache, log=lines.append)
    assert second.previous == first.manifest and any("reusing the student's scores" in line for line in lines)
    assert second.increments[0] == first.increments[0] and len(second.increments) == 2 and second.num_to_label == 2
    parts = [run_cached(teacher_stage.STAGE, teacher_cfg, prepared.model_copy(update={"train": inc}), cache_root=cache, log=quiet)
             for inc in second.increments]
    assert parts[0].reused and not parts[1].reused
    # The held-out prompts were labelled once: every increment's capture points at the same held-out labels.
    assert parts[1].eval_manifest == parts[0].eval_manifest == labelled[0].eval_manifest
    _, table2 = load_selection(second.manifest)
    new = {r["example_id"] for r in table2 if r["new"]}
    newly_labelled = [r["example_id"] for r in soft_labels.read(parts[1].train_manifest)]
    assert len(newly_labelled) == 2 and set(newly_labelled) == new and not new & chosen
    union = run_cached(select_labels.STAGE, select_cfg.model_copy(update={"fraction": 0.5}),
                       select_labels.SelectedLabelsInputs(selection=second, parts=parts, student_dir=tiny_student),
                       cache_root=cache, log=quiet)
    rows = list(soft_labels.read(union.train_manifest))
    teacher_rows = [r["example_id"] for r in rows if r["response_source"] == "teacher_sample"]
    assert set(teacher_rows) == chosen | new and len(rows) == 8
    assert soft_labels.load_manifest(union.train_manifest)["metadata"]["selection"]["rows_without_teacher_labels"] == 4


@pytest.mark.integration
@pytest.mark.timeout(2400)  # three vLLM engine starts (about 25 s each on an idle 2-core machine)
def test_multi_teacher_stage_merges_exactly_and_routes_by_column(ray_local, tiny_student, tmp_path):
    import json

    from transformers import LlamaForCausalLM

    from tasks.config import EngineConfig, EnsembleConfig, MemberTeacherConfig
    from tasks.demo.models import llama_config
    from tasks.models import load_tokenizer, save_pretrained_atomic
    from tasks.stage_cache import run_cached
    from tasks.teacher import ensemble
    from tasks.teacher import stage as teacher_stage
    from tasks.teacher.merge import merge_position_labels

    tok = load_tokenizer(tiny_student)
    torch.manual_seed(11)
    member_dir = tmp_path / "member"
    save_pretrained_atomic(LlamaForCausalLM(llama_config(tok, hidden=64, layers=1, heads=1)), tok, member_dir)
    prepared = _tiny_prepared(tmp_path, tiny_student, n_train=6)
    cache, quiet = tmp_path / "cache", (lambda _: None)
    assert ensemble.check_members.__doc__  # (prepare-time check: exercised by the flow; tokenizers equal here)
    teacher_cfg = _teacher_config()
    main = run_cached(teacher_stage.STAGE, teacher_cfg, prepared, cache_root=cache, log=quiet)
    member = MemberTeacherConfig(model=str(member_dir), engine=EngineConfig(max_model_len=128))
    cfg = ensemble.EnsembleStageConfig(main=teacher_cfg, members=[member], ensemble=EnsembleConfig(mode="mean", main_weight=3.0))
    inputs = ensemble.EnsembleInputs(prepared=prepared, labels=main, member_dirs=[str(member_dir)])
    merged = run_cached(ensemble.STAGE, cfg, inputs, cache_root=cache, log=quiet)
    assert merged.eval_manifest == main.eval_manifest
    meta = soft_labels.load_manifest(merged.train_manifest)["metadata"]
    member_manifest = meta["merge"]["members"][1]["manifest"]
    assert meta["merge"]["rule"] == "mean-prob-union-v1" and meta["merge"]["weights"] == [0.75, 0.25]
    assert meta["merge"]["members"][0]["manifest"] == main.train_manifest  # lineage: each member's capture
    main_rows, member_rows = list(soft_labels.read(main.train_manifest)), list(soft_labels.read(member_manifest))
    for a, b, m in zip(main_rows, member_rows, soft_labels.read(merged.train_manifest)):
        np.testing.assert_array_equal(a["response_ids"], b["response_ids"])  # the member scored the main teacher's response
        assert b["response_source"] == "teacher_sample" and a["example_id"] == b["example_id"] == m["example_id"]
        ref = merge_position_labels([a, b], [0.75, 0.25], a["response_ids"], 8)
        np.testing.assert_array_equal(m["topk_ids"], ref["topk_ids"])
        np.testing.assert_allclose(m["topk_logprobs"], ref["topk_logprobs"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m["tail_logmass"], ref["tail_logmass"], rtol=1e-5, atol=1e-6)
    # Routing by a dataset column: each example takes its labels from the member its column names; the member's
    # capture is reused (no engine).
    routes = tmp_path / "train.jsonl"
    kinds = {f"train-{i}": "sum" if i % 2 else "other" for i in range(6)}
    routes.write_text("".join(json.dumps({"id": ex, "task": t}) + "\n" for ex, t in kinds.items()))
    route_cfg = cfg.model_copy(update={"ensemble": EnsembleConfig(mode="route", route_column="task", routes={"other": 0, "sum": 1})})
    routed = run_cached(ensemble.STAGE, route_cfg, inputs.model_copy(update={"routing_rows": str(routes)}), cache_root=cache, log=quiet)
    for r, a, b in zip(soft_labels.read(routed.train_manifest), main_rows, member_rows):
        src = b if kinds[r["example_id"]] == "sum" else a
        np.testing.assert_array_equal(r["topk_ids"], src["topk_ids"])
        np.testing.assert_allclose(r["topk_logprobs"], src["topk_logprobs"], rtol=1e-6)
    # Dynamic teacher adoption: the pair keeps both sets, row for row.
    pair = run_cached(ensemble.STAGE, cfg.model_copy(update={"pair": True}), inputs, cache_root=cache, log=quiet)
    pmeta = soft_labels.load_manifest(pair.train_manifest)["metadata"]
    assert pmeta["pair"]["manifest"] == "small/manifest.json" and pmeta["pair"]["source"] == member_manifest


def test_members_must_share_the_students_tokenizer_checked_before_compute(tmp_path, tiny_student):
    from transformers import LlamaForCausalLM

    from tasks.config import PipelineConfig
    from tasks.demo.models import llama_config, train_tokenizer
    from tasks.models import save_pretrained_atomic
    from tasks.teacher.ensemble import EnsembleError, check_members

    prepared = _tiny_prepared(tmp_path, tiny_student, n_train=2)
    other_tok = train_tokenizer(["completely different text", "another corpus entirely"], tmp_path / "tok", vocab_size=300)
    other = tmp_path / "other"
    save_pretrained_atomic(LlamaForCausalLM(llama_config(other_tok, hidden=64, layers=1, heads=1)), other_tok, other)
    same = PipelineConfig.model_validate({"data_dir": str(tmp_path), "teachers": [{"model": tiny_student}]})
    assert check_members(same, prepared, log=lambda _: None) == [str(Path(tiny_student).resolve())]
    bad = PipelineConfig.model_validate({"data_dir": str(tmp_path), "teachers": [{"model": tiny_student}, {"model": str(other)}]})
    with pytest.raises(EnsembleError, match=r"teachers\[1\]\.model .* differs from the student's"):
        check_members(bad, prepared, log=lambda _: None)


def test_flow_composes_selection_teacher_increments_and_training(prefect_server, tmp_path, tiny_student, monkeypatch):
    """The distill flow with select.enabled: select -> the teacher labels each increment's filtered prompts ->
    selected-labels -> training reads that set. Stage bodies are stubbed (the stages are tested above); this checks
    the composition in flows/distill.py."""
    import flows.distill as distill_flow
    from tasks.config import PipelineConfig
    from tasks.contracts import Evaluation, PromotionOutcome, SplitFile, TeacherLabels, TrainedStudent
    from tasks.select.stage import SelectedPrompts

    prepared = _tiny_prepared(tmp_path, tiny_student)
    inc = [SplitFile(path=f"inc{i}.parquet", rows=2, sha256=f"s{i}") for i in range(2)]
    calls = []

    def fake_run_cached(spec, config, inputs, **_):
        calls.append((spec.name, inputs))
        if spec.name == "select":
            return SelectedPrompts(key="sel", manifest="selection.json", train=inc[0], increments=inc, unselected=inc[0],
                                   fraction=config.fraction, method=config.method, num_prompts=8, num_selected=4,
                                   num_to_label=2, teacher_tokens_saved=10, teacher_tokens_saved_fraction=0.5)
        if spec.name == "labels":
            return TeacherLabels(key=f"labels-{inputs.train.sha256}", train_manifest=f"{inputs.train.path}.labels", eval_manifest="eval")
        if spec.name == "selected-labels":
            return TeacherLabels(key="union", train_manifest="union/manifest.json", eval_manifest="eval")
        if spec.name == "train":
            return TrainedStudent(key="student", checkpoint=str(tmp_path), log="log")
        if spec.name == "eval":
            return Evaluation(key="eval", metrics_file="m.json", metrics={"student": {}, "teacher": {}})
        raise AssertionError(f"unexpected stage {spec.name}")

    outcome = PromotionOutcome(promoted=False, version=None, champion_before=None, champion_after=None, summary="",
                               report_md="", report_png=None, decision={})
    monkeypatch.setattr(distill_flow, "run_cached", fake_run_cached)
    monkeypatch.setattr(distill_flow.prepare, "run", lambda config, run_dir, log: prepared)
    monkeypatch.setattr(distill_flow.promotion, "run", lambda *a, **k: (outcome, {"markdown": "x", "table": []}))
    monkeypatch.setattr(distill_flow.promotion, "metric_rows", lambda evaluation: [])
    monkeypatch.setattr(distill_flow, "track_run", lambda *a, **k: None)
    config = PipelineConfig.model_validate({"data_dir": str(tmp_path), "select": {"enabled": True, "fraction": 0.5}})
    distill_flow.distill(config)
    names = [name for name, _ in calls]
    assert names == ["select", "labels", "labels", "selected-labels", "train", "eval"]
    assert [inputs.train for name, inputs in calls if name == "labels"] == inc  # the teacher sees only the chosen prompts
    assert [p.key for p in calls[3][1].parts] == ["labels-s0", "labels-s1"] and calls[3][1].student_dir == tiny_student
    assert calls[4][1].labels.train_manifest == "union/manifest.json"  # training reads the selected set
