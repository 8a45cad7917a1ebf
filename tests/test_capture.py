"""Teacher capture with real vLLM engines: resume, corruption, score mode, bad input, two replicas.

Two engines for the whole file (Ray actors around the tiny 1-layer model of
conftest, used here as the teacher): most tests use the first; the
data-parallel test spreads shards over both.
"""

import os

import numpy as np
import pytest

from storage import soft_labels
from storage.soft_labels import SoftLabelError

K = 8


def _teacher_config(tiny_student, **extra):
    from tasks.config import EngineConfig, TeacherConfig

    return TeacherConfig(model=tiny_student, top_k=K, engine=EngineConfig(max_model_len=128), **extra)


@pytest.fixture(scope="module")
def replicas(ray_local, tiny_student):
    import ray

    from tasks.teacher.stage import start_replicas

    actors = start_replicas(_teacher_config(tiny_student, replicas=2), tiny_student)
    yield actors
    for actor in actors:
        ray.kill(actor)


@pytest.fixture(scope="module")
def teacher(replicas):
    return replicas[0]


def _meta(**extra):
    return {"k": K, "tokenizer_hash": "tiny", "teacher_key": "test", "codec": "compact-v1", **extra}


SAMPLING = dict(temperature=1.0, top_p=1.0, max_new_tokens=6, n=1, seed=0)


def _capture(teacher, prompts, out, meta, mode="generate", sampling=SAMPLING):
    """The production path: tasks.teacher.stage.capture_on_replicas over the replica actor(s)."""
    from tasks.teacher.stage import capture_on_replicas

    manifest, _, lines = capture_on_replicas([teacher], prompts, out, split="train", metadata=meta, shard_rows=2,
                                             sampling=sampling, mode=mode)
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


def test_more_replicas_than_the_cluster_offers_is_refused_before_any_engine_starts(ray_local, tiny_student):
    from tasks.teacher.stage import start_replicas

    with pytest.raises(ValueError, match=r"teacher.replicas=3 needs 3 CPU but the Ray cluster offers 2"):
        start_replicas(_teacher_config(tiny_student, replicas=3), tiny_student)


def test_two_replicas_split_the_shards_and_write_what_one_replica_writes(replicas, prompts, tmp_path):
    """The shards do not depend on the replica count: each prompt's seed derives from its content, one shard per call."""
    from tasks.teacher.stage import capture_on_replicas

    def run(actors, name):
        return capture_on_replicas(actors, prompts, tmp_path / name, split="train", metadata=_meta(), shard_rows=1,
                                   sampling=SAMPLING)

    two, per_replica, _ = run(replicas, "two")
    assert sorted(per_replica) == [0, 1], f"both replicas should label shards, got {per_replica}"
    assert sum(per_replica.values()) == len(prompts)
    one, per_replica_one, _ = run(replicas[:1], "one")
    assert per_replica_one == {0: len(prompts)}

    m1, m2 = soft_labels.load_manifest(one), soft_labels.load_manifest(two)
    assert [s["path"] for s in m2["shards"]] == [soft_labels.shard_name(i) for i in range(len(prompts))]
    for a, b in zip(m1["shards"], m2["shards"]):
        assert (a["rows"], a["tokens"], a["sha256"]) == (b["rows"], b["tokens"], b["sha256"])
    r1, r2 = list(soft_labels.read(one)), list(soft_labels.read(two))
    assert [r["example_id"] for r in r2] == [p["example_id"] for p in prompts]
    for a, b in zip(r1, r2):
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
        np.testing.assert_array_equal(a["topk_logprobs"], b["topk_logprobs"])

    # A finished capture rerun on two replicas writes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").iterdir()}
    run(replicas, "two")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").iterdir()} == before
