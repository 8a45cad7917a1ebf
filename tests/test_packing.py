"""Sequence packing: rows within budget, labels at the right shifted positions, attention that stays inside each
sequence (packed logits = each sequence run alone), and the same loss and gradients as the padded batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.objectives import SparseLabels, build_objective
from tasks.train.batches import collate, model_inputs
from tasks.train.packing import collate_packed, first_fit, padding_waste

K = 3


def record(prompt_len: int, response_len: int, vocab: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    lp = np.sort(np.log(rng.dirichlet(np.ones(K + 1)))[:K])[::-1].astype(np.float32)
    return {"prompt_ids": rng.integers(1, vocab, prompt_len), "response_ids": rng.integers(1, vocab, response_len),
            "topk_ids": rng.integers(0, vocab, (response_len, K)),
            "topk_logprobs": np.tile(lp, (response_len, 1)) - rng.random((response_len, 1)).astype(np.float32),
            "tail_logmass": np.full(response_len, -1.5, dtype=np.float32)}


def varied_records(vocab=97, n=7):
    shapes = [(5, 9), (3, 2), (8, 12), (2, 3), (4, 1), (6, 6), (3, 4)][:n]
    return [record(p, r, vocab, seed=i) for i, (p, r) in enumerate(shapes)]


def tiny_model(arch: str, attn: str, vocab=97):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    config, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                           "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    model = model_class(config(**common))
    model.config._attn_implementation = attn
    return model.float().eval()


def test_first_fit_respects_budget_and_places_each_sequence_once():
    lengths = [7, 3, 9, 2, 5, 5, 1, 12]
    rows = first_fit(lengths, budget=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows if len(row) > 1)
    assert [7] in rows  # 12 > budget: a row of its own
    assert rows == first_fit(lengths, budget=10)  # deterministic
    assert len(rows) == 5  # 12 | 9+1 | 7+3 | 5+5 | 2
    with pytest.raises(ValueError):
        first_fit([1], 0)


def test_packed_labels_sit_where_each_sequence_predicts_them():
    records = varied_records()
    padded, packed = collate(records, 0, K), collate_packed(records, 0, K)
    assert packed["input_ids"].shape[0] < len(records) and packed["input_ids"].shape[1] == padded["input_ids"].shape[1]
    assert int(packed["mask"].sum()) == int(padded["mask"].sum())
    # shifted position i predicts input token i + 1, inside the same sequence
    assert torch.equal(packed["target_ids"][packed["mask"]], packed["input_ids"][:, 1:][packed["mask"]])
    assert torch.all(packed["position_ids"][:, 1:][packed["mask"]] > 0)  # never a sequence's first token
    # the same label rows, only placed elsewhere
    for key in ("ids", "logprobs", "tail_logmass", "target_ids"):
        a, b = padded[key][padded["mask"]], packed[key][packed["mask"]]
        assert sorted(map(str, a.tolist())) == sorted(map(str, b.tolist())), key
    used = sum(len(r["prompt_ids"]) + len(r["response_ids"]) for r in records)
    assert int(padded["num_pad_tokens"]) == padded["input_ids"].numel() - used
    assert int(packed["num_pad_tokens"]) == packed["input_ids"].numel() - used
    assert padding_waste([packed]) < padding_waste([padded])
    assert padding_waste([collate([records[0]], 0, K)]) == 0.0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_logits_equal_each_sequence_alone(arch, attn):
    model = tiny_model(arch, attn)
    records = varied_records()
    packed = collate_packed(records, 0, K)
    with torch.no_grad():
        logits = model(**model_inputs(packed)).logits
        layout = first_fit([len(r["prompt_ids"]) + len(r["response_ids"]) for r in records],
                           packed["input_ids"].shape[1])
        for b, row in enumerate(layout):
            offset = 0
            for i in row:
                seq = torch.as_tensor(np.concatenate([records[i]["prompt_ids"], records[i]["response_ids"]]))[None]
                alone = model(input_ids=seq).logits[0]
                torch.testing.assert_close(logits[b, offset : offset + seq.shape[1]], alone, rtol=1e-5, atol=1e-5)
                offset += seq.shape[1]
    assert sum(len(row) > 1 for row in layout) >= 2, "the case must pack several sequences into a row"


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_head"])
def test_packed_loss_and_gradients_equal_padded(fused):
    from tasks.objectives.fused_head import FusedHead

    model = tiny_model("llama", "sdpa")
    records = varied_records()
    objective = build_objective("fkl+ce")
    grads = []
    for batch in (collate(records, 0, K), collate_packed(records, 0, K)):
        model.zero_grad()
        labels = SparseLabels(batch["ids"], batch["logprobs"], batch["tail_logmass"], batch["target_ids"])
        if fused:
            hidden = model.model(**model_inputs(batch)).last_hidden_state[:, :-1]
            loss = FusedHead(objective).loss(hidden, model.lm_head.weight, labels, batch["mask"])
        else:
            loss = objective(model(**model_inputs(batch)).logits[:, :-1], labels, batch["mask"])
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, ga), (loss_b, gb) = grads
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)


def test_training_packed_gives_the_padded_weights_and_logs_padding_waste(tiny_student, tiny_labels, tmp_path):
    """Three steps through the loop with train.packing: same losses and weights as padded batches; waste logged."""
    import json

    from safetensors.torch import load_file

    from tasks.config import TrainConfig
    from tasks.train.loop import train
    from tasks.train.loop_config import LoopConfig
    from tasks.train.runtime import LocalRuntime

    weights, logs = {}, {}
    for name, packing in (("padded", "off"), ("packed", "on")):
        # the tiny labels' sequences are 7-12 tokens: a 24-token row holds two or three of them
        cfg = TrainConfig(objective="fkl+ce", steps=3, batch_size=8, learning_rate=1e-2, warmup_steps=1, checkpoint_every=3,
                          packing=packing, packing_max_tokens=24)
        out = tmp_path / name
        out.mkdir()
        train(LoopConfig.build(cfg, student_dir=tiny_student, manifest=tiny_labels, out_dir=out), LocalRuntime())
        weights[name] = load_file(out / "student" / "model.safetensors")
        logs[name] = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    for key in weights["padded"]:
        # AdamW amplifies round-off in gradient entries near zero: see test_fused_head's training test
        torch.testing.assert_close(weights["packed"][key], weights["padded"][key], rtol=1e-4, atol=2e-4, msg=key)
    for a, b in zip(logs["padded"], logs["packed"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert 0.0 <= b["padding_waste"] < 1.0 and 0.0 <= a["padding_waste"] < 1.0  # logged either way
        assert b["packed"] is True and a["packed"] is False
    # and the packed runs did share rows: 8 sequences of 7-12 tokens fit in fewer than 8 rows of 24
    from storage import soft_labels

    records = list(soft_labels.read(tiny_labels))[:8]
    assert collate_packed(records, 0, 8, max_tokens=24)["input_ids"].shape[0] < 8


@pytest.mark.parametrize("loss", ["uncertainty_weighted", "dynamic_hard", "dynamic_soft", "dynamic_soft_instance",
                                  "teacher_masked"])
def test_per_example_losses_on_a_packed_batch_equal_padded(loss):
    """Dynamic KD's per-example uncertainty and routing, and lazy labelling's kd_rows, read the examples from the
    packed batch's segments: the same loss, routing and gradients as one padded row per example."""
    from tasks.objectives.weighting import DynamicTeacher, TeacherMasked, UncertaintyWeighted
    from tasks.train.loop import student_loss, with_label_extras

    model = tiny_model("llama", "sdpa")
    records = varied_records()
    # a second teacher's labels of the same tokens, and lazy labelling's flag, as the loop's readers attach them
    for i, r in enumerate(records):
        other = record(len(r["prompt_ids"]), len(r["response_ids"]), 97, seed=100 + i)
        r["small"] = {key: other[key] for key in ("topk_ids", "topk_logprobs", "tail_logmass")}
        if loss == "teacher_masked":
            r["teacher_labels"] = i % 3 != 1
    base = build_objective("fkl+ce")
    objective = {"uncertainty_weighted": UncertaintyWeighted(base), "teacher_masked": TeacherMasked(UncertaintyWeighted(base))}.get(
        loss) or DynamicTeacher(base, loss.removeprefix("dynamic_"))
    dynamic = isinstance(objective, DynamicTeacher)
    runs = []
    for collate_fn in (collate, collate_packed):
        batch = collate_fn(records, 0, K)
        if dynamic or loss == "teacher_masked":
            use = records if dynamic else [{k: v for k, v in r.items() if k != "small"} for r in records]
            batch = with_label_extras(batch, use, 0, K, collate_fn)
        model.zero_grad()
        value = student_loss(model, objective, batch, int(batch["mask"].sum()))
        value.backward()
        per_example = objective.last_small_weight if dynamic else getattr(objective, "last_weights", None)
        if loss == "teacher_masked":
            per_example = objective.objective.last_weights
        runs.append((value.detach(), per_example.clone(), dict(objective.last_parts),
                     {n: p.grad.clone() for n, p in model.named_parameters()}))
    (la, wa, pa, ga), (lb, wb, pb, gb) = runs
    assert "segments" in collate_packed(records, 0, K) and len(collate_packed(records, 0, K)["input_ids"]) < len(records)
    torch.testing.assert_close(lb, la, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wb, wa, rtol=1e-5, atol=1e-6)  # per example, in record order
    assert pb.keys() == pa.keys() and all(abs(pb[n] - pa[n]) < 1e-5 for n in pa)
    if loss == "dynamic_hard":
        assert sorted(wa.tolist()) == [0.0] * 4 + [1.0] * 3  # the uncertain half (3 of 7) to the small teacher
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture
def attention_ignoring_position_resets(monkeypatch):
    """transformers with its packed-sequence detection switched off: what a model without that support does."""
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_probe_passes_models_that_keep_packed_sequences_apart(arch):
    from tasks.train.packing import keeps_packed_sequences_apart

    for attn in ("sdpa", "eager"):
        model = tiny_model(arch, attn).train()
        assert keeps_packed_sequences_apart(model), attn
        assert model.training  # the probe leaves the mode as it found it
    assert keeps_packed_sequences_apart(tiny_model(arch, "sdpa").to(torch.bfloat16))


