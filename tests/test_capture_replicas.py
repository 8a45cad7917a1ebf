"""Data-parallel capture: two real vLLM replicas (Ray actors) share the shards of one capture.

The shards do not depend on how many replicas labelled them: each prompt's
sampling seed derives from its content and each shard is one engine call, so
two replicas must write byte-identical shards to one replica's.
"""

import numpy as np
import pytest

from storage import soft_labels

K = 8
SAMPLING = dict(temperature=1.0, top_p=1.0, max_new_tokens=6, n=1, seed=0)
META = {"k": K, "tokenizer_hash": "tiny", "teacher_key": "test", "codec": "compact-v1"}


def _config(tiny_student, **extra):
    from tasks.config import EngineConfig, TeacherConfig

    return TeacherConfig(model=tiny_student, top_k=K, engine=EngineConfig(max_model_len=128), **extra)


def test_more_replicas_than_the_cluster_offers_is_refused_before_any_engine_starts(ray_local, tiny_student):
    from tasks.teacher.stage import start_replicas

    with pytest.raises(ValueError, match=r"teacher.replicas=3 needs 3 CPU but the Ray cluster offers 2"):
        start_replicas(_config(tiny_student, replicas=3), tiny_student)


def test_two_replicas_split_the_shards_and_write_what_one_replica_writes(ray_local, tiny_student, prompts, tmp_path):
    import ray

    from tasks.teacher.stage import capture_on_replicas, start_replicas

    replicas = start_replicas(_config(tiny_student, replicas=2), tiny_student)
    try:
        def run(actors, name):
            return capture_on_replicas(actors, prompts, tmp_path / name, split="train", metadata=META, shard_rows=1,
                                       sampling=SAMPLING)

        two, per_replica = run(replicas, "two")
        assert sorted(per_replica) == [0, 1], f"both replicas should label shards, got {per_replica}"
        assert sum(per_replica.values()) == len(prompts)
        one, per_replica_one = run(replicas[:1], "one")
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
    finally:
        for actor in replicas:
            ray.kill(actor)
