"""Helpers shared by tests and benchmarks: tiny random Hugging Face checkpoints built with transformers."""
