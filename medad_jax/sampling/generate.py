"""Notebook entry point: ``generate(policy, images, questions, num_samples=8)`` -> decoded texts + rollout arrays.

    from medad_jax.api import Policy
    from medad_jax.sampling.generate import generate
    policy = Policy.from_pretrained('/path/to/Qwen2.5-VL-3B-Instruct')
    out = generate(policy, [img1, img2], ['Is there an anomaly?', 'Where is the lesion?'], num_samples=8)
    out.texts[0][3]           # sample 3 of prompt 0
    out.policy_logprobs       # [P*G, N] old-policy log-probs for GRPO (0 where completion_mask is False)

Axis letters: see ``ops.py``. The core sampler is token-level (:func:`medad_jax.sampling.sampler.sample`); this
module adds the processor (chat template, image patches), stop *strings* and decoding.

Stop strings (default ``</answer>``) are matched on the completion's *text*, in whatever tokens the policy
spells them, by per-row automata on device (``stops.py``); a stopped completion ends with the token that
completes the string.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from medad_jax.sampling import ops, stops
from medad_jax.sampling.prompts import DEFAULT_LENGTH_BUCKETS, DEFAULT_PATCH_BUCKETS, PromptBatch, prepare_prompts
from medad_jax.sampling.sampler import sample


@dataclasses.dataclass(frozen=True)
class Generations:
  """Host-side results for ``P`` prompts x ``G`` samples (row ``p*G + g``); arrays are numpy."""

  texts: list[list[str]]            # [P][G] decoded completions (special tokens dropped)
  tokens: np.ndarray                # [B, N] int32 (pad after the end)
  completion_mask: np.ndarray       # [B, N] bool
  lengths: np.ndarray               # [B] int32
  finish_reasons: list[str]         # [B] ops.FINISH_REASONS names
  policy_logprobs: np.ndarray       # [B, N] float32 under the unmodified policy
  sampling_logprobs: np.ndarray     # [B, N] float32 under the sampling distribution
  prompt_index: np.ndarray          # [B] int32
  prompts: PromptBatch              # the bucketed prompt batch (for a teacher-forced pass over prompt + completion)


def _resolve(policy, processor):
  """(model, processor) from a ``medad_jax.api.Policy``-like object or a bare model + ``processor``."""
  model = getattr(policy, 'model', None)
  if model is not None and hasattr(policy, 'processor'):
    return model, processor or policy.processor
  if processor is None:
    raise ValueError('generate(policy=<model>, ...) needs processor= (a medad_jax.processor.Qwen25VLProcessor); '
                     'or pass a medad_jax.api.Policy, which carries one')
  return policy, processor


def generate(policy, images: Sequence[Any], questions: Sequence[str], num_samples: int = 8, *,
             processor=None, key: jax.Array | None = None, seed: int = 0, max_new_tokens: int = 256,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             stop_strings: Sequence[str] = ('</answer>',), stop_token_ids: Sequence[int] | None = None,
             adapters: bool = True, mesh=None, length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
             patch_buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS, num_prompts: int | None = None) -> Generations:
  """``num_samples`` answers for each ``(image, question)``: texts, tokens, masks and log-probs.

  Args:
    policy: a ``medad_jax.api.Policy`` (model + processor) or a ``Qwen25VL`` model with ``processor=``.
    images, questions: one image (PIL, array or path) per question.
    num_samples: ``G``; Con-GRPO uses 8.
    key / seed: PRNG key (default ``jax.random.key(seed)``).
    stop_strings: each ends a sample once its text appears in the completion (see the module docstring).
    stop_token_ids: end-of-turn ids (default: the model config's ``eos_token_ids``).
    Other arguments: see :class:`~medad_jax.sampling.ops.SamplingConfig` and :func:`prepare_prompts`.
  """
  model, processor = _resolve(policy, processor)
  cfg = model.cfg
  if len(images) != len(questions):
    raise ValueError(f'got {len(images)} images and {len(questions)} questions; expected one image per question')
  if not questions:
    raise ValueError('no questions given')
  examples = []
  for i, (image, question) in enumerate(zip(images, questions)):
    try:
      examples.append(processor(image, question))
    except (ValueError, TypeError, OSError) as e:
      raise ValueError(f'prompt {i}: {e}') from e
  batch = prepare_prompts(cfg, [ex['input_ids'] for ex in examples],
                          pixel_values=np.concatenate([ex['pixel_values'] for ex in examples]),
                          image_grid_thw=np.concatenate([ex['image_grid_thw'] for ex in examples]),
                          length_buckets=length_buckets, patch_buckets=patch_buckets, num_prompts=num_prompts)
  tokenizer = processor.tokenizer
  config = ops.SamplingConfig(
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
      stop_token_ids=tuple(cfg.eos_token_ids if stop_token_ids is None else stop_token_ids))
  table = stops.tokenizer_stop_table(tokenizer, stop_strings, cfg.text.vocab_size)
  r = sample(model, batch, key=jax.random.key(seed) if key is None else key, config=config,
             num_samples=num_samples, adapters=adapters, mesh=mesh, stop_table=table)
  r = jax.device_get(r)
  tokens, lengths = np.asarray(r.tokens_BN), np.asarray(r.lengths_B)
  P = len(questions)
  texts = [[tokenizer.decode(tokens[p * num_samples + g, :lengths[p * num_samples + g]].tolist(),
                             skip_special_tokens=True) for g in range(num_samples)] for p in range(P)]
  return Generations(texts=texts, tokens=tokens, completion_mask=np.asarray(r.completion_mask_BN), lengths=lengths,
                     finish_reasons=r.finish_reasons(), policy_logprobs=np.asarray(r.policy_logprobs_BN),
                     sampling_logprobs=np.asarray(r.sampling_logprobs_BN), prompt_index=np.asarray(r.prompt_index_B),
                     prompts=batch)
