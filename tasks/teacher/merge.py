"""Derived label sets from several teachers: a probability-mean merge and a per-example routing.

Both read K finished label sets (manifests) whose members share the student's
tokenizer, and write one label set in the ordinary shard/manifest format
(storage/soft_labels: shards written under temporary names and renamed, the
manifest last), so training reads it like any capture.

* `merge_label_sets`: every member labelled the same sequences (same example,
  prompt and response tokens, row for row). The target is the weighted mean of
  the members' probabilities over the union of their top-k ids; each member's
  mass outside its top-k stays in the tail. The rule and its guarantees are in
  storage/FORMAT.md ("Merged label sets").
* `route_label_sets`: each example takes its labels from one chosen member
  (a mapping example_id -> member index, e.g. built from a dataset column with
  `routing_from_column`).

Members are read in lockstep, one record at a time, so memory stays at one
output shard whatever the size of the label sets.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from storage import soft_labels
from storage.atomic import sha256_json
from storage.errors import UserError
from tasks.teacher.capture import sample_id

MERGE_RULE = "mean-prob-union-v1"
ROUTE_RULE = "route-v1"
# Fields every member must agree on (else the merged ids or rows would mean different things).
_SHARED_FIELDS = ("tokenizer_hash", "vocab_size", "split", "logprobs_mode")


class MergeError(UserError):
    """Label sets that cannot be merged or routed; the message names the manifests and the first offending sample."""


# --- members -----------------------------------------------------------------------------

def _load_members(manifests: Sequence[str | Path]) -> list[dict[str, Any]]:
    if len(manifests) < 2:
        raise MergeError(f"a merge needs at least 2 label sets, got {len(manifests)}: {list(map(str, manifests))}")
    loaded = []
    for path in manifests:
        try:
            loaded.append(soft_labels.load_manifest(path))
        except soft_labels.SoftLabelError as exc:
            raise MergeError(str(exc)) from exc
    first = loaded[0]["metadata"]
    for path, manifest in zip(manifests[1:], loaded[1:]):
        meta = manifest["metadata"]
        for field in _SHARED_FIELDS:
            if meta.get(field) != first.get(field):
                raise MergeError(
                    f"{path}: field {field} is {meta.get(field)!r} but {manifests[0]} has {first.get(field)!r}; "
                    "merged members must label the same split with the same tokenizer and logprobs_mode"
                )
    return loaded


def _member_record(path: str | Path, manifest: dict[str, Any], weight: float | None = None) -> dict[str, Any]:
    meta = manifest["metadata"]
    record = {
        "manifest": str(Path(manifest["_dir"]) / soft_labels.MANIFEST_NAME),
        "teacher_model": meta.get("teacher_model"),
        "teacher_hash": meta.get("teacher_hash"),
        "teacher_key": meta.get("teacher_key"),
        "k": int(meta["k"]),
        "mode": meta.get("mode"),
        "response_source": meta.get("response_source"),
        "num_rows": manifest["num_rows"],
    }
    if weight is not None:
        record["weight"] = weight
    return record


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = list(weights)
    if len(weights) != n:
        raise MergeError(f"weights has {len(weights)} values for {n} members; give one weight per member")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise MergeError(f"weights[{i}] is {w!r}; every weight must be a finite number > 0 (leave a member out instead of weighting it 0)")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _derived_metadata(loaded: list[dict[str, Any]], k: int, codec: str | None, extra: dict[str, Any],
                      response_source: str) -> dict[str, Any]:
    first = loaded[0]["metadata"]
    meta = {
        "schema_version": soft_labels.SCHEMA_VERSION,
        "codec": codec or first.get("codec"),
        "k": int(k),
        "split": first.get("split"),
        "mode": first.get("mode"),
        "response_source": response_source,
        "teacher_model": "+".join(str(m["metadata"].get("teacher_model")) for m in loaded),
        "teacher_revision": None,
        "teacher_hash": sha256_json([m["metadata"].get("teacher_hash") for m in loaded])[:16],
        "tokenizer_hash": first.get("tokenizer_hash"),
        "vocab_size": first.get("vocab_size"),
        "chat_template_hash": first.get("chat_template_hash"),
        "vllm_version": first.get("vllm_version"),
        "logprobs_mode": first.get("logprobs_mode"),
        "sampling": first.get("sampling"),
        "merge": extra,
    }
    if "reference_prefix" in first:
        meta["reference_prefix"] = first["reference_prefix"]
    # The derived set's teacher identity: the members' identities and how they were combined.
    meta["teacher_key"] = sha256_json({
        "rule": extra["rule"], "members": [m["metadata"].get("teacher_key") for m in loaded], "k": int(k),
        "weights": extra.get("weights"), "routing": extra.get("routing_key"),
    })[:16]
    return meta


class _ShardWriter:
    """Collects derived rows into shards of `shard_rows`; a shard whose finished copy matches is kept, not rewritten."""

    def __init__(self, out_dir: Path, metadata: dict[str, Any], shard_rows: int):
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise MergeError(f"shard_rows must be a positive int, got {shard_rows!r}")
        self.out_dir, self.metadata, self.shard_rows = Path(out_dir), metadata, shard_rows
        self.pending: list[tuple[list[str], Any]] = []  # (member sample ids, thunk producing the derived row)
        self.records: list[dict[str, Any]] = []
        self.skipped = 0

    def add(self, member_sample_ids: list[str], make_row) -> None:
        self.pending.append((member_sample_ids, make_row))
        if len(self.pending) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending and self.records:
            return
        index = len(self.records)
        key = sha256_json([ids for ids, _ in self.pending])[:16]
        done = soft_labels.finished_shard(self.out_dir, index, self.metadata, inputs_key=key)
        if done is not None:
            self.skipped += 1
            self.records.append(done)
        else:
            rows = [make() for _, make in self.pending]
            self.records.append(soft_labels.write_shard(self.out_dir, index, rows, self.metadata, inputs_key=key))
        self.pending = []

    def finish(self) -> Path:
        if self.pending or not self.records:
            self.flush()
        return soft_labels.write_manifest(self.out_dir, self.records, self.metadata)


def _lockstep(manifests: Sequence[str | Path], loaded: list[dict[str, Any]],
              expected_tokenizer_hash: str | None) -> Iterator[list[dict[str, Any]]]:
    """One record per member at a time; refuses members of different lengths."""
    counts = [m["num_rows"] for m in loaded]
    if len(set(counts)) != 1:
        raise MergeError(
            "members hold different numbers of rows (" + ", ".join(f"{p}: {c}" for p, c in zip(manifests, counts)) +
            "); merged members must label the same sequences"
        )
    try:
        readers = [soft_labels.read(p, expected_tokenizer_hash=expected_tokenizer_hash,
                                    vocab_size=m["metadata"].get("vocab_size")) for p, m in zip(manifests, loaded)]
        yield from zip(*readers)
    except soft_labels.SoftLabelError as exc:
        raise MergeError(str(exc)) from exc


def _same_sequence(manifests, records: list[dict[str, Any]], index: int, fields=("example_id", "prompt_ids", "response_ids")) -> None:
    ref = records[0]
    for path, rec in zip(manifests[1:], records[1:]):
        for field in fields:
            a, b = ref[field], rec[field]
            same = a == b if isinstance(a, str) else np.array_equal(np.asarray(a), np.asarray(b))
            if not same:
                hint = ("members generated different responses: merge members that scored the same responses "
                        "(teacher.mode=score, or score the first member's responses)") if field == "response_ids" \
                    else "members must label the same prompts in the same order"
                raise MergeError(
                    f"{path}: row {index} (sample {rec['sample_id']}, example {rec['example_id']}) differs from "
                    f"{manifests[0]} (sample {ref['sample_id']}, example {ref['example_id']}) in field {field}; {hint}"
                )


# --- the merge rule ------------------------------------------------------------------------

def merge_position_labels(members: Sequence[dict[str, np.ndarray]], weights: Sequence[float], response_ids: np.ndarray,
                          k: int) -> dict[str, np.ndarray]:
    """The merge rule of FORMAT.md on one sequence, in float64.

    members: per member topk_ids [T, k_m], topk_logprobs [T, k_m], token_logprob [T], tail_logmass [T].
    weights: normalised (sum 1). Returns topk_ids [T, k], topk_logprobs [T, k] (descending),
    token_logprob [T], tail_logmass [T].

    For each position the candidates are the union of the members' top-k ids and the realised
    token. Member m contributes w_m * p_m(x) to candidate x when x is in its top-k, or when x is
    the realised token (whose log-prob every member stores exactly); any other contribution is
    unknown and stays in member m's tail. The k largest candidates are kept (ties: smaller id);
    the rest, and every member's remaining tail, form the merged tail.
    """
    response_ids = np.asarray(response_ids, dtype=np.int64)
    t_len = response_ids.size
    ids_cols, val_cols, tail = [], [], np.zeros(t_len)
    realised = np.zeros(t_len)
    for m, w in zip(members, weights):
        ids = np.asarray(m["topk_ids"], dtype=np.int64).reshape(t_len, -1)
        p = np.exp(np.asarray(m["topk_logprobs"], dtype=np.float64).reshape(t_len, -1))
        p_tok = np.exp(np.asarray(m["token_logprob"], dtype=np.float64))
        inside = (ids == response_ids[:, None]).any(axis=1)
        outside_tok = np.where(inside, 0.0, p_tok)
        ids_cols.append(ids)
        val_cols.append(w * p)
        realised += w * outside_tok
        # The realised token's mass leaves this member's tail (float32 round-off can push it below 0).
        tail += w * np.maximum(np.exp(np.asarray(m["tail_logmass"], dtype=np.float64)) - outside_tok, 0.0)
    ids_cols.append(response_ids[:, None])
    val_cols.append(realised[:, None])
    ids = np.concatenate(ids_cols, axis=1)
    vals = np.concatenate(val_cols, axis=1)
    width = ids.shape[1]
    pos = np.repeat(np.arange(t_len), width)
    span = int(ids.max()) + 1 if ids.size else 1
    uniq, inverse = np.unique(pos * span + ids.ravel(), return_inverse=True)
    summed = np.bincount(inverse.ravel(), weights=vals.ravel(), minlength=uniq.size)
    u_pos, u_ids = uniq // span, uniq % span
    order = np.lexsort((u_ids, -summed, u_pos))
    u_pos, u_ids, summed = u_pos[order], u_ids[order], summed[order]
    per_pos = np.bincount(u_pos, minlength=t_len)
    if per_pos.size and per_pos.min() < k:
        t = int(np.argmin(per_pos))
        raise MergeError(f"position {t} has {int(per_pos[t])} distinct candidate ids, fewer than k={k} (a member repeats ids)")
    starts = np.concatenate([[0], np.cumsum(per_pos)[:-1]])
    rank = np.arange(u_pos.size) - starts[u_pos]
    keep = rank < k
    dropped = np.bincount(u_pos[~keep], weights=summed[~keep], minlength=t_len)
    with np.errstate(divide="ignore"):
        topk_lp = np.log(summed[keep]).reshape(t_len, k)
        tail_lm = np.log(tail + dropped)
        token_lp = np.log(sum(w * np.exp(np.asarray(m["token_logprob"], dtype=np.float64)) for m, w in zip(members, weights)))
    return {
        "topk_ids": u_ids[keep].reshape(t_len, k),
        "topk_logprobs": topk_lp,
        "token_logprob": token_lp,
        "tail_logmass": tail_lm,
    }


def merge_label_sets(manifests: Sequence[str | Path], out_dir: str | Path, *, weights: Sequence[float] | None = None,
                     k: int | None = None, codec: str | None = None, shard_rows: int = 2048,
                     expected_tokenizer_hash: str | None = None, log_fn=print) -> Path:
    """Write the probability-mean merge of `manifests` under `out_dir`; return its manifest path.

    weights: one positive weight per member (normalised to sum 1; default uniform).
    k: merged top-k size, at most the largest member k (the default): every position's
    candidate union holds at least that many ids, so no position needs padding entries.
    codec: of the output (default: the first member's). A rerun with the same members and
    settings rewrites nothing.
    """
    loaded = _load_members(manifests)
    weights = _check_weights(weights, len(loaded))
    ks = [int(m["metadata"]["k"]) for m in loaded]
    k = max(ks) if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max(ks):
        raise MergeError(
            f"k={k!r}: the merged top-k must be between 1 and the largest member k ({max(ks)}); "
            "a larger k would need padding entries where members agree, and the divergences would read them as "
            "zero-probability tokens"
        )
    extra = {
        "rule": MERGE_RULE,
        "members": [_member_record(p, m, w) for p, m, w in zip(manifests, loaded, weights)],
        "weights": weights,
        "k_cap": k,
    }
    metadata = _derived_metadata(loaded, k, codec, extra, loaded[0]["metadata"].get("response_source"))
    writer = _ShardWriter(Path(out_dir), metadata, shard_rows)
    for index, records in enumerate(_lockstep(manifests, loaded, expected_tokenizer_hash)):
        _same_sequence(manifests, records, index)

        def make(records=records):
            ref = records[0]
            merged = merge_position_labels(records, weights, ref["response_ids"], k)
            return _derived_row(ref, merged, metadata)

        writer.add([r["sample_id"] for r in records], make)
    manifest = writer.finish()
    log_fn(f"merge: {len(loaded)} members -> {manifest} ({len(writer.records)} shards, {writer.skipped} already complete)")
    return manifest


def _derived_row(ref: dict[str, Any], labels: dict[str, np.ndarray], metadata: dict[str, Any]) -> dict[str, Any]:
    response = [int(t) for t in ref["response_ids"]]
    prompt = [int(t) for t in ref["prompt_ids"]]
    return {
        "sample_id": sample_id(prompt, response, metadata["response_source"], metadata["teacher_key"]),
        "example_id": ref["example_id"],
        "split": ref["split"],
        "response_source": metadata["response_source"],
        "prompt_ids": prompt,
        "response_ids": response,
        "topk_ids": labels["topk_ids"],
        "topk_logprobs": labels["topk_logprobs"],
        "token_logprob": labels["token_logprob"],
        "tail_logmass": labels["tail_logmass"],
    }


# --- routing -------------------------------------------------------------------------------

def truncate_labels(record: dict[str, Any], k: int) -> dict[str, np.ndarray]:
    """A record's labels cut to the top `k`; the dropped entries' mass joins the tail (exactly, in float64)."""
    lp = np.asarray(record["topk_logprobs"], dtype=np.float64)
    tail = np.exp(np.asarray(record["tail_logmass"], dtype=np.float64)) + np.exp(lp[:, k:]).sum(axis=1)
    with np.errstate(divide="ignore"):
        tail_lm = np.log(tail)
    return {
        "topk_ids": np.asarray(record["topk_ids"])[:, :k],
        "topk_logprobs": lp[:, :k],
        "token_logprob": np.asarray(record["token_logprob"], dtype=np.float64),
        "tail_logmass": tail_lm,
    }


def _example_groups(records: Iterator[dict[str, Any]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Consecutive records of one example (n samples per prompt) as one group."""
    group: list[dict[str, Any]] = []
    for rec in records:
        if group and rec["example_id"] != group[0]["example_id"]:
            yield group[0]["example_id"], group
            group = []
        group.append(rec)
    if group:
        yield group[0]["example_id"], group


def route_label_sets(manifests: Sequence[str | Path], routing: Mapping[str, int], out_dir: str | Path, *,
                     k: int | None = None, codec: str | None = None, shard_rows: int = 2048,
                     routing_source: str | None = None, expected_tokenizer_hash: str | None = None,
                     log_fn=print) -> Path:
    """Write a label set whose every example takes its rows from member `routing[example_id]`.

    Members must list the same examples in the same order (they labelled the same prompts);
    their responses may differ (each example keeps its chosen member's response). Every
    labelled example must be routed; mapping keys that no member labels are ignored (they may
    belong to another split). k: output top-k, at most the smallest member k (the default);
    entries beyond it join the tail. routing_source: where the mapping came from (recorded).
    """
    loaded = _load_members(manifests)
    sources = {m["metadata"].get("response_source") for m in loaded}
    if len(sources) != 1:
        raise MergeError(f"members have response_source {sorted(map(str, sources))}; a routed label set needs one "
                         f"({', '.join(map(str, manifests))})")
    ks = [int(m["metadata"]["k"]) for m in loaded]
    k = min(ks) if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(ks):
        raise MergeError(f"k={k!r}: a routed label set's top-k must be between 1 and the smallest member k ({min(ks)})")
    for example, member in routing.items():
        if isinstance(member, bool) or not isinstance(member, (int, np.integer)) or not 0 <= member < len(loaded):
            raise MergeError(f"routing: example {example} goes to member {member!r}; members are 0..{len(loaded) - 1} "
                             f"({', '.join(map(str, manifests))})")
    extra = {
        "rule": ROUTE_RULE,
        "members": [_member_record(p, m) for p, m in zip(manifests, loaded)],
        "routing_source": routing_source,
        "routing_key": sha256_json(sorted((str(e), int(m)) for e, m in routing.items()))[:16],
    }
    metadata = _derived_metadata(loaded, k, codec, extra, sources.pop())
    counts = [0] * len(loaded)
    writer = _ShardWriter(Path(out_dir), metadata, shard_rows)
    try:
        streams = [_example_groups(soft_labels.read(p, expected_tokenizer_hash=expected_tokenizer_hash,
                                                    vocab_size=m["metadata"].get("vocab_size")))
                   for p, m in zip(manifests, loaded)]
        position = 0
        while True:
            groups = [next(s, None) for s in streams]
            if all(g is None for g in groups):
                break
            if any(g is None for g in groups) or len({g[0] for g in groups}) != 1:
                ids = ", ".join(f"{p}: {g[0] if g else 'end of label set'}" for p, g in zip(manifests, groups))
                raise MergeError(f"example group {position}: members list different examples ({ids}); "
                                 "routed members must label the same prompts in the same order")
            example = groups[0][0]
            if example not in routing:
                raise MergeError(f"example {example} (in {manifests[0]}) has no routing entry; "
                                 "route every labelled example to a member")
            member = int(routing[example])
            counts[member] += 1
            for rec in groups[member][1]:
                writer.add([rec["sample_id"]],
                           lambda rec=rec: _derived_row(rec, truncate_labels(rec, k), metadata))
            position += 1
    except soft_labels.SoftLabelError as exc:
        raise MergeError(str(exc)) from exc
    # Counts are known only after the pass: they go in the log, not in the metadata (the shards already carry it).
    manifest = writer.finish()
    log_fn(f"route: examples per member {counts} -> {manifest}")
    return manifest


def routing_from_column(rows: str | Path | Sequence[Mapping[str, Any]], column: str,
                        members: Mapping[Any, int] | None = None) -> dict[str, int]:
    """example_id -> member index from a column of a dataset (a Parquet/JSONL path or a list of dicts).

    Without `members` the column holds member indices; with it, the column's values are looked up
    there (e.g. {"arith": 0, "colours": 1} for a task column). Unknown values are refused by name.
    """
    if isinstance(rows, (str, Path)):
        path = Path(rows)
        if path.suffix == ".parquet":
            rows = pq.read_table(path, columns=["example_id", column]).to_pylist()
        else:
            import json

            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out: dict[str, int] = {}
    for i, row in enumerate(rows):
        if "example_id" not in row or column not in row:
            raise MergeError(f"row {i}: routing needs fields example_id and {column!r}; got {sorted(row)}")
        value = row[column]
        if members is not None:
            if value not in members:
                raise MergeError(f"example {row['example_id']}: {column}={value!r} is not in the routing table "
                                 f"{dict(members)}; add it or fix the column")
            value = members[value]
        out[str(row["example_id"])] = int(value)
    return out
