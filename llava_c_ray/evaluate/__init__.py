"""Evaluation: metrics, batched generation on Ray actors, reports and plots."""
