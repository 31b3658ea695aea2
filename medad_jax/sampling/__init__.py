"""The compiled rollout sampler for Con-GRPO groups (see ``sampler.py`` for the design, ``generate.py`` for the
notebook entry point)."""

from medad_jax.sampling.generate import Generations, generate
from medad_jax.sampling.ops import FINISH_REASONS, SamplingConfig
from medad_jax.sampling.prompts import PromptBatch, prepare_prompts
from medad_jax.sampling.sampler import Rollout, decode, prefill, sample, trace_counts

__all__ = ['FINISH_REASONS', 'Generations', 'PromptBatch', 'Rollout', 'SamplingConfig', 'decode', 'generate',
           'prefill', 'prepare_prompts', 'sample', 'trace_counts']
