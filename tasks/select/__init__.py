"""Uncertainty-driven selection: score prompts by the student's own uncertainty, pick the top fraction for the teacher.

`scores` (numpy, from top-k log-probs), `selection` (the choice and its files),
`stage` (the vLLM student pass and `run_selection`). Method and file format:
the module docstrings; the per-example KD weights live in tasks/objectives/weighting.py.
"""
