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

Answer formats (``answer_format``, the policy's ``data.answer_format``; ``'policy'`` prompts only for ``'option'``):

``'letter'``
  the score of letter k is log p(letter k as the next token).
``'option'``
  the policy was taught to answer with the option *text* (``<answer>Chest</answer>``), so the score of letter k is
  the log-prob of the whole continuation ``{option k's text}</answer>`` after ``<answer>`` (summed over its tokens;
  one teacher-forced forward over the N x K rows). The option texts are read from the question's ``A. …`` lines.

Axis letters: N prompts (padded to R rows), T tokens (a bucket), V vocabulary, K letters, C continuation tokens.
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
ANSWER_FORMATS = ('letter', 'option')
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


@functools.partial(jax.jit, static_argnames=('graphdef', 'adapters'))
def _continuation_logprobs(graphdef, states, ids_NT, mask_NT, positions_3NT, cont_NC, *, adapters: bool):
  """Sum of log p(token) over the last C tokens of each left-padded row where ``cont_NC`` is 1 -> ``[N]`` float32.

  Only the last C positions' logits are computed (the continuation sits at the right end of each row)."""
  model = nnx.merge(graphdef, *states)
  C = cont_NC.shape[1]

  def forward():
    h_NTD, _ = model.model(model.embed(ids_NT), attention_mask_BT=mask_NT, positions_3BT=positions_3NT)
    return model.logits(h_NTD[:, -C - 1:-1])  # position t predicts token t + 1

  if adapters:
    logits_NCV = forward()
  else:
    with lora_disabled():
      logits_NCV = forward()
  logp_NCV = jax.nn.log_softmax(logits_NCV.astype(jnp.float32), axis=-1)
  tok_NC = jnp.take_along_axis(logp_NCV, ids_NT[:, -C:, None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(cont_NC > 0, tok_NC, 0.0), axis=-1)


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
    answer_format: ``'letter'`` or ``'option'`` (with ``prompt_format='policy'`` only).
    buckets: allowed padded lengths; row_multiple: rows are padded to a multiple of it.
  """

  def __init__(self, graphdef, weights: Callable[[], tuple], tokenizer, cfg, *, adapters: bool = False,
               prompt_format: str = 'judge', answer_format: str = 'letter',
               buckets: Sequence[int] = DEFAULT_BUCKETS, row_multiple: int = 8):
    if prompt_format not in PROMPT_FORMATS:
      raise ValueError(f'FlaxLetterScorer: prompt_format={prompt_format!r}; expected one of {PROMPT_FORMATS}')
    if answer_format not in ANSWER_FORMATS:
      raise ValueError(f'FlaxLetterScorer: answer_format={answer_format!r}; expected one of {ANSWER_FORMATS}')
    if answer_format == 'option' and prompt_format != 'policy':
      raise ValueError("FlaxLetterScorer: answer_format='option' scores the policy's own answer block, so it needs "
                       "prompt_format='policy'")
    self.graphdef, self.weights, self.tokenizer, self.cfg = graphdef, weights, tokenizer, cfg
    self.adapters, self.prompt_format, self.answer_format = adapters, prompt_format, answer_format
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
    return self._pad([self.tokenizer.encode(self.render(p), add_special_tokens=False) for p in prompts])

  def encode_options(self, prompts: Sequence[str], letters: Sequence[str]) -> dict[str, np.ndarray]:
    """``'option'`` format: N x K rows ``policy prompt + option text + </answer>`` (row ``n * K + k``), left-padded
    as :meth:`encode`, plus ``cont_NC``: 1 on the last C tokens that belong to the continuation.

    A prompt whose question has no ``A. …`` option lines raises ``ValueError``; a letter beyond the question's
    options gets a row of its own with an empty continuation, scored ``-inf`` by :meth:`__call__`."""
    from medad_jax.judge.prompt import parse_options
    from medad_jax.rewards import ANSWER_CLOSE
    rows, conts = [], []
    for i, p in enumerate(prompts):
      parts = split_judge_prompt(p)
      options = parse_options(parts[0]) if parts is not None else None
      if options is None:
        raise ValueError(f"FlaxLetterScorer(answer_format='option'): prompt {i} has no question with 'A. ...' "
                         f'option lines to score: {p[:120]!r}')
      context = policy_prompt(*parts)
      for k, _ in enumerate(letters):
        if k >= len(options):
          rows.append(self.tokenizer.encode(context, add_special_tokens=False))
          conts.append(0)
          continue
        text = context + options[k].strip() + ANSWER_CLOSE
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        # Tokens ending past the context are the continuation (a token straddling the boundary counts with it).
        n_ctx = sum(1 for _, end in enc['offset_mapping'] if end <= len(context))
        rows.append(list(enc['input_ids']))
        conts.append(len(enc['input_ids']) - n_ctx)
    out = self._pad(rows)
    C = max(8, -(-max(conts) // 8) * 8)  # a multiple of 8: few compiled shapes
    cont = np.zeros((out['ids_NT'].shape[0], C), np.int32)
    for i, c in enumerate(conts):
      if c:
        cont[i, C - c:] = 1
    out['cont_NC'] = cont
    out['has_option'] = np.asarray(conts, np.int32) > 0
    return out

  def _pad(self, rows: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    from medad_jax.model.rope_index import rope_index
    from medad_jax.sampling.prompts import pick_bucket
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
    if self.answer_format == 'option':
      enc = self.encode_options(prompts, letters)
      out = _continuation_logprobs(self.graphdef, tuple(self.weights()), enc['ids_NT'], enc['mask_NT'],
                                   enc['positions_3NT'], enc['cont_NC'], adapters=self.adapters)
      N, K = len(prompts), len(letters)
      scores = np.asarray(out, np.float32)[:N * K]
      return np.where(enc['has_option'], scores, -np.inf).reshape(N, K)
    enc = self.encode(prompts)
    out = _letter_logprobs(self.graphdef, tuple(self.weights()), enc['ids_NT'], enc['mask_NT'], enc['positions_3NT'],
                           self.letter_ids(letters), adapters=self.adapters)
    return np.asarray(out)[:len(prompts)]
