"""Codecs: how the per-position label arrays of a shard are laid out in Parquet columns.

A codec turns the decoded labels of a whole shard (flat arrays, one row per
response token) into Parquet list columns, and back. The codec's name is stored
in every shard's metadata and in the manifest; `storage.soft_labels.read`
decodes whichever codec a shard names. See storage/FORMAT.md for the layouts.

    plain-f32   exact: int32 ids, float32 log-probs (the walking skeleton's layout)
    baseline    uint32 ids, float16 log-probs
    compact-v1  (default) ids split Elias-gamma style into a bucket
                floor(log2(id+1)) (uint8, entropy-coded by zstd) and raw
                mantissa bits (bit-packed per row); the top-1 log-prob on a
                1/1024-nat grid, the other ranks on a 1/64-nat grid relative
                to it, delta-coded along the rank (uint16); tail mass on the
                1/1024 grid; the realised token's log-prob stored only when it
                is outside the top-k. Parquet applies zstd on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

DEFAULT_CODEC = "compact-v1"
# Grid step of the compact codec, in nats: max abs log-prob error is LP_SCALE / 2.
LP_SCALE = 1.0 / 64.0
# Largest grid level; it decodes as -inf (probability 0, e.g. processed_logprobs after top-p).
LP_INF = 65535
# Finer grid for each position's top-1 log-prob and tail mass (one value per token each, so their cost is
# shared by k entries; together they usually hold most of the probability mass).
TOP1_SCALE = 1.0 / 1024.0


@dataclass
class FlatLabels:
    """Labels of several rows concatenated along the token axis (N tokens in all)."""

    response_ids: np.ndarray  # [N] int64
    topk_ids: np.ndarray  # [N, k] int64
    topk_logprobs: np.ndarray  # [N, k] float32, descending along k
    token_logprob: np.ndarray  # [N] float32
    tail_logmass: np.ndarray  # [N] float32
    lengths: np.ndarray  # [R] tokens per row

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])


# A column: (values, per-row lengths in values) -> a list<type> Parquet column.
Columns = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Codec:
    name: str
    fields: tuple[pa.Field, ...]
    encode: Callable[[FlatLabels], Columns]
    # decode(columns as flat values, response_ids [N], lengths [R], k) -> FlatLabels
    decode: Callable[[dict[str, np.ndarray], np.ndarray, np.ndarray, int], FlatLabels]
    # Parquet writer options for the label columns (encodings; dictionary off where it hurts).
    byte_stream_split: tuple[str, ...] = ()

    def schema_fields(self) -> list[pa.Field]:
        return list(self.fields)


def column_width(name: str, k: int) -> int | None:
    """Values per response token of a label column; None where it varies (sparse or packed columns)."""
    return {"topk_ids": k, "topk_logprobs": k, "token_logprob": 1, "tail_logmass": 1, "topk_id_bucket": k,
            "top1_logprob_level": 1, "topk_logprob_gaps": k - 1, "tail_logmass_level": 1}.get(name)


def _per_token(lengths: np.ndarray, width: int) -> np.ndarray:
    return np.asarray(lengths, dtype=np.int64) * width


# --- plain-f32 --------------------------------------------------------------------------

def _fixed_width_encode(x: FlatLabels, id_dtype, value_dtype) -> Columns:
    """Plain columns: ids and log-probs cast to fixed-width numpy types."""
    k = x.k
    return {
        "topk_ids": (x.topk_ids.astype(id_dtype).ravel(), _per_token(x.lengths, k)),
        "topk_logprobs": (x.topk_logprobs.astype(value_dtype).ravel(), _per_token(x.lengths, k)),
        "token_logprob": (x.token_logprob.astype(value_dtype), _per_token(x.lengths, 1)),
        "tail_logmass": (x.tail_logmass.astype(value_dtype), _per_token(x.lengths, 1)),
    }


def _plain_encode(x: FlatLabels) -> Columns:
    return _fixed_width_encode(x, np.int32, np.float32)


def _plain_decode(cols: dict[str, np.ndarray], response_ids: np.ndarray, lengths: np.ndarray, k: int) -> FlatLabels:
    n = response_ids.size
    return FlatLabels(
        response_ids=response_ids,
        topk_ids=_reshape(cols["topk_ids"].astype(np.int64), n, k, "topk_ids"),
        topk_logprobs=_reshape(cols["topk_logprobs"].astype(np.float32), n, k, "topk_logprobs"),
        token_logprob=_reshape(cols["token_logprob"].astype(np.float32), n, None, "token_logprob"),
        tail_logmass=_reshape(cols["tail_logmass"].astype(np.float32), n, None, "tail_logmass"),
        lengths=lengths,
    )


# --- baseline: uint32 ids + float16 log-probs -------------------------------------------

def _baseline_encode(x: FlatLabels) -> Columns:
    return _fixed_width_encode(x, np.uint32, np.float16)


# --- compact-v1 -------------------------------------------------------------------------

def quantise(logprobs: np.ndarray, scale: float = LP_SCALE) -> np.ndarray:
    """Grid level round(-logprob / scale), clipped to [0, LP_INF]; -inf (and below the grid) -> LP_INF."""
    lp = np.asarray(logprobs, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        q = np.rint(np.clip(-lp, 0.0, None) / scale)
    q = np.where(np.isfinite(q), q, LP_INF)
    return np.minimum(q, LP_INF).astype(np.int64)


def dequantise(levels: np.ndarray, scale: float = LP_SCALE) -> np.ndarray:
    levels = np.asarray(levels, dtype=np.int64)
    out = (-levels * scale).astype(np.float32)
    out[levels >= LP_INF] = -np.inf
    return out


def realised_rank(response_ids: np.ndarray, topk_ids: np.ndarray) -> np.ndarray:
    """Rank (0-based) of each realised token in its position's top-k, or -1 when outside it."""
    hit = topk_ids == np.asarray(response_ids)[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def id_buckets(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Elias-gamma split of id+1 = 2^b + m: bucket b (entropy-coded by zstd) and b raw mantissa bits m."""
    v = np.asarray(ids, dtype=np.int64) + 1
    b = np.floor(np.log2(v)).astype(np.int64)
    b += (v >> (b + 1)) > 0  # guard float rounding at powers of two
    b -= (v >> b) == 0
    return b, v - (np.int64(1) << b)


def _bit_layout(buckets: np.ndarray, row_entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bit offset of each entry's mantissa and byte length per row (each row starts on a byte)."""
    ends = np.cumsum(row_entries)
    row_bits = np.add.reduceat(buckets, ends - row_entries) if buckets.size else np.zeros(0, np.int64)
    row_bits = np.where(row_entries > 0, row_bits, 0)
    row_bytes = (row_bits + 7) // 8
    row_start_bit = np.concatenate([[0], np.cumsum(row_bytes)[:-1]]) * 8
    within = np.cumsum(buckets) - buckets  # exclusive cumsum over all entries
    row_of_entry = np.repeat(np.arange(row_entries.size), row_entries)
    first_in_row = (ends - row_entries)
    offset_in_row = within - within[first_in_row][row_of_entry] if buckets.size else within
    return row_start_bit[row_of_entry] + offset_in_row, row_bytes


MAX_ID_BITS = 31


def pack_mantissas(buckets: np.ndarray, mantissas: np.ndarray, row_entries: np.ndarray) -> list[bytes]:
    starts, row_bytes = _bit_layout(buckets, row_entries)
    j = np.arange(MAX_ID_BITS)
    use = j[None, :] < buckets[:, None]
    bit = (mantissas[:, None] >> np.maximum(buckets[:, None] - 1 - j[None, :], 0)) & 1
    bits = np.zeros(int(row_bytes.sum()) * 8, dtype=np.uint8)
    bits[(starts[:, None] + j[None, :])[use]] = bit[use]
    packed = np.packbits(bits).tobytes()
    cuts = np.concatenate([[0], np.cumsum(row_bytes)])
    return [packed[cuts[i] : cuts[i + 1]] for i in range(row_entries.size)]


def unpack_mantissas(buckets: np.ndarray, packed: np.ndarray, row_entries: np.ndarray) -> np.ndarray:
    starts, row_bytes = _bit_layout(buckets, row_entries)
    if packed.size != int(row_bytes.sum()):
        raise ValueError(f"field topk_id_bits has {packed.size} bytes, expected {int(row_bytes.sum())}")
    bits = np.unpackbits(packed).astype(np.int64)
    j = np.arange(MAX_ID_BITS)
    use = j[None, :] < buckets[:, None]
    pos = np.where(use, starts[:, None] + j[None, :], 0)
    weights = np.where(use, np.int64(1) << np.maximum(buckets[:, None] - 1 - j[None, :], 0), 0)
    return (bits[pos] * weights).sum(axis=1)


def _compact_encode(x: FlatLabels) -> Columns:
    k = x.k
    lp = x.topk_logprobs.astype(np.float64)
    top1 = quantise(lp[:, :1], TOP1_SCALE)  # fine grid for the top-1 (it carries most of the mass)
    top1_hat = np.where(top1 >= LP_INF, -np.inf, -top1 * TOP1_SCALE)
    with np.errstate(invalid="ignore"):
        rel = quantise(lp[:, 1:] - top1_hat, LP_SCALE)
    rel = np.where(np.isneginf(lp[:, 1:]), LP_INF, rel)
    gaps = np.diff(rel, axis=1, prepend=0)
    if gaps.size and gaps.min() < 0:
        raise ValueError("compact codec: top-k log-probs must be sorted descending along k")
    buckets, mantissas = id_buckets(x.topk_ids.ravel())
    row_entries = _per_token(x.lengths, k)
    rank = realised_rank(x.response_ids, x.topk_ids)
    outside = rank < 0
    per_row_outside = np.add.reduceat(outside.astype(np.int64), _row_starts(x.lengths)) if x.lengths.size else np.zeros(0, np.int64)
    per_row_outside = np.where(np.asarray(x.lengths) > 0, per_row_outside, 0)
    return {
        "topk_id_bucket": (buckets.astype(np.uint8), row_entries),
        "topk_id_bits": (pack_mantissas(buckets, mantissas, row_entries), None),
        "top1_logprob_level": (top1.astype(np.uint16).ravel(), _per_token(x.lengths, 1)),
        "topk_logprob_gaps": (gaps.astype(np.uint16).ravel(), _per_token(x.lengths, k - 1)),
        "tail_logmass_level": (quantise(x.tail_logmass, TOP1_SCALE).astype(np.uint16), _per_token(x.lengths, 1)),
        "token_logprob_outside": (x.token_logprob[outside].astype(np.float32), per_row_outside),
    }


def _compact_decode(cols: dict[str, np.ndarray], response_ids: np.ndarray, lengths: np.ndarray, k: int) -> FlatLabels:
    n = response_ids.size
    buckets = cols["topk_id_bucket"].astype(np.int64)
    if buckets.size != n * k:
        raise ValueError(f"field topk_id_bucket has {buckets.size} values, expected {n * k}")
    mantissas = unpack_mantissas(buckets, cols["topk_id_bits"], np.asarray(lengths, np.int64) * k)
    ids = ((np.int64(1) << buckets) + mantissas - 1).reshape(n, k)
    top1 = _reshape(cols["top1_logprob_level"].astype(np.int64), n, None, "top1_logprob_level")
    top1_hat = np.where(top1 >= LP_INF, -np.inf, -top1 * TOP1_SCALE)
    gaps = _reshape(cols["topk_logprob_gaps"].astype(np.int64), n, k - 1, "topk_logprob_gaps") if k > 1 else np.zeros((n, 0), np.int64)
    rel = np.minimum(np.cumsum(gaps, axis=1), LP_INF)
    topk_lp = np.concatenate([top1_hat[:, None], top1_hat[:, None] - rel * LP_SCALE], axis=1)
    topk_lp[:, 1:][rel >= LP_INF] = -np.inf
    topk_lp = topk_lp.astype(np.float32)
    tail = dequantise(_reshape(cols["tail_logmass_level"], n, None, "tail_logmass_level"), TOP1_SCALE)
    rank = realised_rank(response_ids, ids)
    outside = rank < 0
    extra = cols["token_logprob_outside"].astype(np.float32)
    if extra.size != int(outside.sum()):
        raise ValueError(
            f"field token_logprob_outside has {extra.size} values, expected {int(outside.sum())} "
            "(one per response token outside its top-k)"
        )
    token_lp = np.empty(n, dtype=np.float32)
    token_lp[~outside] = topk_lp[np.flatnonzero(~outside), rank[~outside]]
    token_lp[outside] = extra
    return FlatLabels(response_ids, ids, topk_lp, token_lp, tail, lengths)


def _row_starts(lengths: np.ndarray) -> np.ndarray:
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    # reduceat needs indices < N; rows of length 0 are masked by the caller.
    total = int(np.sum(lengths))
    return np.minimum(starts, max(total - 1, 0))


def _reshape(values: np.ndarray, n: int, k: int | None, field: str) -> np.ndarray:
    expected = n * (k or 1)
    if values.size != expected:
        what = f"k={k} per response token" if k else "one per response token"
        raise ValueError(f"field {field} has {values.size} values, expected {expected} ({what})")
    return values.reshape(n, k) if k else values


def _list(t: pa.DataType) -> pa.DataType:
    return pa.list_(t)


CODECS: dict[str, Codec] = {
    "plain-f32": Codec(
        "plain-f32",
        (pa.field("topk_ids", _list(pa.int32())), pa.field("topk_logprobs", _list(pa.float32())),
         pa.field("token_logprob", _list(pa.float32())), pa.field("tail_logmass", _list(pa.float32()))),
        _plain_encode, _plain_decode,
    ),
    "baseline": Codec(
        "baseline",
        (pa.field("topk_ids", _list(pa.uint32())), pa.field("topk_logprobs", _list(pa.float16())),
         pa.field("token_logprob", _list(pa.float16())), pa.field("tail_logmass", _list(pa.float16()))),
        _baseline_encode, _plain_decode,
    ),
    "compact-v1": Codec(
        "compact-v1",
        (pa.field("topk_id_bucket", _list(pa.uint8())), pa.field("topk_id_bits", pa.binary()),
         pa.field("top1_logprob_level", _list(pa.uint16())), pa.field("topk_logprob_gaps", _list(pa.uint16())),
         pa.field("tail_logmass_level", _list(pa.uint16())), pa.field("token_logprob_outside", _list(pa.float32()))),
        _compact_encode, _compact_decode,
        byte_stream_split=("topk_id_bucket", "top1_logprob_level", "topk_logprob_gaps", "tail_logmass_level"),
    ),
}


def get_codec(name: Any) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown soft-label codec {name!r}; known: {', '.join(CODECS)}")
    return CODECS[name]
