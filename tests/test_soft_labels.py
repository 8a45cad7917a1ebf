"""Soft-label shards: schema, atomic writes, checksums, validation on read."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage import soft_labels
from storage.soft_labels import SoftLabelError


def _row(i, t=3, k=2):
    lp = np.log(np.array([[0.6, 0.3]] * t))
    return {
        "sample_id": f"s{i}", "example_id": f"e{i}", "split": "train", "response_source": "teacher_sample",
        "prompt_ids": [1, 5, 6], "response_ids": list(range(10, 10 + t)),
        "topk_ids": list(range(20, 20 + t * k)), "topk_logprobs": lp.ravel().tolist(),
        "token_logprob": lp[:, 0].tolist(), "tail_logmass": [float(np.log(0.1))] * t,
    }


META = {"k": 2, "tokenizer_hash": "abc", "schema_version": soft_labels.SCHEMA_VERSION}


def _write(tmp_path, n_shards=2):
    records = [soft_labels.write_shard(tmp_path, i, [_row(10 * i + j) for j in range(3)], META) for i in range(n_shards)]
    return soft_labels.write_manifest(tmp_path, records, META)


def test_roundtrip_shapes_and_manifest(tmp_path):
    manifest = _write(tmp_path)
    data = json.loads(manifest.read_text())
    assert data["num_rows"] == 6 and data["num_tokens"] == 18
    rows = list(soft_labels.read(manifest))
    assert [r["sample_id"] for r in rows] == ["s0", "s1", "s2", "s10", "s11", "s12"]
    assert rows[0]["topk_ids"].shape == (3, 2) and rows[0]["tail_logmass"].shape == (3,)
    np.testing.assert_allclose(np.exp(rows[0]["topk_logprobs"][0]), [0.6, 0.3], rtol=1e-6)
    table = pq.read_table(tmp_path / "shard-00000.parquet")
    assert table.schema.equals(soft_labels.SCHEMA)
    assert json.loads(table.schema.metadata[soft_labels.METADATA_KEY])["k"] == 2


def test_selected_shards_only(tmp_path):
    manifest = _write(tmp_path)
    assert [r["sample_id"] for r in soft_labels.read(manifest, shards=[1])] == ["s10", "s11", "s12"]


def test_corrupt_shard_is_named(tmp_path):
    manifest = _write(tmp_path)
    shard = tmp_path / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(SoftLabelError, match="shard-00001.parquet: checksum mismatch"):
        list(soft_labels.read(manifest))
    assert soft_labels.finished_shard(tmp_path, 1) is None  # the next capture redoes it
    assert soft_labels.finished_shard(tmp_path, 0) is not None


def test_tokenizer_mismatch_and_vocab_bounds(tmp_path):
    manifest = _write(tmp_path)
    with pytest.raises(SoftLabelError, match="tokenizer_hash"):
        list(soft_labels.read(manifest, expected_tokenizer_hash="other"))
    with pytest.raises(SoftLabelError, match="topk_ids holds ids >= vocab size 21"):
        list(soft_labels.read(manifest, vocab_size=21))


def test_schema_version_mismatch(tmp_path):
    manifest = _write(tmp_path)
    data = json.loads(manifest.read_text())
    data["schema_version"] = 999
    manifest.write_text(json.dumps(data))
    with pytest.raises(SoftLabelError, match="schema_version 999"):
        list(soft_labels.read(manifest))


def test_label_rows_must_match_response_length(tmp_path):
    bad = _row(0)
    bad["tail_logmass"] = bad["tail_logmass"][:-1]
    record = soft_labels.write_shard(tmp_path, 0, [bad], META)
    manifest = soft_labels.write_manifest(tmp_path, [record], META)
    with pytest.raises(SoftLabelError, match="field tail_logmass has 2 values, expected 3"):
        list(soft_labels.read(manifest))


def test_no_temporary_files_left(tmp_path):
    _write(tmp_path)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
