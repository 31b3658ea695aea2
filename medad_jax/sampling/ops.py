"""Sampling math on plain logits: settings, filtering (temperature, top-k, top-p), draws, log-probs, stop checks.

Axis legend (shared by every file of ``medad_jax/sampling``):
  B rows (samples: B = P x G)     P prompts            G samples per prompt     T prompt length (a bucket)
  N max new tokens (completion slots)                  V vocabulary             D model width
  K key/value heads               J query heads per KV head                     H head dim
  I images                        L patches per image (a bucket)                C patch vector (C*Tp*p*p)
  M stop-pattern window (longest pattern)              Q stop strings           A stop-automaton states
  U vocabulary blocks, W tokens per block (the two-level draw / argmax: V = U * W after padding)

Everything here is a small pure function of arrays and a static :class:`SamplingConfig`, usable inside ``jit``.

Filtering follows transformers' warper order (temperature, then top-k, then top-p on the top-k-renormalised
distribution). Excluded tokens get ``-inf``: zero mass, so the inverse-CDF draw (:func:`categorical`) never picks
them.
Ties: top-k keeps every token whose logit equals the k-th largest (as transformers' ``TopKLogitsWarper``); top-p
keeps the smallest set of most likely tokens whose mass reaches ``top_p`` plus any token tied with its least likely
member. A token is therefore excluded only when its logit is strictly below the kept threshold.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Codes of ``finish_reason``; ``FINISH_REASONS[code]`` is the name.
FINISH_LENGTH, FINISH_STOP_TOKEN, FINISH_STOP_SEQUENCE, FINISH_MASKED, FINISH_STOP_STRING = 0, 1, 2, 3, 4
FINISH_REASONS = ('length', 'stop_token', 'stop_sequence', 'masked', 'stop_string')


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling settings (hashable: a change recompiles, a new batch does not).

  Attributes:
    max_new_tokens: completion budget ``N`` (the stop token, if any, counts and is kept in the completion).
    temperature: > 0; logits are divided by it before top-k / top-p.
    top_k: keep the ``top_k`` most likely tokens (0 = off).
    top_p: nucleus mass in (0, 1] (1.0 = off).
    greedy: argmax of the unmodified logits (temperature / top-k / top-p ignored; sampling log-prob 0).
    stop_token_ids: a row finishes when it emits one of these (e.g. ``<|im_end|>``, ``<|endoftext|>``).
    stop_sequences: token patterns; a row finishes when its last sampled tokens match one of them. A pattern is a
      sequence whose items are a token id or a tuple of alternative ids. Matching is on the completion only, on
      device. For stop *strings* (any tokenisation) use the string automata of ``stops.py`` instead.
  """

  max_new_tokens: int = 256
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  stop_token_ids: tuple[int, ...] = ()
  stop_sequences: tuple[tuple[tuple[int, ...], ...], ...] = ()

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f'SamplingConfig.max_new_tokens={self.max_new_tokens}: expected >= 1')
    if not self.greedy and not self.temperature > 0:
      raise ValueError(f'SamplingConfig.temperature={self.temperature}: expected > 0 (use greedy=True for argmax)')
    if self.top_k < 0:
      raise ValueError(f'SamplingConfig.top_k={self.top_k}: expected >= 0 (0 = off)')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'SamplingConfig.top_p={self.top_p}: expected a value in (0, 1] (1 = off)')
    # Normalise to tuples of ints so equal settings hash equal (lists would not hash at all).
    object.__setattr__(self, 'stop_token_ids', tuple(int(t) for t in self.stop_token_ids))
    seqs = tuple(tuple(_alternatives(x, f'stop_sequences[{i}][{j}]') for j, x in enumerate(s))
                 for i, s in enumerate(self.stop_sequences))
    empty = [i for i, s in enumerate(seqs) if not s]
    if empty:
      raise ValueError(f'SamplingConfig.stop_sequences[{empty[0]}] is empty; expected at least one token id')
    object.__setattr__(self, 'stop_sequences', seqs)

  @property
  def is_plain(self) -> bool:
    """Sampling from the unmodified policy (temperature 1, no top-k / top-p, not greedy)."""
    return not self.greedy and self.temperature == 1.0 and self.top_k == 0 and self.top_p >= 1.0

  @property
  def stop_window(self) -> int:
    """``M``: how many trailing tokens the stop-sequence check needs (at least 1, to keep shapes non-empty)."""
    return max([1] + [len(s) for s in self.stop_sequences])


def _alternatives(x, where: str) -> tuple[int, ...]:
  """A stop-pattern item (an id or several) -> a sorted tuple of distinct ids."""
  ids = tuple(sorted({int(t) for t in x})) if isinstance(x, (tuple, list, set, frozenset)) else (int(x),)
  if not ids or min(ids) < 0:
    raise ValueError(f'SamplingConfig.{where} = {x!r}: expected a token id >= 0 or a non-empty tuple of them')
  return ids


