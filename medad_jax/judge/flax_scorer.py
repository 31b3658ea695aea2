"""The ``local`` judge's :class:`~medad_jax.judge.local.LetterScorer` backed by our Flax Qwen2.5-VL.

    scorer = FlaxLetterScorer(graphdef, lambda: (state.params, state.frozen), tokenizer, cfg, adapters=False)
    judge = make_judge(JudgeConfig(backend='local'), local_scorer=scorer)

One call = one batched, text-only forward of the prompts (left-padded to a length bucket, rows padded to a
multiple of ``row_multiple``, so a run compiles once per bucket) and a read of the log-probs of the option-letter
tokens at the last position. Weights are fetched through ``weights()`` at every call, because the trainer's state
is donated at every update and the old buffers are gone; the judge is only called between updates.

Prompt formats (``prompt_format``):

``'judge'``
  the rendered judge prompt as :class:`~medad_jax.judge.local.LocalJudge` builds it (system instruction, question,
  reasoning, "reply with one letter", assistant header), tokenised as is. The right format for an
  instruction-tuned checkpoint (Qwen2.5-VL-Instruct or any chat model).

``'policy'``
  the same two inputs -- the question with its options and the thought, nothing else -- written in the policy's
  own SFT format without the image: ``<user>question</user><assistant><think>thought</think><answer>`` and the
  letter as the next token. This is the embedded run's judge: the frozen SFT policy (RL adapters off), which was
  never taught the judge instruction but was taught to close a thought with its answer, so this reads what the
  thought concludes in the policy's own terms. (The question and thought are recovered from the judge prompt with
  ``split_judge_prompt``, so the judge still never sees the model's answer, the ground truth or the image.)

Axis letters: N prompts (padded to R rows), T tokens (a bucket), V vocabulary, K letters.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medad_jax.judge.prompt import split_judge_prompt
from medad_jax.model.layers import lora_disabled

log = logging.getLogger(__name__)

PROMPT_FORMATS = ('judge', 'policy')
DEFAULT_BUCKETS = (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096)


def policy_prompt(question: str, thought: str) -> str:
  """The ``'policy'`` format: the SFT chat without the image, ending in ``<answer>`` (see the module docstring)."""
  from medad_jax.judge.prompt import sanitize
  from medad_jax.processor import render_prompt
  return render_prompt(sanitize(question), num_images=0) + f'<think>{sanitize(thought)}</think><answer>'


@functools.partial(jax.jit, static_argnames=('graphdef', 'adapters'))
def _letter_logprobs(graphdef, states, ids_NT, mask_NT, positions_3NT, letter_ids_K, *, adapters: bool):
  """Log-softmax over the vocabulary at the last position, gathered at the letters -> ``[N, K]`` float32."""
  model = nnx.merge(graphdef, *states)

  def forward():
    h_NTD, _ = model.model(model.embed(ids_NT), attention_mask_BT=mask_NT, positions_3BT=positions_3NT)
    return model.logits(h_NTD[:, -1:])[:, 0]

  if adapters:
    logits_NV = forward()
  else:
    with lora_disabled():
      logits_NV = forward()
  return jnp.take(jax.nn.log_softmax(logits_NV, axis=-1), letter_ids_K, axis=-1)


class FlaxLetterScorer:
  """``(prompts[N], letters[K]) -> [N, K]`` next-token log-probs of the letters (see the module docstring).

  Args:
    graphdef: the model's static graph (``nnx.split`` / ``init_train_state``).
    weights: a callable returning the current states to merge with ``graphdef``: ``(params, frozen)`` of a train
      state, or ``(state,)`` of ``nnx.split(model)``.
    tokenizer: the policy's tokenizer; each letter must be one token.
    cfg: the model config (pad id, for the M-RoPE positions of text-only prompts).
    adapters: False scores with the LoRA adapters switched off (the frozen SFT policy when RL trains adapters).
    prompt_format: ``'judge'`` or ``'policy'``.
    buckets: allowed padded lengths; row_multiple: rows are padded to a multiple of it.
  """

  def __init__(self, graphdef, weights: Callable[[], tuple], tokenizer, cfg, *, adapters: bool = False,
               prompt_format: str = 'judge', buckets: Sequence[int] = DEFAULT_BUCKETS, row_multiple: int = 8):
    if prompt_format not in PROMPT_FORMATS:
      raise ValueError(f'FlaxLetterScorer: prompt_format={prompt_format!r}; expected one of {PROMPT_FORMATS}')
    self.graphdef, self.weights, self.tokenizer, self.cfg = graphdef, weights, tokenizer, cfg
    self.adapters, self.prompt_format = adapters, prompt_format
    self.buckets, self.row_multiple = tuple(sorted(buckets)), row_multiple
    self._letter_ids: dict[tuple[str, ...], np.ndarray] = {}

  def letter_ids(self, letters: Sequence[str]) -> np.ndarray:
    key = tuple(letters)
    if key not in self._letter_ids:
      ids = []
      for c in letters:
        enc = self.tokenizer.encode(c, add_special_tokens=False)
        if len(enc) != 1:
          raise ValueError(f'FlaxLetterScorer: letter {c!r} is {len(enc)} tokens {enc} in this tokenizer; '
                           'a verdict letter must be a single token')
        ids.append(enc[0])
      self._letter_ids[key] = np.asarray(ids, np.int32)
    return self._letter_ids[key]

  def render(self, prompt: str) -> str:
    """The text actually fed to the model for one judge prompt."""
    if self.prompt_format == 'judge':
      return prompt
    parts = split_judge_prompt(prompt)
    if parts is None:
      raise ValueError('FlaxLetterScorer(prompt_format="policy"): not a judge prompt (no Question / Reasoning '
                       f'sections): {prompt[:120]!r}')
    return policy_prompt(*parts)

  def encode(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Left-padded ``ids_NT``, ``mask_NT`` and ``positions_3NT`` (rows padded with one-token dummies)."""
    from medad_jax.model.rope_index import rope_index
    from medad_jax.sampling.prompts import pick_bucket
    rows = [self.tokenizer.encode(self.render(p), add_special_tokens=False) for p in prompts]
    T = pick_bucket(max(len(r) for r in rows), self.buckets, 'judge prompt length (tokens)')
    R = -(-len(rows) // self.row_multiple) * self.row_multiple
    ids = np.full((R, T), self.cfg.pad_token_id, np.int32)
    mask = np.zeros((R, T), np.int32)
    for i, r in enumerate(rows):
      ids[i, T - len(r):] = r
      mask[i, T - len(r):] = 1
    mask[len(rows):, -1] = 1  # padding rows hold one pad token, so no row is empty
    positions, _ = rope_index(self.cfg, ids, mask, None)
    return {'ids_NT': ids, 'mask_NT': mask, 'positions_3NT': positions}

  def __call__(self, prompts: list[str], letters: tuple[str, ...] = ('A', 'B', 'C', 'D')) -> np.ndarray:
    if not prompts:
      return np.zeros((0, len(letters)), np.float32)
    enc = self.encode(prompts)
    out = _letter_logprobs(self.graphdef, tuple(self.weights()), enc['ids_NT'], enc['mask_NT'], enc['positions_3NT'],
                           self.letter_ids(letters), adapters=self.adapters)
    return np.asarray(out)[:len(prompts)]
