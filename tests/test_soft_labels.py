"""Soft-label shards: schema, atomic writes, checksums, validation on read."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage import soft_labels
from storage.errors import UserError
from storage.soft_labels import SoftLabelError
from tasks.teacher.extract import tail_logmass


def _row(i, t=3, k=2):
    lp = np.log(np.array([[0.6, 0.3]] * t).reshape(t, 2))
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
    np.testing.assert_allclose(rows[0]["topk_logprobs"][0], np.log([0.6, 0.3]), atol=1 / 128)
    table = pq.read_table(tmp_path / "shard-00000.parquet")
    assert table.schema.equals(soft_labels.SCHEMA, check_metadata=False)
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
    with pytest.raises(SoftLabelError, match="manifest.json: field schema_version is 999"):
        list(soft_labels.read(manifest))


def test_label_rows_must_match_response_length(tmp_path):
    bad = _row(0)
    bad["tail_logmass"] = bad["tail_logmass"][:-1]
    with pytest.raises(SoftLabelError, match="sample s0 .*field tail_logmass has 2 values, expected 3"):
        soft_labels.write_shard(tmp_path, 0, [bad], META)
    assert not list(tmp_path.iterdir())  # nothing half-written
    # A shard whose label column is inconsistent (written by other code) is refused on read, naming shard and field.
    import pyarrow as pa

    meta = {**META, "codec": "plain-f32"}
    table = soft_labels.encode_table([_row(0)], meta)
    short = pa.array([[0.0, 0.0]], pa.list_(pa.float32()))
    table = table.set_column(table.schema.get_field_index("tail_logmass"), "tail_logmass", short)
    path = tmp_path / soft_labels.shard_name(0)
    pq.write_table(table, path)
    record = {"path": path.name, "rows": 1, "tokens": 3, "sha256": soft_labels.sha256_file(path)}
    manifest = soft_labels.write_manifest(tmp_path, [record], meta)
    with pytest.raises(SoftLabelError, match="shard-00000.parquet: sample s0 field tail_logmass has 2 values, expected 3"):
        list(soft_labels.read(manifest))


def test_empty_response_is_refused(tmp_path):
    row = _row(0, t=0)
    with pytest.raises(SoftLabelError, match="sample s0 .*response_ids is empty"):
        soft_labels.write_shard(tmp_path, 0, [row], META)


@pytest.mark.parametrize("codec", ["plain-f32", "baseline", "compact-v1"])
def test_every_codec_roundtrips(tmp_path, codec):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        t, k, vocab = 4 + i, 8, 152_064
        logits = rng.normal(0, 3, (t, 64))
        lp = logits - np.log(np.exp(logits).sum(1, keepdims=True)) - 0.05
        lp = -np.sort(-lp, axis=1)[:, :k]
        ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(t)])
        response = ids[:, 1].copy()
        response[0] = vocab - 1 if vocab - 1 not in ids[0] else 0  # one realised token outside the top-k
        tok_lp = lp[:, 1].copy()
        tok_lp[0] = -17.25
        rows.append({"sample_id": f"s{i}", "example_id": f"e{i}", "split": "train", "response_source": "reference",
                     "prompt_ids": [1, 2], "response_ids": response, "topk_ids": ids, "topk_logprobs": lp,
                     "token_logprob": tok_lp, "tail_logmass": tail_logmass(lp).astype(np.float32)})
    meta = {**META, "k": 8, "codec": codec}
    manifest = soft_labels.write_manifest(tmp_path, [soft_labels.write_shard(tmp_path, 0, rows, meta)], meta)
    tol = {"plain-f32": 1e-6, "baseline": 1e-2, "compact-v1": 1 / 128 + 1e-6}[codec]
    decoded = list(soft_labels.read(manifest, vocab_size=152_064))
    for a, b in zip(rows, decoded):
        assert b["topk_ids"].tolist() == a["topk_ids"].tolist() and b["response_ids"].tolist() == a["response_ids"].tolist()
        for f in ("topk_logprobs", "token_logprob", "tail_logmass"):
            np.testing.assert_allclose(b[f], a[f], atol=tol, rtol=0, err_msg=f)
        assert np.all(np.diff(b["topk_logprobs"], axis=1) <= 0)
        assert b["token_logprob"][0] == pytest.approx(-17.25, abs=1e-2)


def test_shard_from_other_version_or_tokenizer_is_named(tmp_path):
    manifest = _write(tmp_path)
    other = tmp_path / "other"
    soft_labels.write_shard(other, 1, [_row(10 + j) for j in range(3)], {**META, "tokenizer_hash": "zzz"})
    (tmp_path / "shard-00001.parquet").write_bytes((other / "shard-00001.parquet").read_bytes())
    with pytest.raises(SoftLabelError, match="shard-00001.parquet: field tokenizer_hash is 'zzz'"):
        list(soft_labels.read(manifest, verify=False))
    table = pq.read_table(other / "shard-00001.parquet")
    meta = json.loads(table.schema.metadata[soft_labels.METADATA_KEY])
    table = table.replace_schema_metadata({soft_labels.METADATA_KEY: json.dumps({**meta, "schema_version": 1})})
    pq.write_table(table, tmp_path / "shard-00001.parquet")
    with pytest.raises(SoftLabelError, match="shard-00001.parquet: field schema_version is 1"):
        list(soft_labels.read(manifest, verify=False))


def test_stale_shard_is_not_reused_and_manifest_not_rewritten(tmp_path):
    manifest = _write(tmp_path)
    assert soft_labels.finished_shard(tmp_path, 0, META) is not None
    assert soft_labels.finished_shard(tmp_path, 0, {**META, "k": 3}) is None
    assert soft_labels.finished_shard(tmp_path, 0, {**META, "codec": "baseline"}) is None
    record = soft_labels.write_shard(tmp_path, 2, [_row(99)], META, inputs_key="abc")
    assert soft_labels.finished_shard(tmp_path, 2, META, inputs_key="abc") == record
    assert soft_labels.finished_shard(tmp_path, 2, META, inputs_key="other") is None
    before = manifest.stat().st_mtime_ns
    shards = json.loads(manifest.read_text())["shards"]
    soft_labels.write_manifest(tmp_path, shards, META)
    assert manifest.stat().st_mtime_ns == before


# --- manifests: confinement, counts, damage ---------------------------------------------------

def _edit_manifest(manifest, change):
    data = json.loads(manifest.read_text())
    change(data)
    manifest.write_text(json.dumps(data))


@pytest.mark.parametrize("bad", ["../outside/shard-00000.parquet", "../../../etc/passwd", "/etc/passwd",
                                 "sub/../../outside/shard-00000.parquet", "file:///etc/passwd", "..\\outside\\x.parquet",
                                 "./shard-00000.parquet", "", "C:/x.parquet"])
def test_shard_path_must_stay_inside_the_manifest_folder(tmp_path, bad):
    labels = tmp_path / "labels"
    manifest = _write(labels)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shard-00000.parquet").write_bytes((labels / "shard-00000.parquet").read_bytes())  # same bytes, same checksum
    _edit_manifest(manifest, lambda d: d["shards"][0].update(path=bad))
    with pytest.raises(SoftLabelError) as err:
        soft_labels.load_manifest(manifest)  # refused before any shard is opened
    text = str(err.value)
    assert str(manifest) in text and "shards[0]" in text
    if bad:
        assert "field shards[0].path" in text and "inside its own folder" in text
    with pytest.raises(SoftLabelError):
        list(soft_labels.read(manifest))


def test_symlinked_shard_leading_out_is_refused_one_inside_is_read(tmp_path):
    labels = tmp_path / "labels"
    manifest = _write(labels)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shard-00000.parquet").write_bytes((labels / "shard-00000.parquet").read_bytes())
    (labels / "link-out.parquet").symlink_to(outside / "shard-00000.parquet")
    (labels / "link-in.parquet").symlink_to(labels / "shard-00000.parquet")
    (labels / "sub").symlink_to(outside, target_is_directory=True)

    for name in ("link-out.parquet", "sub/shard-00000.parquet"):
        _edit_manifest(manifest, lambda d, name=name: d["shards"][0].update(path=name))
        with pytest.raises(SoftLabelError, match=rf"manifest.json: field shards\[0\].path '{name}' resolves to .*outside.* through a symlink"):
            soft_labels.load_manifest(manifest)
        with pytest.raises(SoftLabelError, match="through a symlink"):
            soft_labels.load_manifest(f"file://{manifest}")  # file:// is the local filesystem too
    _edit_manifest(manifest, lambda d: d["shards"][0].update(path="link-in.parquet"))
    assert [r["sample_id"] for r in soft_labels.read(manifest)] == ["s0", "s1", "s2", "s10", "s11", "s12"]


def test_shard_row_and_token_counts_must_match_the_manifest(tmp_path):
    records = [soft_labels.write_shard(tmp_path, 0, [_row(j) for j in range(3)], META),
               soft_labels.write_shard(tmp_path, 1, [_row(10 + j, t=4) for j in range(2)], META)]
    manifest = soft_labels.write_manifest(tmp_path, records, META)
    assert len(list(soft_labels.read(manifest))) == 5

    # A manifest listing another (checksum-valid) shard under a record with other counts: what used to go undetected.
    def swap(d):
        d["shards"][1].update(path="shard-00000.parquet", sha256=d["shards"][0]["sha256"])
    _edit_manifest(manifest, swap)
    with pytest.raises(SoftLabelError) as err:
        list(soft_labels.read(manifest))
    assert "shard-00000.parquet: holds 3 rows but" in str(err.value) and f"{manifest} records 2 (field rows)" in str(err.value)

    soft_labels.write_manifest(tmp_path, [{**records[0], "tokens": 10}, records[1]], META)  # totals consistent, record wrong
    with pytest.raises(SoftLabelError, match=rf"shard-00000.parquet: holds 9 response tokens but {manifest} records 10 \(field tokens\)"):
        list(soft_labels.read(manifest))
    no_tokens = {k: v for k, v in records[0].items() if k != "tokens"}  # token count not recorded: rows still checked
    _edit_manifest(manifest, lambda d: (d.update(shards=[no_tokens, records[1]]), d.pop("num_tokens")))
    assert len(list(soft_labels.read(manifest))) == 5


@pytest.mark.parametrize(("damage", "field"), [
    (lambda text: text[: len(text) // 2], "not valid JSON"),
    (lambda text: "", "not valid JSON"),
    (lambda text: "[1, 2]", "holds a JSON list"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "shards"}), "field shards is missing"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "metadata"}), "field metadata is missing"),
    (lambda text: json.dumps({**json.loads(text), "shards": [{"path": "shard-00000.parquet", "sha256": "x"}]}), r"field shards\[0\].rows is None"),
    (lambda text: json.dumps({**json.loads(text), "num_rows": 7}), "field num_rows is 7 but its shards hold 6 rows"),
])
def test_damaged_manifest_names_the_file_and_the_fix(tmp_path, damage, field):
    manifest = _write(tmp_path)
    manifest.write_text(damage(manifest.read_text()))
    with pytest.raises(SoftLabelError, match=field) as err:
        soft_labels.load_manifest(manifest)
    text = str(err.value)
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)  # stage checks catch ValueError and relabel
    assert text.startswith(f"{manifest}: ") and f"delete the folder {tmp_path} to relabel" in text
    assert "the teacher stage rewrites it from the finished shards" in text
    # ... and it does: the manifest is rewritten from the finished shards' records.
    records = [soft_labels.finished_shard(tmp_path, i, META) for i in range(2)]
    soft_labels.write_manifest(tmp_path, records, META)
    assert len(list(soft_labels.read(manifest))) == 6


def test_soft_label_errors_are_user_errors():
    assert issubclass(SoftLabelError, UserError) and issubclass(SoftLabelError, ValueError)


# --- the raw shards open with the usual tools ------------------------------------------------

def test_raw_shards_open_with_pyarrow_dataset(tmp_path):
    import pyarrow.dataset as ds

    _write(tmp_path)
    table = ds.dataset(str(tmp_path), format="parquet", exclude_invalid_files=True).to_table()
    assert table.num_rows == 6 and "topk_id_bucket" in table.column_names


def test_raw_shards_open_with_hf_datasets(tmp_path):
    import datasets

    _write(tmp_path)
    data = datasets.load_dataset("parquet", data_files=str(tmp_path / "shard-*.parquet"), split="train",
                                 cache_dir=str(tmp_path / "hf-cache"))
    assert len(data) == 6 and data[0]["response_ids"] == [10, 11, 12]


def test_raw_shards_open_with_duckdb(tmp_path):
    import duckdb

    _write(tmp_path)
    rows = duckdb.sql(f"select sample_id, len(response_ids) from read_parquet('{tmp_path}/shard-*.parquet') order by sample_id").fetchall()
    assert rows[0] == ("s0", 3) and len(rows) == 6


def test_raw_shards_open_with_ray_data(tmp_path, ray_local):
    import ray.data

    _write(tmp_path)
    data = ray.data.read_parquet(str(tmp_path), file_extensions=["parquet"])
    assert data.count() == 6
    assert sorted(r["sample_id"] for r in data.take_all()) == ["s0", "s1", "s10", "s11", "s12", "s2"]


def test_no_temporary_files_left(tmp_path):
    _write(tmp_path)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_labels_read_from_uris_equal_the_local_read(tiny_labels):
    """memory:// (an fsspec filesystem, standing in for an object store) and file:// give the local read, checksums included."""
    from pathlib import Path

    import fsspec

    local_dir = Path(tiny_labels).parent
    memory = fsspec.filesystem("memory")
    for f in local_dir.iterdir():
        memory.pipe(f"/uri-read/{f.name}", f.read_bytes())
    expected = list(soft_labels.read(tiny_labels))
    for uri in ("memory://uri-read/manifest.json", "memory://uri-read", f"file://{tiny_labels}"):
        got = list(soft_labels.read(uri))
        assert [r["sample_id"] for r in got] == [r["sample_id"] for r in expected], uri
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
            np.testing.assert_array_equal(a["topk_logprobs"], b["topk_logprobs"])
    memory.pipe("/uri-read/shard-00000.parquet", b"not parquet")
    with pytest.raises(SoftLabelError, match=r"memory://uri-read/shard-00000.parquet: checksum mismatch"):
        list(soft_labels.read("memory://uri-read"))
    with pytest.raises(SoftLabelError, match=r"memory://nowhere/manifest.json: soft-label manifest not found"):
        soft_labels.load_manifest("memory://nowhere/manifest.json")
    # Remote manifests are confined the same way (no symlinks there: the path check alone).
    manifest = json.loads(memory.cat("/uri-read/manifest.json"))
    manifest["shards"][1]["path"] = "../elsewhere/shard-00001.parquet"
    memory.pipe("/elsewhere/shard-00001.parquet", (local_dir / "shard-00001.parquet").read_bytes())
    memory.pipe("/uri-read/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(SoftLabelError, match=r"memory://uri-read/manifest.json: field shards\[1\].path '../elsewhere/shard-00001.parquet'"):
        list(soft_labels.read("memory://uri-read"))
