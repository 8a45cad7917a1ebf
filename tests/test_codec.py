"""compact-v1 building blocks: id bit-packing and log-prob quantisation."""

import numpy as np

from storage import codec
from storage.codec import FlatLabels


def test_id_mantissas_roundtrip_across_rows():
    rng = np.random.default_rng(0)
    ids = np.concatenate([[0, 1, 2, 3, 255, 256, 152_063, 2**31 - 2], rng.integers(0, 152_064, 500)])
    b, m = codec.id_buckets(ids)
    assert np.all((np.int64(1) << b) + m - 1 == ids) and np.all(m < (np.int64(1) << b))
    per_row = np.array([3, 0, 5, len(ids) - 8])
    packed = codec.pack_mantissas(b, m, per_row)
    assert packed[1] == b""
    back = codec.unpack_mantissas(b, np.frombuffer(b"".join(packed), np.uint8), per_row)
    assert np.array_equal(back, m)


def test_compact_error_bounds_sorting_and_minus_inf():
    rng = np.random.default_rng(1)
    n, k = 50, 6
    lp = -np.sort(rng.exponential(3, (n, k)), axis=1).astype(np.float32)
    lp[0, -2:] = -np.inf  # e.g. processed_logprobs after top-p
    ids = np.stack([rng.choice(1000, k, replace=False) for _ in range(n)])
    x = FlatLabels(ids[:, 0].copy(), ids, lp, lp[:, 0].copy(), np.full(n, -3.0, np.float32), np.array([20, 30]))
    cols = {name: (np.frombuffer(b"".join(v), np.uint8) if lens is None else v)
            for name, (v, lens) in codec.CODECS["compact-v1"].encode(x).items()}
    y = codec.CODECS["compact-v1"].decode(cols, x.response_ids, x.lengths, k)
    assert np.array_equal(y.topk_ids, ids)
    assert np.all(np.isneginf(y.topk_logprobs[0, -2:]))
    finite = np.isfinite(lp)
    assert np.abs(y.topk_logprobs[finite] - lp[finite]).max() <= codec.LP_SCALE / 2 + codec.TOP1_SCALE / 2 + 1e-6
    assert np.abs(y.topk_logprobs[:, 0] - lp[:, 0]).max() <= codec.TOP1_SCALE / 2 + 1e-6
    assert np.all(np.diff(np.where(np.isfinite(y.topk_logprobs), y.topk_logprobs, -1e9), axis=1) <= 0)
    assert np.array_equal(y.token_logprob, y.topk_logprobs[:, 0])
