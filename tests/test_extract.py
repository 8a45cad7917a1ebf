"""vLLM flat log-probs → label arrays, and the stable tail mass."""

import numpy as np
import pytest
from vllm.logprobs import FlatLogprobs

from tasks.teacher.extract import labels_from_flat, tail_logmass


def _flat(positions):
    """positions: list of (sampled_id, sampled_lp, sampled_rank, [(id, lp), ...top-k]) in vLLM's order."""
    flat = FlatLogprobs()
    for sid, slp, srank, top in positions:
        flat.start_indices.append(len(flat.logprobs))
        for tid, lp, rank in [(sid, slp, srank)] + [(t, logp, r + 1) for r, (t, logp) in enumerate(top)]:
            flat.token_ids.append(tid)
            flat.logprobs.append(lp)
            flat.ranks.append(rank)
            flat.decoded_tokens.append(None)
        flat.end_indices.append(len(flat.logprobs))
    return flat


def test_labels_from_flat_keeps_rank_order_and_realised_token():
    flat = _flat([
        (7, -0.5, 1, [(7, -0.5), (3, -1.5), (9, -2.0)]),
        (4, -3.0, 5, [(1, -0.2), (2, -2.5), (8, -2.9)]),  # sampled token outside the top-k
    ])
    out = labels_from_flat(flat, k=3)
    assert out["token_ids"].tolist() == [7, 4]
    np.testing.assert_allclose(out["token_logprob"], [-0.5, -3.0])
    assert out["topk_ids"].tolist() == [[7, 3, 9], [1, 2, 8]]
    np.testing.assert_allclose(out["topk_logprobs"][1], [-0.2, -2.5, -2.9])
    expected = np.log(1 - np.exp([-0.5, -1.5, -2.0]).sum())
    np.testing.assert_allclose(out["tail_logmass"][0], expected, rtol=1e-6)


def test_labels_from_flat_skips_prompt_position_zero():
    flat = FlatLogprobs()
    flat.start_indices.append(0)
    flat.end_indices.append(0)  # vLLM's empty entry for the first prompt token
    tail = _flat([(5, -0.1, 1, [(5, -0.1), (6, -3.0)])])
    for name in ("token_ids", "logprobs", "ranks", "decoded_tokens"):
        getattr(flat, name).extend(getattr(tail, name))
    flat.start_indices.append(0)
    flat.end_indices.append(3)
    out = labels_from_flat(flat, k=2, first_position=1)
    assert out["topk_ids"].tolist() == [[5, 6]]


def test_wrong_width_is_an_error():
    flat = _flat([(7, -0.5, 1, [(7, -0.5), (3, -1.5)])])
    with pytest.raises(ValueError, match="expected k\\+1=4"):
        labels_from_flat(flat, k=3)


def test_tail_logmass_is_stable_near_full_mass():
    # top-k mass = 1 - 1e-9: the naive log(1 - sum(exp)) loses most digits in float32.
    lp = np.log(np.array([[1 - 1e-9 - 1e-12, 1e-12]]))
    np.testing.assert_allclose(tail_logmass(lp), np.log(1e-9), rtol=1e-4)
    assert tail_logmass(np.array([[0.0]]))[0] == -np.inf
    np.testing.assert_allclose(tail_logmass(np.log(np.array([[0.5, 0.25]]))), [np.log(0.25)], rtol=1e-12)
