"""GRPO / Con-GRPO math as small pure ``jnp`` functions (no model, no optimiser, no host code).

Axis legend:
  B sequences (rollouts; B = P * G when grouped)   P prompts (groups)   G rollouts per prompt (group size)
  T token positions (prompt + completion)          V vocabulary

Conventions shared by every function here:

* Per-token arrays are aligned with the *token* they score: ``logp_BT[b, t] = log pi(x[b, t] | x[b, <t])``.
  Position 0 has no prediction and is always 0 (see :func:`token_logprobs`).
* ``mask_BT`` is 1.0 for the tokens that enter a loss (the sampled completion, or the SFT targets) and 0.0
  elsewhere (prompt, image and padding tokens). Masked positions contribute exactly nothing: every reduction
  multiplies by the mask with ``jnp.where`` (so even inf/NaN garbage there cannot leak into the result).
* Losses are to be *minimised*: the GRPO objective of Eq. 8 enters with a minus sign.

The Con-GRPO objective (paper Eq. 8), per completion token ``t`` of rollout ``i``::

    ratio_t   = exp(logp_t - logp_denominator_t)         # denominator: pi_old (GRPO) or pi_SFT (Eq. 8)
    pg_t      = -min(ratio_t * A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_i)
    kl_t      = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   # k3 estimator of KL(pi_theta || pi_ref) >= 0
    loss      = aggregate(pg_t + beta * kl_t, mask, mode)
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

AggregationMode = Literal['seq_mean_token_mean', 'token_mean', 'token_sum']
AGGREGATION_MODES: tuple[str, ...] = ('seq_mean_token_mean', 'token_mean', 'token_sum')


def _masked(x: jax.Array, mask: jax.Array) -> jax.Array:
  """``x * mask`` that is exactly 0 where ``mask == 0`` even when ``x`` is inf or NaN there."""
  return jnp.where(mask > 0, x * mask, 0.0)


# ----------------------------------------------------------------------------------------- advantages


def group_advantages(rewards_PG: jax.Array, *, std_norm: bool = False, eps: float = 1e-6) -> jax.Array:
  """Group-relative advantages ``A_i = R_i - mean_group(R)`` (Eq. 7); ``/ (std_group(R) + eps)`` if ``std_norm``.

  ``rewards_PG``: one row per prompt, its G rollouts' scalar rewards. Returns ``adv_PG`` (float32). The std is
  the population std (``ddof=0``); a group with equal rewards gets advantage 0 either way.
  """
  r = rewards_PG.astype(jnp.float32)
  adv = r - jnp.mean(r, axis=-1, keepdims=True)
  if std_norm:
    adv = adv / (jnp.std(r, axis=-1, keepdims=True) + eps)
  return adv


def zero_variance_groups(rewards_PG: jax.Array, *, atol: float = 0.0) -> jax.Array:
  """``[P]`` bool: True where all G rewards of the group are equal (within ``atol``): no learning signal."""
  r = rewards_PG.astype(jnp.float32)
  return (jnp.max(r, axis=-1) - jnp.min(r, axis=-1)) <= atol


# -------------------------------------------------------------------------------------- token log-probs


def selected_logprobs(logits_BNV: jax.Array, ids_BN: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """``log softmax(logits[b, n] / temperature)[ids[b, n]]`` (no shift: logits already aligned with the ids).

  Computed in float32 as ``logit[id] - logsumexp(logits)``, so no ``[B, N, V]`` log-softmax is materialised.
  """
  logits = logits_BNV.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  picked = jnp.take_along_axis(logits, ids_BN[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy(logits_BNV: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """Entropy ``[B, N]`` (nats) of ``softmax(logits / temperature)`` at every position (no shift)."""
  logits = logits_BNV.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  logz = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - logz)
  return logz[..., 0] - jnp.sum(p * logits, axis=-1)


def token_logprobs(logits_BTV: jax.Array, ids_BT: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """``logp_BT[b, t] = log softmax(logits[b, t-1] / temperature)[ids[b, t]]``; ``logp_BT[:, 0] = 0``."""
  logp = selected_logprobs(logits_BTV[:, :-1], ids_BT[:, 1:], temperature=temperature)
  return jnp.pad(logp, ((0, 0), (1, 0)))


def entropy_from_logits(logits_BTV: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """``ent_BT[b, t]`` = entropy of the distribution that predicts token ``t`` (from logits ``t-1``); ``[:, 0] = 0``."""
  return jnp.pad(entropy(logits_BTV[:, :-1], temperature=temperature), ((0, 0), (1, 0)))


# ------------------------------------------------------------------------------------ policy-gradient term


def clipped_surrogate(logp_BT: jax.Array, old_logp_BT: jax.Array, adv_B: jax.Array, *, eps_low: float,
                      eps_high: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO/GRPO clipped surrogate, per token, to minimise: ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)``.

  ``old_logp_BT`` is the ratio's denominator (treated as a constant). ``adv_B`` is one advantage per sequence
  (broadcast over its tokens). Returns ``(pg_loss_BT, aux)`` with per-token ``aux``:

  * ``ratio``: ``exp(logp - old_logp)``;
  * ``clipped_low``: the lower bound binds (``A < 0`` and ``r < 1 - eps_low``): the gradient is zero there;
  * ``clipped_high``: the upper bound binds (``A > 0`` and ``r > 1 + eps_high``): the gradient is zero there.
  """
  ratio = jnp.exp(logp_BT - jax.lax.stop_gradient(old_logp_BT))
  adv = adv_B.astype(jnp.float32)[:, None]
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
  pg = -jnp.minimum(unclipped, clipped)
  aux = {'ratio': ratio,
         'clipped_low': (adv < 0) & (ratio < 1.0 - eps_low),
         'clipped_high': (adv > 0) & (ratio > 1.0 + eps_high)}
  return pg, aux


