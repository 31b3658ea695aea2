"""medad_jax: MedAD-R1 (SFT + Con-GRPO) for Qwen2.5-VL in JAX/Flax."""

__version__ = '0.1.0'
