"""Evaluation: zero-shot and generalized zero-shot metrics, prediction, plots."""
