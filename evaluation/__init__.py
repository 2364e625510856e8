"""Benchmark evaluation with lm-evaluation-harness on local task data."""
