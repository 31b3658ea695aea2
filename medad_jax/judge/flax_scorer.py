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
  the log-prob of the whole continuation ``{option k's text}</answer>`` after ``<answer>`` (summed over its tokens).
  The option texts are read from the question's ``A. …`` lines. The K continuations of a prompt share its context
  (question + thought, ~100-150 tokens; a continuation is ~5), so the context runs once per prompt and its keys /
  values are the shared ``prefix`` of the K continuation rows (``model/text.py``, the sampler's and the update's
  prompt sharing): one forward of N context rows and one of N x K short rows, instead of N x K full rows.
  ``python -m medad_jax.bench judge`` times it against transformers over the full rows (WORKSPACE "Benchmarks");
  ``tests/test_local_judge.py`` checks the scores against a plain forward of each full row at the whole-model
  tolerance.

Axis letters: N prompts (padded to R rows), T tokens (a bucket), V vocabulary, K letters, C continuation tokens,
P context rows (= prompts, padded), B = P x K continuation rows.
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
def _shared_context_logprobs(graphdef, states, ids_PT, mask_PT, positions_3PT, own_BC, own_mask_BC, own_pos_3BC,
                             score_BC, *, adapters: bool):
  """Each context row ``p`` (left-padded) once, its keys/values the shared prefix of rows ``p*K .. p*K+K-1``, which
  hold the rest of each full row (right-padded ``own_BC``: the context's last token, then the continuation).
  -> ``[B]`` float32: the sum of log p(token c | everything before it) over the own tokens where ``score_BC`` is 1
  (never the first own token: it is predicted inside the context)."""
  model = nnx.merge(graphdef, *states)

  def forward():
    _, prefix = model.model(model.embed(ids_PT), attention_mask_BT=mask_PT, positions_3BT=positions_3PT,
                            return_kv=True)
    h_BCD, _ = model.model(model.embed(own_BC), attention_mask_BT=own_mask_BC, positions_3BT=own_pos_3BC,
                           prefix=prefix)
    return model.logits(h_BCD[:, :-1])  # own position c predicts own token c + 1

  if adapters:
    logits_BCV = forward()
  else:
    with lora_disabled():
      logits_BCV = forward()
  logp_BCV = jax.nn.log_softmax(logits_BCV.astype(jnp.float32), axis=-1)
  tok_BC = jnp.take_along_axis(logp_BCV, own_BC[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(score_BC[:, 1:] > 0, tok_BC, 0.0), axis=-1)


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
    """``'option'`` format: per prompt, the full rows ``policy prompt + option k's text + </answer>`` split into
    the tokens all K rows share (the context row, left-padded as :meth:`encode`: ``ids_NT``, ``mask_NT``,
    ``positions_3NT``) and each row's own rest (row ``n * K + k``: ``own_BC``, ``own_mask_BC``, ``own_pos_3BC``,
    right-padded to a multiple of 8; positions continue the context's), with ``score_BC`` 1 on the continuation's
    tokens -- those ending past the context text (a token straddling the boundary counts with it). The shared part
    stops one token before the shortest context tokenisation, so every scored token is predicted by an own token.

    A prompt whose question has no ``A. …`` option lines raises ``ValueError``; a letter beyond the question's
    options gets a row of its own with an empty continuation, scored ``-inf`` by :meth:`__call__`."""
    from medad_jax.judge.prompt import parse_options
    from medad_jax.rewards import ANSWER_CLOSE
    K = len(letters)
    shared, owns, conts = [], [], []
    for i, p in enumerate(prompts):
      parts = split_judge_prompt(p)
      options = parse_options(parts[0]) if parts is not None else None
      if options is None:
        raise ValueError(f"FlaxLetterScorer(answer_format='option'): prompt {i} has no question with 'A. ...' "
                         f'option lines to score: {p[:120]!r}')
      context = policy_prompt(*parts)
      full, n_ctx = [], []
      for k in range(K):
        if k >= len(options):
          full.append(self.tokenizer.encode(context, add_special_tokens=False))
          n_ctx.append(len(full[-1]))
          conts.append(0)
          continue
        enc = self.tokenizer(context + options[k].strip() + ANSWER_CLOSE, add_special_tokens=False,
                             return_offsets_mapping=True)
        full.append(list(enc['input_ids']))
        n_ctx.append(sum(1 for _, end in enc['offset_mapping'] if end <= len(context)))
        conts.append(len(full[-1]) - n_ctx[-1])
      s = min(n_ctx)
      while s > 0 and any(f[:s] != full[0][:s] for f in full[1:]):  # a BPE merge across the context's end
        s -= 1
      s -= 1  # the last shared token goes with each row, to predict the continuation's first token
      if s < 1:
        raise ValueError(f'FlaxLetterScorer: prompt {i} shares fewer than 2 tokens across its options: {p[:120]!r}')
      shared.append(full[0][:s])
      owns += [f[s:] for f in full]
    out = self._pad(shared)
    P = out['ids_NT'].shape[0]
    C = max(8, -(-max(len(o) for o in owns) // 8) * 8)  # a multiple of 8: few compiled shapes
    own = np.full((P * K, C), self.cfg.pad_token_id, np.int32)
    own_mask = np.zeros((P * K, C), np.int32)
    own_mask[:, 0] = 1  # padding prompts' rows hold one pad token, so no row is empty
    score = np.zeros((P * K, C), np.int32)
    ctx_len = out['mask_NT'].sum(1)
    for b, (o, c) in enumerate(zip(owns, conts)):
      own[b, :len(o)], own_mask[b, :len(o)] = o, 1
      score[b, len(o) - c:len(o)] = 1
    pos = ctx_len[np.arange(P * K) // K, None] + np.arange(C)[None]  # text tokens: the same t / h / w position
    out.update(own_BC=own, own_mask_BC=own_mask, own_pos_3BC=np.broadcast_to(pos, (3, P * K, C)).astype(np.int32),
               score_BC=score, has_option=np.asarray(conts, np.int32) > 0)
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
      out = _shared_context_logprobs(self.graphdef, tuple(self.weights()), enc['ids_NT'], enc['mask_NT'],
                                     enc['positions_3NT'], enc['own_BC'], enc['own_mask_BC'], enc['own_pos_3BC'],
                                     enc['score_BC'], adapters=self.adapters)
      N, K = len(prompts), len(letters)
      scores = np.asarray(out, np.float32)[:N * K]
      return np.where(enc['has_option'], scores, -np.inf).reshape(N, K)
    enc = self.encode(prompts)
    out = _letter_logprobs(self.graphdef, tuple(self.weights()), enc['ids_NT'], enc['mask_NT'], enc['positions_3NT'],
                           self.letter_ids(letters), adapters=self.adapters)
    return np.asarray(out)[:len(prompts)]