def test_probe_fails_a_model_whose_attention_crosses_packed_sequences(attention_ignoring_position_resets):
    from tasks.train.packing import keeps_packed_sequences_apart

    assert not keeps_packed_sequences_apart(tiny_model("llama", "sdpa"))
    assert not keeps_packed_sequences_apart(tiny_model("qwen2", "eager"))


def test_packing_auto_pads_and_says_why_when_the_probe_fails_and_on_refuses(attention_ignoring_position_resets, tiny_student,
                                                                           tiny_labels, tmp_path, capsys):
    import json

    from tasks.config import TrainConfig
    from tasks.train.loop import train
    from tasks.train.loop_config import LoopConfig
    from tasks.train.runtime import LocalRuntime

    def run(packing, name):
        cfg = TrainConfig(objective="fkl+ce", steps=1, batch_size=8, warmup_steps=1, checkpoint_every=1, packing=packing,
                          packing_max_tokens=24)
        (tmp_path / name).mkdir()
        train(LoopConfig.build(cfg, student_dir=tiny_student, manifest=tiny_labels, out_dir=tmp_path / name), LocalRuntime())
        return json.loads((tmp_path / name / "train_log.jsonl").read_text().splitlines()[0])

    auto, padded = run("auto", "auto"), run("off", "off")
    assert "train: packing off: the student (LlamaForCausalLM, attention sdpa) lets sequences packed" in capsys.readouterr().out
    assert auto["padding_waste"] == padded["padding_waste"] > 0 and auto["loss"] == padded["loss"]
    assert auto["packed"] is False and padded["packed"] is False  # the train log says which layout ran
    with pytest.raises(ValueError, match="train.packing=on: .*set train.packing=off"):
        run("on", "on")


def test_packing_setting_reads_booleans_as_on_and_off():
    from tasks.config import TrainConfig

    assert TrainConfig().packing == "auto"
    assert [TrainConfig(packing=v).packing for v in (True, False, "true", "False", "on", "off")] == ["on", "off", "on", "off", "on", "off"]
    with pytest.raises(ValueError, match="packing"):
        TrainConfig(packing="sometimes")
