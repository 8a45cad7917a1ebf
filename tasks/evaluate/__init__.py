"""Evaluation stage: held-out generation and distribution metrics with bootstrap intervals."""
