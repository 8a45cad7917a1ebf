"""On-policy losses against float64 hand computations, teacher-mixed sampling, rollout tables and the staleness check."""

import math

import numpy as np
import pytest
import torch

from tasks.onpolicy.config import OnPolicyConfig
from tasks.onpolicy.mixed_sampling import mix_log_probs, mixed_decode
from tasks.onpolicy.objectives import (
    clipped_policy_loss,
    importance_weight,
    minillm_advantages,
    returns,
    sampled_token_losses,
    single_step_reverse_kl,
    token_rewards,
    whiten,
)
from tasks.onpolicy.rollout import (
    StaleRolloutError,
    choose_prompts,
    reusable_rollouts,
    rollout_seed,
    write_rollouts,
)
from tasks.onpolicy.update import attach_advantages, check_policy_version, collate_rollouts, policy_gradient_step

D = torch.float64


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    teacher = -torch.rand(len(lengths), t, generator=g, dtype=D) * 3
    student = -torch.rand(len(lengths), t, generator=g, dtype=D) * 3
    mask = torch.zeros(len(lengths), t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return teacher, student, mask


@pytest.mark.parametrize("next_step", [True, False])
@pytest.mark.parametrize("gamma", [1.0, 0.95, 0.0])
@pytest.mark.parametrize("length_norm", [True, False])
def test_returns_match_hand_sums(next_step, gamma, length_norm):
    teacher, student, mask = _batch([5, 1, 3])
    r = token_rewards(teacher, student, mask)
    got = returns(r, mask, gamma=gamma, length_norm=length_norm, next_step=next_step)
    for b, n in enumerate([5, 1, 3]):
        for t in range(n):
            first = t + 1 if next_step else t
            terms = [gamma ** (u - first) * float(r[b, u]) for u in range(first, n)]
            value = sum(terms)
            if length_norm:
                value /= max(len(terms), 1)
            assert float(got[b, t]) == pytest.approx(value, abs=1e-12)
        assert torch.all(got[b, n:] == 0)


def test_length_normalisation_removes_the_length_bias():
    """Same per-token reward, different lengths: unnormalised returns grow with length, normalised ones do not."""
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 2:] = False
    r = torch.where(mask, torch.full((2, 8), -0.5, dtype=D), torch.zeros(2, 8, dtype=D))
    raw = returns(r, mask, gamma=1.0, length_norm=False, next_step=False)
    norm = returns(r, mask, gamma=1.0, length_norm=True, next_step=False)
    assert float(raw[0, 0]) == pytest.approx(-4.0) and float(raw[1, 0]) == pytest.approx(-1.0)
    assert float(norm[0, 0]) == pytest.approx(-0.5) and float(norm[1, 0]) == pytest.approx(-0.5)


def test_rewards_are_scaled_and_clipped():
    teacher = torch.tensor([[-1.0, -300.0]], dtype=D)
    student = torch.tensor([[-2.0, -1.0]], dtype=D)
    mask = torch.ones(1, 2, dtype=torch.bool)
    r = token_rewards(teacher, student, mask, scaling=0.5, clip=100.0)
    assert r.tolist() == [[0.5, -100.0]]


def test_whiten_is_masked():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    w = whiten(x, mask, eps=0.0)
    vals = np.array([1.0, 2.0, 3.0])
    expected = (vals - vals.mean()) / vals.std()
    assert w[mask].tolist() == pytest.approx(expected.tolist(), abs=1e-12)
    assert float(w[0, 2]) == 0 and float(w[1, 1]) == 0


