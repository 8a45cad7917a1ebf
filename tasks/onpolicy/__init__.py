"""On-policy distillation: MiniLLM, GKD and sampled-token reverse KL as resumable rollout -> scoring -> update rounds."""
