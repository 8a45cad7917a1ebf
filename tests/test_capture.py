"""Teacher capture with a real vLLM engine: resume, corruption, score mode, bad input.

One engine for the whole file (a session-scoped Ray actor around the tiny
1-layer model of conftest, used here as the teacher).
"""

import os

import numpy as np
import pytest

from storage import soft_labels
from storage.soft_labels import SoftLabelError

K = 8


@pytest.fixture(scope="module")
def teacher(ray_local, tiny_student):
    import ray

    from tasks.config import EngineConfig, TeacherConfig
    from tasks.teacher.stage import TeacherReplica

    cfg = TeacherConfig(model=tiny_student, top_k=K, engine=EngineConfig(max_model_len=128))
    actor = ray.remote(num_cpus=1)(TeacherReplica).remote(tiny_student, cfg)
    yield actor
    ray.kill(actor)


def _meta(**extra):
    return {"k": K, "tokenizer_hash": "tiny", "teacher_key": "test", "codec": "compact-v1", **extra}


SAMPLING = dict(temperature=1.0, top_p=1.0, max_new_tokens=6, n=1, seed=0)


def _capture(teacher, prompts, out, meta, mode="generate", sampling=SAMPLING):
    import ray

    manifest, lines = ray.get(teacher.capture.remote(prompts, str(out), "train", meta, 2, sampling, mode))
    return manifest, lines


def _mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def test_capture_resumes_skips_and_regenerates(teacher, prompts, tmp_path):
    out = tmp_path / "labels"
    manifest, lines = _capture(teacher, prompts, out, _meta())
    assert len(lines) == 3 and all("rows" in line for line in lines)
    rows = list(soft_labels.read(manifest))
    assert len(rows) == 5
    for r in rows:
        t = len(r["response_ids"])
        assert t >= 1 and r["topk_ids"].shape == (t, K) and r["tail_logmass"].shape == (t,)
        assert np.all(np.diff(r["topk_logprobs"], axis=1) <= 0)
    # A finished capture, rerun: nothing is written.
    before = _mtimes(out)
    _, lines = _capture(teacher, prompts, out, _meta())
    assert all("already complete" in line for line in lines)
    assert _mtimes(out) == before
    # A truncated shard is detected on read, with its path, and only it is regenerated.
    shard = out / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-20])
    with pytest.raises(SoftLabelError, match="shard-00001.parquet: checksum mismatch"):
        list(soft_labels.read(manifest))
    _, lines = _capture(teacher, prompts, out, _meta())
    assert ["already complete" in line for line in lines] == [True, False, True]
    after = _mtimes(out)
    assert after["shard-00000.parquet"] == before["shard-00000.parquet"]
    assert after["shard-00001.parquet"] != before["shard-00001.parquet"]
    again = list(soft_labels.read(manifest))
    assert [r["sample_id"] for r in again] == [r["sample_id"] for r in rows]  # seeds derive from content


def test_capture_with_other_setup_rewrites_stale_shards(teacher, prompts, tmp_path):
    out = tmp_path / "labels"
    _capture(teacher, prompts[:2], out, _meta())
    _, lines = _capture(teacher, prompts[:2], out, _meta(codec="plain-f32"))
    assert "already complete" not in lines[0]
    assert soft_labels.shard_metadata(out / "shard-00000.parquet")["codec"] == "plain-f32"


def test_score_mode_matches_transformers(teacher, prompts, tiny_student, tmp_path):
    import torch

    from tasks.models import load_causal_lm, load_tokenizer
    from tasks.teacher.stage import reference_prompts

    tok = load_tokenizer(tiny_student)
    scored = reference_prompts(prompts, tok, " ")
    manifest, _ = _capture(teacher, scored, tmp_path / "s", _meta(codec="plain-f32"), mode="score", sampling={})
    rows = list(soft_labels.read(manifest))
    model = load_causal_lm(tiny_student).eval()
    for p, r in zip(scored, rows):
        assert r["response_source"] == "reference"
        assert r["response_ids"].tolist() == p["response_ids"] and r["response_ids"][-1] == tok.eos_token_id
        ids = torch.tensor([p["prompt_ids"] + p["response_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)[len(p["prompt_ids"]) - 1 : -1]
        top = logp.topk(K, -1)
        np.testing.assert_allclose(r["topk_logprobs"], top.values.numpy(), atol=2e-3)
        np.testing.assert_allclose(r["token_logprob"], logp.gather(1, ids[0, len(p["prompt_ids"]):, None])[:, 0].numpy(), atol=2e-3)
        mass = np.exp(top.values.double().numpy()).sum(1)
        np.testing.assert_allclose(np.exp(r["tail_logmass"]), 1 - mass, atol=1e-4)


def test_k_above_engine_max_logprobs_is_refused(teacher, prompts, tmp_path):
    import ray

    with pytest.raises(ray.exceptions.RayTaskError, match="top_k=16 exceeds the engine's max_logprobs=8"):
        _capture(teacher, prompts, tmp_path / "k", _meta(k=16))
    assert not (tmp_path / "k").exists() or not os.listdir(tmp_path / "k")


def test_empty_reference_is_refused(tiny_student, prompts):
    from tasks.models import load_tokenizer
    from tasks.teacher.capture import CaptureError
    from tasks.teacher.stage import reference_prompts

    bad = [dict(prompts[0], references=[]), *prompts[1:]]
    with pytest.raises(CaptureError, match="example train-0: score mode needs a non-empty first reference"):
        reference_prompts(bad, load_tokenizer(tiny_student), " ")


def test_prompt_longer_than_context_is_refused(teacher, prompts, tmp_path):
    import ray

    long = [dict(prompts[0], prompt_ids=prompts[0]["prompt_ids"] * 30)]
    with pytest.raises(ray.exceptions.RayTaskError, match="example train-0: prompt \\+ max_new_tokens is .* more than the teacher's context of 128"):
        _capture(teacher, long, tmp_path / "long", _meta())