def test_minillm_advantages_compose_the_pieces():
    teacher, student, mask = _batch([4, 2], seed=3)
    got = minillm_advantages(teacher, student, mask, gamma=0.95, reward_scaling=0.5, reward_clip=100.0,
                             length_norm=True, single_step=True, whiten_advantages=True)
    expected = whiten(returns(0.5 * (teacher - student) * mask, mask, gamma=0.95, length_norm=True, next_step=True), mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("adv", [1.5, -1.5])
@pytest.mark.parametrize("log_ratio", [math.log(0.5), math.log(0.9), 0.0, math.log(1.1), math.log(2.0)])
def test_clipped_policy_loss_value_and_gradient(adv, log_ratio):
    eps = 0.2
    sampling = torch.tensor([-1.3], dtype=D)
    student = (sampling + log_ratio).clone().requires_grad_(True)
    loss = clipped_policy_loss(student, sampling, torch.tensor([adv], dtype=D), eps)
    rho = math.exp(log_ratio)
    expected = max(-adv * rho, -adv * min(max(rho, 1 - eps), 1 + eps))
    assert float(loss) == pytest.approx(expected, abs=1e-12)
    loss.sum().backward()
    # Gradient flows only where the unclipped term is the max: d(-A rho)/d log q = -A rho.
    clipped_active = (adv > 0 and rho > 1 + eps) or (adv < 0 and rho < 1 - eps)
    assert float(student.grad) == pytest.approx(0.0 if clipped_active else -adv * rho, abs=1e-12)


def test_importance_weight_and_mixed_ratio():
    """rho = q_theta / p~ = (q_theta / q_old) * w with w = q_old / p~."""
    q_old, p_tilde, q_new = torch.tensor([-1.0], dtype=D), torch.tensor([-0.7], dtype=D), torch.tensor([-0.9], dtype=D)
    w = importance_weight(q_old, p_tilde)
    assert float(w) == pytest.approx(math.exp(-1.0) / math.exp(-0.7), abs=1e-12)
    loss = clipped_policy_loss(q_new, p_tilde, torch.tensor([1.0], dtype=D), 10.0)  # clip out of the way
    assert float(loss) == pytest.approx(-math.exp(-0.9 + 1.0) * float(w), abs=1e-12)


@pytest.mark.parametrize("k", [3, 16])
def test_single_step_reverse_kl_is_exact_on_the_bucket_support(k):
    g = torch.Generator().manual_seed(0)
    vocab, n = 16, 5
    t_logits = torch.randn(n, vocab, generator=g, dtype=D) * 2
    s_logits = torch.randn(n, vocab, generator=g, dtype=D) * 2
    logp, logq = torch.log_softmax(t_logits, -1), torch.log_softmax(s_logits, -1)
    top_lp, top_ids = logp.topk(k, -1)
    tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1.0)) if k < vocab else torch.full((n,), -math.inf, dtype=D)
    got = single_step_reverse_kl(logq.gather(1, top_ids), top_lp, tail)
    for i in range(n):
        ids = top_ids[i].tolist()
        q, p = logq[i].exp(), logp[i].exp()
        value = sum(float(q[j] * (logq[i, j] - logp[i, j])) for j in ids)
        rest = [j for j in range(vocab) if j not in ids]
        if rest:
            q_rest, p_rest = float(q[rest].sum()), float(p[rest].sum())
            value += q_rest * math.log(q_rest / p_rest)
        assert float(got[i]) == pytest.approx(value, abs=1e-9)
    if k == vocab:  # the whole vocabulary: the full reverse KL
        full = (logq.exp() * (logq - logp)).sum(-1)
        torch.testing.assert_close(got, full, rtol=0, atol=1e-9)


def test_sampled_token_loss_gradient_is_minus_advantage_times_grad_log_q():
    old = torch.tensor([-1.0, -2.0], dtype=D)
    new = old.clone().requires_grad_(True)
    adv = torch.tensor([0.3, -0.7], dtype=D)
    sampled_token_losses(new, old, adv)["pg"].sum().backward()
    assert new.grad.tolist() == pytest.approx((-adv).tolist(), abs=1e-12)


