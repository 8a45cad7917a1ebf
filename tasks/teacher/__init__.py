"""Teacher stage: vLLM generates or scores responses and records top-k log-probabilities."""
