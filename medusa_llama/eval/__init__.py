"""Evaluation: held-out prompts, the benchmark and its report, per-head accuracy, the tree optimizer."""