def test_mix_log_probs_matches_float64():
    lp = torch.log_softmax(torch.randn(7, dtype=D), -1)
    lq = torch.log_softmax(torch.randn(7, dtype=D), -1)
    got = mix_log_probs(lp, lq, 0.2)
    expected = torch.log(0.2 * lp.exp() + 0.8 * lq.exp())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert float(got.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(mix_log_probs(lp, lq, 0.0), lq)


def _tiny_llama(seed, vocab=48):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_mixed_decode_records_both_models_and_the_mixture():
    student, teacher = _tiny_llama(0), _tiny_llama(1)
    prompt = [1, 5, 9, 13]
    out = mixed_decode(student, teacher, prompt, alpha=0.2, max_new_tokens=6, eos_id=None,
                       generator=torch.Generator().manual_seed(3))
    seq = torch.tensor([prompt + out["response_ids"]])
    with torch.no_grad():
        lq = torch.log_softmax(student(seq).logits[0].double(), -1)
        lp = torch.log_softmax(teacher(seq).logits[0].double(), -1)
    for t, tok in enumerate(out["response_ids"]):
        pos = len(prompt) - 1 + t
        assert out["student_logprob"][t] == pytest.approx(float(lq[pos, tok]), abs=1e-5)
        assert out["teacher_logprob"][t] == pytest.approx(float(lp[pos, tok]), abs=1e-5)
        mixed = math.log(0.2 * math.exp(out["teacher_logprob"][t]) + 0.8 * math.exp(out["student_logprob"][t]))
        assert out["sampling_logprob"][t] == pytest.approx(mixed, abs=1e-12)
    again = mixed_decode(student, teacher, prompt, alpha=0.2, max_new_tokens=6, eos_id=None,
                         generator=torch.Generator().manual_seed(3))
    assert again == out  # seeded per prompt: reproducible


def test_mixed_decode_samples_from_the_mixture():
    """One step, many draws: token frequencies follow alpha*p + (1-alpha)*q (200 draws over 4 tokens: ~4 sigma bound)."""
    student, teacher = _tiny_llama(0, vocab=4), _tiny_llama(1, vocab=4)
    prompt = [1, 3]
    gen = torch.Generator().manual_seed(0)
    counts = np.zeros(4)
    for _ in range(200):
        out = mixed_decode(student, teacher, prompt, alpha=0.5, max_new_tokens=1, eos_id=None, generator=gen)
        counts[out["response_ids"][0]] += 1
    with torch.no_grad():
        lq = torch.log_softmax(student(torch.tensor([prompt])).logits[0, -1].double(), -1)
        lp = torch.log_softmax(teacher(torch.tensor([prompt])).logits[0, -1].double(), -1)
    expected = (0.5 * lp.exp() + 0.5 * lq.exp()).numpy()
    assert np.abs(counts / counts.sum() - expected).max() < 0.13


def _record(prompt, response, k, vocab, version, g):
    t = len(response)
    logits = torch.randn(t, vocab, generator=g, dtype=D) * 2
    lp = torch.log_softmax(logits, -1)
    top = lp.topk(k, -1)
    tail = torch.log1p(-top.values.exp().sum(-1))
    return {"sample_id": f"s{len(prompt)}{t}{version}", "example_id": "e", "response_source": "student_rollout",
            "prompt_ids": np.array(prompt), "response_ids": np.array(response), "topk_ids": top.indices.numpy(),
            "topk_logprobs": top.values.float().numpy(), "tail_logmass": tail.float().numpy(),
            "token_logprob": lp.gather(1, torch.tensor(response)[:, None])[:, 0].float().numpy(),
            "student_logprob": (-torch.rand(t, generator=g, dtype=D) * 3).numpy(),
            "sampling_logprob": (-torch.rand(t, generator=g, dtype=D) * 3).numpy(), "policy_version": version}


@pytest.mark.parametrize("method", ["minillm", "onpolicy_rkl"])
def test_policy_gradient_step_matches_a_dense_float64_reference(method):
    """The batched, chunked step loss = the per-token formula evaluated densely, sequence by sequence, in float64."""
    vocab, k = 48, 4
    g = torch.Generator().manual_seed(5)
    model = _tiny_llama(2, vocab).double()
    records = [_record([1, 5, 7], [9, 11, 2], k, vocab, 0, g), _record([1, 4], [6, 8, 10, 12, 2], k, vocab, 0, g)]
    cfg = OnPolicyConfig(method=method, lm_coef=0.0, clip_eps=0.2)
    attach_advantages(cfg, records)
    batch = collate_rollouts(records, 0, k)
    batch["logprobs"] = batch["logprobs"].double()
    batch["tail_logmass"] = batch["tail_logmass"].double()
    loss, _ = policy_gradient_step(cfg, model, batch, k, None)

    total, n = 0.0, 0
    for r in records:
        seq = torch.tensor([list(r["prompt_ids"]) + list(r["response_ids"])])
        with torch.no_grad():
            logq = torch.log_softmax(model(seq).logits[0].double(), -1)
        p = len(r["prompt_ids"])
        for t, tok in enumerate(r["response_ids"]):
            row = logq[p - 1 + t]
            a = float(r["advantage"][t])
            if method == "minillm":
                rho = math.exp(float(row[tok]) - float(r["sampling_logprob"][t]))
                total += max(-a * rho, -a * min(max(rho, 0.8), 1.2))
                ids = r["topk_ids"][t]
                q = row.exp()
                kl = sum(float(q[j] * (row[j] - float(r["topk_logprobs"][t][i]))) for i, j in enumerate(ids))
                q_rest = 1 - float(q[list(ids)].sum())
                kl += q_rest * (math.log(q_rest) - float(r["tail_logmass"][t]))
                total += kl
            else:
                total += -a * math.exp(float(row[tok]) - float(r["student_logprob"][t]))
            n += 1
    assert float(loss) == pytest.approx(total / n, rel=1e-5, abs=1e-6)


def test_advantages_do_not_depend_on_the_batch_split():
    g = torch.Generator().manual_seed(1)
    records = [_record([1, 2], [3, 4, 5][: 1 + i % 3], 2, 16, 0, g) for i in range(6)]
    cfg = OnPolicyConfig(method="minillm")
    attach_advantages(cfg, records)
    before = [r["advantage"].copy() for r in records]
    attach_advantages(cfg, records[:3] + records[3:])  # same set, same values (computed over the round)
    for a, r in zip(before, records):
        np.testing.assert_array_equal(a, r["advantage"])


def test_stale_rollouts_are_refused_per_batch():
    g = torch.Generator().manual_seed(0)
    fresh = _record([1, 2], [3, 4], 2, 16, 3, g)
    stale = _record([1, 2], [3, 5], 2, 16, 2, g)
    check_policy_version([fresh], 3, "round-3")
    with pytest.raises(StaleRolloutError, match="policy version 2.*round 3"):
        check_policy_version([fresh, stale], 3, "round-3")
    stored = {**stale, "response_source": "teacher_sample"}  # GKD's off-policy rows carry no version: not rollouts
    check_policy_version([fresh, stored], 3, "round-3")


def test_rollout_table_reused_only_for_the_same_policy(tmp_path):
    rows = [{"example_id": "a", "sample_id": "x", "policy_version": 1, "seed": 7, "prompt_ids": [1, 2], "response_ids": [3],
             "student_logprob": [-0.5], "sampling_logprob": [-0.4]}]
    meta = {"policy_version": 1, "policy_hash": "h1", "sampling": {"alpha": 0.2}}
    path = write_rollouts(tmp_path / "rollouts.parquet", rows, meta)
    assert reusable_rollouts(path, meta)[0]["response_ids"] == [3]
    assert reusable_rollouts(path, {**meta, "policy_version": 2}) is None
    assert reusable_rollouts(path, {**meta, "policy_hash": "h2"}) is None
    assert reusable_rollouts(path, {**meta, "sampling": {"alpha": 0.0}}) is None
    assert reusable_rollouts(tmp_path / "missing.parquet", meta) is None


def test_prompt_choice_and_seeds_are_per_round():
    prompts = [{"example_id": f"p{i}"} for i in range(20)]
    a, b = choose_prompts(prompts, 0, 5, 0), choose_prompts(prompts, 1, 5, 0)
    assert len(a) == 5 and a == choose_prompts(prompts, 0, 5, 0) and a != b
    assert rollout_seed(0, 0, "p1") == rollout_seed(0, 0, "p1") != rollout_seed(0, 1, "p1")


def test_config_rejects_tempered_policy_gradient_and_records_the_sampler():
    with pytest.raises(ValueError, match="temperature 1.0"):
        OnPolicyConfig(method="minillm", temperature=0.9)
    assert OnPolicyConfig(method="gkd", temperature=0.9).sampler == "student_vllm"
    assert OnPolicyConfig(method="minillm").sampler == "teacher_mixed_hf"
    assert OnPolicyConfig(method="minillm", teacher_mix="off").sampler == "student_vllm"
    with pytest.raises(ValueError):
        OnPolicyConfig(method="ppo")


def test_fault_plan_kill_points_fire_once_each(tmp_path):
    from pydantic import ValidationError

    from tasks.faults import FaultPlan

    plan = FaultPlan(kill_onpolicy_points=("1:start", "2:rollouts"), kill_marker=str(tmp_path / "kill"))
    assert [plan.kill_round_now(1, "start"), plan.kill_round_now(1, "start")] == [True, False]  # a restarted process
    assert plan.kill_round_now(2, "start") is False and plan.kill_round_now(1, "rollouts") is False
    assert [plan.kill_round_now(2, "rollouts"), plan.kill_round_now(2, "rollouts")] == [True, False]
    with pytest.raises(ValidationError, match="kill_onpolicy_points"):
        FaultPlan(kill_onpolicy_points=("2:update",))
