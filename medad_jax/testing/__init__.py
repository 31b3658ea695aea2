"""Helpers shared by tests and benchmarks: tiny random Hugging Face checkpoints built with transformers, a fake
SGLang server replaying captured exchanges (``fake_server``, its captures shipped as package data in ``fixtures/``)."""
