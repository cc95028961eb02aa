"""Observability: metrics JSONL, Weights & Biases, progress bar, result tables."""
