"""Curation filters and stage: planted duplicates, near-duplicates and held-out overlaps are removed and counted exactly."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import soft_labels
from storage.errors import UserError
from tasks.curate import CurateConfig, CurationError, curate_rows, filters, run_curate_stage, scores_from_labels

_VOCAB = [f"w{i:03d}x" for i in range(400)]


def _sentence(rng, n=20):
    return " ".join(rng.sample(_VOCAB, n))


def _planted():
    """30 unrelated 20-word prompts, 10 held-out prompts, and planted rows with known fates."""
    rng = random.Random(7)
    base = [_sentence(rng) for _ in range(30)]
    heldout = [_sentence(rng) for _ in range(10)]
    rows = [{"example_id": f"b{i:02d}", "prompt": p} for i, p in enumerate(base)]
    planted = {
        # exact duplicates after normalisation (case, spacing)
        "dup-a": ("  " + base[3].upper() + "  ", "exact_dedup"),
        "dup-b": (base[7].replace(" ", "   \t "), "exact_dedup"),
        "dup-c": (base[3], "exact_dedup"),
        # near duplicates: one word appended (Jaccard 18/19) or the last word changed (17/19)
        "near-a": (base[5] + " extra", "near_dedup"),
        "near-b": (" ".join(base[9].split()[:-1] + ["zzz"]), "near_dedup"),
        # repetition
        "rep": ("buy now " * 12, "repetition"),
        # held-out contamination: a held-out prompt inside a longer one; a short row inside a held-out prompt
        "leak-a": ("please answer: " + heldout[2], "decontaminate"),
        "leak-b": (" ".join(heldout[4].split()[5:9]), "decontaminate"),
        # far from everything: 6 of 20 words changed, so Jaccard well below 0.8
        "keep-edit": (" ".join(base[11].split()[:14] + ["q1", "q2", "q3", "q4", "q5", "q6"]), None),
    }
    for eid, (text, _) in planted.items():
        rows.append({"example_id": eid, "prompt": text})
    return rows, heldout, {eid: fate for eid, (_, fate) in planted.items()}


def test_planted_rows_removed_and_counted_exactly():
    rows, heldout, fate = _planted()
    cfg = CurateConfig(max_repeated_ngram_share=0.5)
    kept, reports = curate_rows(rows, cfg, heldout=heldout)
    by_name = {r.name: r for r in reports}
    assert [r.name for r in reports] == ["exact_dedup", "near_dedup", "repetition", "decontaminate"]
    for name in by_name:
        expected = sorted(eid for eid, f in fate.items() if f == name)
        assert sorted(by_name[name].ids) == expected, name
        assert by_name[name].removed == len(expected)
    assert by_name["exact_dedup"].details["dup-a"] == {"duplicate_of": "b03"}
    assert by_name["exact_dedup"].details["dup-b"] == {"duplicate_of": "b07"}
    assert by_name["near_dedup"].details["near-a"]["duplicate_of"] == "b05"
    assert by_name["near_dedup"].details["near-a"]["jaccard"] == pytest.approx(18 / 19, abs=1e-6)
    assert by_name["near_dedup"].details["near-b"]["jaccard"] == pytest.approx(17 / 19, abs=1e-6)
    assert by_name["decontaminate"].details["leak-b"] == {"overlap": 1.0}  # 4 words < n: one n-gram, inside heldout[4]
    assert by_name["decontaminate"].details["leak-a"]["overlap"] == pytest.approx(13 / 15)  # 2 of 15 8-grams straddle the prefix
    assert [r["example_id"] for r in kept] == [f"b{i:02d}" for i in range(30)] + ["keep-edit"]
    # rows_in chains: each filter sees what the previous kept
    counts = [r.rows_in for r in reports]
    assert counts == [39, 36, 34, 33]


def test_exact_jaccard_decides_not_minhash():
    a = "one two three four five six seven eight nine ten"
    b = "one two three four five six seven eight nine eleven"  # 3-shingles: 7 shared of 9 -> 0.777...
    rows = [{"example_id": "a", "prompt": a}, {"example_id": "b", "prompt": b}]
    kept, removed = filters.near_dedup(rows, threshold=0.78)
    assert [r["example_id"] for r in kept] == ["a", "b"] and removed == []
    kept, removed = filters.near_dedup(rows, threshold=0.7)
    assert [r.example_id for r in removed] == ["b"] and removed[0].detail["jaccard"] == pytest.approx(7 / 9, abs=1e-6)


def test_length_bounds_inclusive_and_tokens():
    rows = [{"example_id": str(i), "prompt": "x" * i, "prompt_ids": list(range(i))} for i in (1, 3, 5, 7)]
    kept, removed = filters.length_filter(rows, min_chars=3, max_chars=5)
    assert [r["example_id"] for r in kept] == ["3", "5"]
    assert [(r.example_id, dict(r.detail)) for r in removed] == [("1", {"chars": 1, "min_chars": 3}), ("7", {"chars": 7, "max_chars": 5})]
    kept, _ = filters.length_filter(rows, max_tokens=3)
    assert [r["example_id"] for r in kept] == ["1", "3"]


def test_repetition_share_exact():
    assert filters.repeated_ngram_share("a b c a b c a b c", n=3) == pytest.approx(1 - 3 / 7)
    assert filters.repeated_ngram_share("a b c", n=3) == 0.0


def test_self_score_fraction_and_threshold():
    rows = [{"example_id": f"r{i}", "prompt": f"p{i}"} for i in range(10)]
    scores = {f"r{i}": -float(i) for i in range(10)}  # r9 is the worst
    kept, removed = filters.self_score_filter(rows, scores, drop_fraction=0.25)  # floor(2.5) = 2
    assert [r.example_id for r in removed] == ["r8", "r9"]
    kept, removed = filters.self_score_filter(rows, scores, min_score=-6.5, drop_fraction=0.5)  # r7..r9 below; 7 left -> 3 more
    assert [r.example_id for r in removed] == ["r7", "r8", "r9", "r4", "r5", "r6"]
    assert [r["example_id"] for r in kept] == ["r0", "r1", "r2", "r3"]


def test_errors_are_user_errors():
    rows = [{"example_id": "a", "prompt": "x"}]
    with pytest.raises(UserError, match="decontaminate"):
        curate_rows(rows, CurateConfig())
    with pytest.raises(UserError, match="no teacher score"):
        curate_rows(rows, CurateConfig(decontaminate=False, self_score_min=-1.0), scores={})
    with pytest.raises(UserError, match="repeats"):
        curate_rows(rows * 2, CurateConfig(decontaminate=False))
    with pytest.raises(ValueError, match="min_chars"):
        CurateConfig(min_chars=10, max_chars=5)


def _write_scores_labels(tmp_path):
    meta = {"k": 2, "tokenizer_hash": "t", "codec": "plain-f32", "split": "train", "response_source": "teacher_sample"}
    rows = []
    for eid, lps in (("b00", [-1.0, -3.0]), ("b00", [-2.0]), ("b01", [-0.5, -0.5, -2.0])):
        t = len(lps)
        rows.append({"sample_id": f"{eid}-{t}", "example_id": eid, "split": "train", "response_source": "teacher_sample",
                     "prompt_ids": [1, 2], "response_ids": [3] * t, "topk_ids": [3, 4] * t,
                     "topk_logprobs": [-0.1, -3.0] * t, "token_logprob": lps, "tail_logmass": [-5.0] * t})
    record = soft_labels.write_shard(tmp_path / "labels", 0, rows, meta)
    return soft_labels.write_manifest(tmp_path / "labels", [record], meta)


def test_scores_from_labels_mean_of_means(tmp_path):
    manifest = _write_scores_labels(tmp_path)
    scores = scores_from_labels(manifest)
    assert scores == {"b00": pytest.approx(((-2.0) + (-2.0)) / 2), "b01": pytest.approx(-1.0)}


def test_stage_writes_kept_rows_and_manifest(tmp_path):
    rows, heldout, fate = _planted()
    rows = [{**r, "prompt_ids": [1, 2, 3], "references": ["r"], "seed_ids": ["s1"]} for r in rows]
    src = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    held = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist([{"example_id": f"h{i}", "prompt": p} for i, p in enumerate(heldout)]), held)
    manifest_path = _write_scores_labels(tmp_path)
    # b00 scores -2.0, b01 -1.0; every other row gets 0.0 except b02 which is the lowest
    scores = {r["example_id"]: 0.0 for r in rows} | {"b02": -9.0}
    cfg = CurateConfig(self_score_min=-5.0)
    out = run_curate_stage(src, tmp_path / "curated", cfg, heldout=held, scores=scores)
    assert out.removed_by() == {"exact_dedup": 3, "near_dedup": 2, "repetition": 1, "decontaminate": 2, "self_score": 1}
    table = pq.read_table(out.output)
    assert table.schema == pq.read_schema(src)  # every input column kept, lineage included
    assert table.column("example_id").to_pylist() == [f"b{i:02d}" for i in range(30) if i != 2] + ["keep-edit"]
    saved = json.loads((tmp_path / "curated" / "manifest.json").read_text())
    assert saved["rows_in"] == 39 and saved["rows_out"] == 30
    assert [f["name"] for f in saved["filters"]] == ["exact_dedup", "near_dedup", "repetition", "decontaminate", "self_score"]
    assert saved["filters"][-1]["ids"] == ["b02"]
    assert not [p for p in (tmp_path / "curated").iterdir() if ".tmp-" in p.name]
    with pytest.raises(CurationError, match="no teacher score"):  # a labels manifest that covers only b00, b01
        run_curate_stage(src, tmp_path / "c2", cfg, heldout=held, scores=manifest_path)


JUDGE = "Is this a clear question? Answer yes or no.\n\n{prompt}\n\nAnswer:"


def test_judge_filter_keeps_prompts_judged_yes_and_reports_the_rest():
    rows = [{"example_id": f"r{i}", "prompt": f"question number {i} about things"} for i in range(6)]
    judged = {f"r{i}": p for i, p in enumerate([0.9, 0.2, 0.5, 0.49, 1.0, 0.0])}
    cfg = CurateConfig(decontaminate=False, exact_dedup=False, near_dedup=False, judge_template=JUDGE, judge_min=0.5)
    kept, reports = curate_rows(rows, cfg, judged=judged)
    assert [r["example_id"] for r in kept] == ["r0", "r2", "r4"]  # p(yes) >= 0.5 kept, ties included
    (report,) = [r for r in reports if r.name == "judge"]
    assert report.ids == ["r1", "r3", "r5"] and report.details["r3"] == {"score": 0.49, "min_score": 0.5}
    assert reports[-1].name == "judge"  # the last filter: only the survivors of the cheap ones are judged
    with pytest.raises(UserError, match="judge filter: 1 row"):
        curate_rows(rows, cfg, judged={k: v for k, v in judged.items() if k != "r2"})
    with pytest.raises(UserError, match="no judged probabilities"):
        curate_rows(rows, cfg)
    asked = []  # given as a function, the judge is asked only about the rows the filters before it kept
    dup = rows + [{"example_id": "dup", "prompt": rows[0]["prompt"]}]
    kept, _ = curate_rows(dup, cfg.model_copy(update={"exact_dedup": True}),
                          judged=lambda rs: asked.extend(r["example_id"] for r in rs) or judged)
    assert asked == [r["example_id"] for r in rows] and [r["example_id"] for r in kept] == ["r0", "r2", "r4"]


def test_judge_template_must_hold_the_prompt_and_nothing_else_in_braces():
    with pytest.raises(ValueError, match="must contain"):
        CurateConfig(judge_template="Is this good? Answer:")
    for bad in ("{prompt} and {other}", "{prompt[0]}", "{prompt:>50}", "{prompt!r}", "{prompt}{prompt.__class__}", "{0}"):
        with pytest.raises(ValueError, match="only a plain {prompt}"):
            CurateConfig(judge_template=bad)
    with pytest.raises(ValueError, match="literal brace"):
        CurateConfig(judge_template="{prompt} and {")
    assert CurateConfig(judge_template="JSON {{\"q\": \"{prompt}\"}} ok?").judge_template


def test_teacher_judgements_are_the_yes_share_of_yes_and_no_at_the_next_token(tiny_student):
    """Batched, left-padded judgements equal each prompt's own unpadded forward: p(yes) / (p(yes) + p(no))."""
    import torch

    from tasks.curate.flow_stage import teacher_judgements
    from tasks.models import load_causal_lm, load_tokenizer

    rows = [{"example_id": f"q{i}", "prompt": text} for i, text in enumerate(
        ["What is 2 plus 3?", "Name the bigger of 7 and 12, and say why it is the bigger one of the two.", "Hi"])]
    # the tiny demo tokenizer has " bigger" and " plus" as single tokens (" yes" and " no" start with the same " ")
    cfg = CurateConfig(judge_template=JUDGE, judge_yes=" bigger", judge_no=" plus")
    judged = teacher_judgements(tiny_student, rows, cfg, batch_size=3)
    tok, model = load_tokenizer(tiny_student), load_causal_lm(tiny_student).eval()
    yes, no = tok(" bigger", add_special_tokens=False)["input_ids"][0], tok(" plus", add_special_tokens=False)["input_ids"][0]
    assert yes != no
    for r in rows:
        ids = torch.tensor([tok(JUDGE.format(prompt=r["prompt"]))["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        expected = float(torch.softmax(logp[[yes, no]], -1)[0])
        assert judged[r["example_id"]] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert 0.0 < judged[r["example_id"]] < 1.0
    with pytest.raises(UserError, match="same token"):
        teacher_judgements(tiny_student, rows, CurateConfig(judge_template=JUDGE, judge_yes=" yes", judge_no=" no"))