def top_k_filter(logits_BV: jax.Array, k: int) -> jax.Array:
  """Logits below the ``k``-th largest of their row -> ``-inf`` (``k`` = 0 or >= V: unchanged)."""
  if k <= 0 or k >= logits_BV.shape[-1]:
    return logits_BV
  kth_B1 = jax.lax.top_k(logits_BV, k)[0][..., -1:]
  return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_filter(logits_BV: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: keep the most likely tokens until their mass reaches ``p``; the rest -> ``-inf``.

  A token is kept when the probability mass of the strictly more likely tokens (in sorted order) is ``< p``; the
  most likely token is always kept.
  """
  if p >= 1.0:
    return logits_BV
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  n_keep_B1 = jnp.maximum(jnp.sum(mass_before_BV < p, axis=-1, keepdims=True), 1)
  threshold_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
  return jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)


def sampling_logits(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """The logits of the distribution actually sampled from (float32): ``/T``, then top-k, then top-p."""
  x = logits_BV.astype(jnp.float32)
  if cfg.greedy:
    return x
  if cfg.temperature != 1.0:
    x = x / cfg.temperature
  x = top_k_filter(x, cfg.top_k)
  return top_p_filter(x, cfg.top_p)


def _pick(x_BV: jax.Array, tokens_B: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x_BV, tokens_B[:, None].astype(jnp.int32), axis=-1)[:, 0].astype(jnp.float32)


def token_logprob(logits_BV: jax.Array, tokens_B: jax.Array) -> jax.Array:
  """``log_softmax(logits)[token]`` per row, float32 (``logit[token] - logsumexp``: no ``[B, V]`` output)."""
  x_BV = logits_BV.astype(jnp.float32)
  m_B = jnp.max(x_BV, axis=-1)
  return _pick(x_BV, tokens_B) - m_B - jnp.log(jnp.sum(jnp.exp(x_BV - m_B[:, None]), axis=-1))


def _cdf_block(V: int) -> tuple[int, int]:
  """(block size, padded V) for the two-level cumulative sum: a divisor of V near sqrt(V) when there is one."""
  divisors = [d for d in range(1, min(V, 4096) + 1) if V % d == 0 and d * d <= 4 * V]
  if divisors[-1] >= 32 or V <= 1024:
    return divisors[-1], V
  block = 256  # V has no useful divisor: pad it
  return block, -(-V // block) * block


def categorical(u_B2: jax.Array, logits_BV: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inverse-CDF draw in two levels -> ``(tokens_B int32, logsumexp_B)``.

  ``u_B2``: two uniforms in ``(0, 1]`` per row. The first picks a block of the vocabulary with probability its
  softmax mass (the first block whose cumulative mass reaches ``u * total``), the second a token inside that block
  the same way; the product of the two is exactly the token's probability, and each level resolves its uniform's
  2^-24 steps separately, so even ~1e-9-probability tokens are drawn at the right rate. Tokens with ``-inf``
  logits have zero mass and are never returned. One pass for the block totals and one small block: for 64 rows of
  Qwen2.5's 151,936 tokens this costs on a CPU about a twentieth of a Gumbel-max draw over the vocabulary. The
  log-normaliser comes for free (token log-prob = ``logit - logsumexp``).
  """
  B, V = logits_BV.shape
  block, Vp = _cdf_block(V)
  nb = Vp // block
  x_BV = logits_BV.astype(jnp.float32)
  m_B = jnp.max(x_BV, axis=-1)
  if Vp != V:
    x_BV = jnp.pad(x_BV, ((0, 0), (0, Vp - V)), constant_values=-jnp.inf)
  x_BUW = x_BV.reshape(B, nb, block)  # U blocks of W tokens
  cum_BU = jnp.cumsum(jnp.sum(jnp.exp(x_BUW - m_B[:, None, None]), axis=-1), axis=-1)
  total_B = cum_BU[:, -1]
  j_B = jnp.minimum(jnp.sum(cum_BU < (u_B2[:, 0] * total_B)[:, None], axis=-1), nb - 1)
  p_BW = jnp.exp(jnp.take_along_axis(x_BUW, j_B[:, None, None], axis=1)[:, 0] - m_B[:, None])
  cum_BW = jnp.cumsum(p_BW, axis=-1)
  target_B = u_B2[:, 1] * cum_BW[:, -1]
  k_B = jnp.minimum(jnp.sum(cum_BW < target_B[:, None], axis=-1), block - 1)  # u <= 1: inside the block
  # A block is only chosen when its mass is > 0. Should u * mass underflow to 0 (a block of ~1e-38 mass), take
  # its first token with mass rather than possibly a zero-mass one.
  k_B = jnp.where(target_B > 0, k_B, jnp.argmax(p_BW > 0, axis=-1))
  return (j_B * block + k_B).astype(jnp.int32), m_B + jnp.log(total_B)


def argmax(logits_BV: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(argmax_B int32, max_B)``, the first maximal token on ties (as ``jnp.argmax``).

  Two levels (block maxima, then one block) because XLA:CPU's variadic argmax reduce is slow over a large
  vocabulary (~20x slower than this for 64 x 151,936 logits).
  """
  B, V = logits_BV.shape
  block, Vp = _cdf_block(V)
  x_BV = logits_BV.astype(jnp.float32)
  if Vp != V:
    x_BV = jnp.pad(x_BV, ((0, 0), (0, Vp - V)), constant_values=-jnp.inf)
  x_BUW = x_BV.reshape(B, Vp // block, block)
  bmax_BU = jnp.max(x_BUW, axis=-1)
  j_B = jnp.argmax(bmax_BU, axis=-1)
  k_B = jnp.argmax(jnp.take_along_axis(x_BUW, j_B[:, None, None], axis=1)[:, 0], axis=-1)
  return (j_B * block + k_B).astype(jnp.int32), jnp.max(bmax_BU, axis=-1)


def uniform_open_closed(keys_B: jax.Array) -> jax.Array:
  """Two float32 uniforms in ``(0, 1]`` per row key: ``[B, 2]``."""
  return 1.0 - jax.vmap(lambda k: jax.random.uniform(k, (2,), jnp.float32))(keys_B)


def draw(keys_B: jax.Array, logits_BV: jax.Array, cfg: SamplingConfig
         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One token per row -> ``(tokens_B int32, policy_logp_B, sampling_logp_B)``.

  ``keys_B`` are per-row PRNG keys, so a row's draw does not depend on which other rows share the batch.
  ``policy_logp`` is under the unmodified policy (temperature 1, no top-k/p): the old-policy log-prob of GRPO;
  ``sampling_logp`` is under the distribution drawn from (0 for greedy, a point mass).
  """
  if cfg.greedy:
    tokens_B, m_B = argmax(logits_BV)
    x_BV = logits_BV.astype(jnp.float32)
    lse_B = m_B + jnp.log(jnp.sum(jnp.exp(x_BV - m_B[:, None]), axis=-1))
    return tokens_B, m_B - lse_B, jnp.zeros(tokens_B.shape, jnp.float32)
  filt_BV = sampling_logits(logits_BV, cfg)
  tokens_B, lse_B = categorical(uniform_open_closed(keys_B), filt_BV)
  slp_B = _pick(filt_BV, tokens_B) - lse_B
  plp_B = slp_B if cfg.is_plain else token_logprob(logits_BV, tokens_B)
  return tokens_B, plp_B, slp_B


def row_keys(key: jax.Array, row_ids_B: jax.Array) -> jax.Array:
  """Per-row keys ``fold_in(key, row_id)``: row ``b*G + g`` gets the same key however the batch is laid out."""
  return jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids_B)


def step_keys(keys_B: jax.Array, step: jax.Array) -> jax.Array:
  """The keys of decode step ``step`` (``fold_in`` of each row key)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_B)


def push_tail(tail_BM: jax.Array, tokens_B: jax.Array) -> jax.Array:
  """Shifts the window of each row's last ``M`` sampled tokens left by one and appends ``tokens_B``."""
  return jnp.concatenate([tail_BM[:, 1:], tokens_B[:, None].astype(tail_BM.dtype)], axis=1)


def stop_sequence_hit(tail_BM: jax.Array, stop_sequences: tuple[tuple[tuple[int, ...], ...], ...]) -> jax.Array:
  """``[B]`` bool: the row's last ``len(s)`` tokens match some stop pattern ``s`` (each position a set of ids;
  unrolled over the static patterns).

  Unfilled window slots hold -1, which matches no token id, so a pattern longer than the completion so far cannot
  match.
  """
  M = tail_BM.shape[1]
  hit_B = jnp.zeros(tail_BM.shape[:1], bool)
  for seq in stop_sequences:
    if len(seq) > M:
      raise ValueError(f'stop sequence {seq} is longer than the stop window M={M}')
    match_B = jnp.ones(tail_BM.shape[:1], bool)
    for j, alts in enumerate(seq):
      tok_B = tail_BM[:, M - len(seq) + j]
      match_B &= (tok_B == alts[0]) if len(alts) == 1 else jnp.isin(tok_B, jnp.asarray(alts, tail_BM.dtype))
    hit_B |= match_B
  return hit_B


def is_stop_token(tokens_B: jax.Array, stop_token_ids: tuple[int, ...]) -> jax.Array:
  """``[B]`` bool: the token is one of ``stop_token_ids``."""
  if not stop_token_ids:
    return jnp.zeros(tokens_B.shape, bool)
  return jnp.isin(tokens_B, jnp.asarray(stop_token_ids, tokens_B.dtype))