def k3_kl(logp_BT: jax.Array, ref_logp_BT: jax.Array) -> jax.Array:
  """Per-token k3 estimator of ``KL(pi_theta || pi_ref)``: ``exp(d) - d - 1`` with ``d = ref - logp`` (>= 0).

  Unbiased for samples drawn from ``pi_theta``, always non-negative, exactly 0 where the two agree. ``ref`` is a
  constant (no gradient flows into the reference).
  """
  d = jax.lax.stop_gradient(ref_logp_BT) - logp_BT
  return jnp.exp(d) - d - 1.0


# ------------------------------------------------------------------------------------------- aggregation


def aggregate_parts(per_token_BT: jax.Array, mask_BT: jax.Array, mode: AggregationMode
                    ) -> tuple[jax.Array, jax.Array]:
  """``(numerator, denominator)`` with ``aggregate = numerator / max(denominator, 1)``.

  Split so that gradient accumulation can sum numerators over microbatches and divide by the whole batch's
  denominator (which depends on the masks only). For ``seq_mean_token_mean`` the numerator is the sum of the
  per-sequence token means and the denominator the number of non-empty sequences; for ``token_mean`` the token sum
  and the token count; for ``token_sum`` the token sum and 1.
  """
  m = mask_BT.astype(jnp.float32)
  x = _masked(per_token_BT.astype(jnp.float32), m)
  if mode == 'seq_mean_token_mean':
    n_B = jnp.sum(m, axis=-1)
    has = (n_B > 0).astype(jnp.float32)
    return jnp.sum(jnp.sum(x, axis=-1) / jnp.maximum(n_B, 1.0) * has), jnp.sum(has)
  if mode == 'token_mean':
    return jnp.sum(x), jnp.sum(m)
  if mode == 'token_sum':
    return jnp.sum(x), jnp.ones((), jnp.float32)
  raise ValueError(f'unknown aggregation mode {mode!r}; expected one of {AGGREGATION_MODES}')


def aggregate(per_token_BT: jax.Array, mask_BT: jax.Array, mode: AggregationMode) -> jax.Array:
  """Reduces a per-token quantity over the masked tokens to a scalar.

  * ``seq_mean_token_mean`` (GRPO): mean over tokens within each sequence, then mean over the sequences that
    have at least one token (``1/|{i}| sum_i 1/|o_i| sum_t``): every rollout weighs the same.
  * ``token_mean``: mean over all masked tokens of the batch: every token weighs the same (DAPO).
  * ``token_sum``: plain sum over all masked tokens (its scale grows with batch and length; AdamW is invariant to
    the loss scale but global-norm clipping is not).
  """
  num, den = aggregate_parts(per_token_BT, mask_BT, mode)
  return num / jnp.maximum(den, 1.0)


def masked_mean(x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """Mean of ``x`` over the masked tokens (0 if there are none)."""
  m = mask_BT.astype(jnp.float32)
  return jnp.sum(_masked(x_BT.astype(jnp.float32), m)) / jnp.maximum(jnp.sum(m), 1.0)


def masked_min_max(x_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Min and max of ``x`` over the masked tokens (``(0, 0)`` if there are none)."""
  on = mask_BT > 0
  any_ = jnp.any(on)
  lo = jnp.min(jnp.where(on, x_BT, jnp.inf))
  hi = jnp.max(jnp.where(on, x_BT, -jnp.inf))
  return jnp.where(any_, lo, 0.0), jnp.where(any_, hi, 0.0)


# ---------------------------------------------------------------------------------------------- SFT (Eq. 1)


def sft_nll(logits_BTV: jax.Array, ids_BT: jax.Array, loss_mask_BT: jax.Array,
            mode: AggregationMode = 'token_mean') -> tuple[jax.Array, jax.Array]:
  """Negative log-likelihood of the masked target tokens (Eq. 1, normalised by ``mode``).

  ``loss_mask_BT[b, t] = 1`` marks token ``t`` as a target (an assistant token); prompt, image and padding tokens
  are 0. Returns ``(loss, nll_BT)``.
  """
  nll_BT = -token_logprobs(logits_BTV, ids_BT)
  return aggregate(nll_BT, first_token_unscored(loss_mask_BT), mode), nll_BT


def first_token_unscored(mask_BT: jax.Array) -> jax.Array:
  """The mask with position 0 cleared: the first token has no prediction, so it can never be a target."""
  return mask_BT.at[:, 0].set(0)
