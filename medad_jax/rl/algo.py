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

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

AggregationMode = Literal['seq_mean_token_mean', 'token_mean', 'token_sum', 'max_len_sum']
AGGREGATION_MODES: tuple[str, ...] = ('seq_mean_token_mean', 'token_mean', 'token_sum', 'max_len_sum')


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
  and the token count; for ``token_sum`` the token sum and 1; for ``max_len_sum`` (Dr. GRPO) the token sum and
  the number of non-empty sequences times the completion width ``N = mask.shape[-1]`` (the generation budget).
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
  if mode == 'max_len_sum':
    has = (jnp.sum(m, axis=-1) > 0).astype(jnp.float32)
    return jnp.sum(x), jnp.sum(has) * m.shape[-1]
  raise ValueError(f'unknown aggregation mode {mode!r}; expected one of {AGGREGATION_MODES}')


def aggregate(per_token_BT: jax.Array, mask_BT: jax.Array, mode: AggregationMode) -> jax.Array:
  """Reduces a per-token quantity over the masked tokens to a scalar.

  * ``seq_mean_token_mean`` (GRPO): mean over tokens within each sequence, then mean over the sequences that
    have at least one token (``1/|{i}| sum_i 1/|o_i| sum_t``): every rollout weighs the same.
  * ``token_mean``: mean over all masked tokens of the batch: every token weighs the same (DAPO).
  * ``token_sum``: plain sum over all masked tokens (its scale grows with batch and length; AdamW is invariant to
    the loss scale but global-norm clipping is not).
  * ``max_len_sum`` (Dr. GRPO, Liu et al. 2025): the token sum divided by a constant, ``|{i}| * N`` with ``N`` the
    completion width (the generation budget): no per-sequence length normalisation, so a long wrong answer is not
    penalised less per token than a short one.
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


# ------------------------------------------------------------------------------------------- GRPO variants
#
# The objectives the public GRPO stacks (TRL, verl, Tunix, EasyDeL) ship as baselines, selected by
# ``GRPOConfig.loss`` / ``rl.loss`` and switched on independently (``rl.overlong_penalty``, ``rl.tis_cap``,
# ``rl.dynamic_sampling``). Each has a hand-computed test in ``tests/test_rl_algo.py``.

LOSSES: tuple[str, ...] = ('grpo', 'gspo', 'dr_grpo')


def sequence_log_ratio(logp_BN: jax.Array, old_logp_BN: jax.Array, mask_BN: jax.Array) -> jax.Array:
  """``[B]`` GSPO's log importance ratio: the mean over the sequence's tokens of ``logp - old_logp`` (the log of
  the geometric mean of the token ratios, ``log s_i = 1/|y_i| sum_t log(pi_theta / pi_old)``); 0 for a sequence
  without tokens. ``old_logp`` is a constant."""
  m = mask_BN.astype(jnp.float32)
  d = _masked(logp_BN - jax.lax.stop_gradient(old_logp_BN), m)
  return jnp.sum(d, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def gspo_surrogate(logp_BN: jax.Array, old_logp_BN: jax.Array, adv_B: jax.Array, mask_BN: jax.Array, *,
                   eps_low: float, eps_high: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GSPO (Zheng et al. 2025): the clipped surrogate on the *sequence* ratio ``s_i`` (:func:`sequence_log_ratio`).

  ``loss_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)``, returned broadcast over the sequence's
  tokens (``[B, N]``) so that ``seq_mean_token_mean`` aggregation gives GSPO's ``1/|{i}| sum_i loss_i`` exactly;
  its gradient is ``-s_i A_i * 1/|y_i| sum_t grad log pi(y_it)`` where the clip does not bind, 0 where it does (the
  whole sequence is clipped at once). ``aux`` as :func:`clipped_surrogate`, per token (the sequence's value).
  """
  log_s_B = sequence_log_ratio(logp_BN, old_logp_BN, mask_BN)
  s_B = jnp.exp(log_s_B)
  adv = adv_B.astype(jnp.float32)
  loss_B = -jnp.minimum(s_B * adv, jnp.clip(s_B, 1.0 - eps_low, 1.0 + eps_high) * adv)
  shape = logp_BN.shape
  bc = lambda x: jnp.broadcast_to(x[:, None], shape)  # noqa: E731
  aux = {'ratio': bc(s_B), 'clipped_low': bc((adv < 0) & (s_B < 1.0 - eps_low)),
         'clipped_high': bc((adv > 0) & (s_B > 1.0 + eps_high))}
  return bc(loss_B), aux


def overlong_penalty(lengths_B: jax.Array, max_len: int, buffer: int, factor: float = 1.0) -> jax.Array:
  """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13), a reward term ``[B]`` (<= 0):

  ``0`` for ``L <= max_len - buffer``; ``factor * (max_len - buffer - L) / buffer`` inside the buffer (linear from 0
  to ``-factor``); ``-factor`` for ``L >= max_len`` (the completion hit the budget: truncated)."""
  if not 0 < buffer <= max_len:
    raise ValueError(f'overlong_penalty: expected 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}')
  L = lengths_B.astype(jnp.float32)
  return factor * jnp.clip((max_len - buffer - L) / buffer, -1.0, 0.0)


def group_centred(x_B: jax.Array, group_size: int) -> jax.Array:
  """``x - mean_group(x)`` for group-contiguous rows: the advantage a reward term ``x`` adds under Eq. 7 (the
  mean-only advantage is linear in the rewards, so adding this to ``A`` equals adding ``x`` to ``R``)."""
  x = x_B.astype(jnp.float32).reshape(-1, group_size)
  return (x - jnp.mean(x, axis=-1, keepdims=True)).reshape(-1)


def tis_weights(old_logp_BN: jax.Array, sampler_logp_BN: jax.Array, cap: float) -> jax.Array:
  """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
  RL training"; verl ``tis_imp_ratio_cap``): per-token ``min(pi_old / pi_sampler, cap)`` with ``pi_old`` from the
  update's numerics and ``pi_sampler`` from the rollout engine's (e.g. bf16); a constant (no gradient)."""
  w = jnp.exp(jax.lax.stop_gradient(old_logp_BN) - jax.lax.stop_gradient(sampler_logp_BN))
  return jnp.minimum(w, cap)


def logp_mismatch(logp_a_BN: jax.Array, logp_b_BN: jax.Array, mask_BN: jax.Array) -> jax.Array:
  """The rollout-update mismatch: mean ``|log p_a - log p_b|`` over the masked tokens (no gradient)."""
  d = jnp.abs(jax.lax.stop_gradient(logp_a_BN) - jax.lax.stop_gradient(logp_b_BN))
  return masked_mean(d, mask_BN)


# --------------------------------------------------------------------- DAPO dynamic sampling (host side)
#
# Not jnp: which prompts to keep depends on host rewards and decides how many more rollouts to draw, so it runs in
# the trainer's Python loop, on the *global* rewards (every host reaches the same decision).


def informative_groups(rewards_PG, atol: float = 0.0):
  """``[P]`` numpy bool: True where the group's rewards are not all equal (the group carries a learning signal)."""
  import numpy as np
  r = np.asarray(rewards_PG, np.float64)
  if r.ndim != 2:
    raise ValueError(f'informative_groups: expected rewards [P, G], got shape {r.shape}')
  return (r.max(axis=1) - r.min(axis=1)) > atol


@dataclasses.dataclass
class RefillResult:
  """What :func:`dynamic_sampling_refill` assembled.

  Attributes:
    groups: exactly ``target`` group payloads (whatever ``draw`` returns per group), informative groups first in
      draw order, then -- only when the cap was reached -- zero-variance groups as filler.
    rewards_PG: their rewards, ``[target, G]``.
    informative: ``[target]`` bool, False for the filler groups.
    drawn: groups drawn in all (``>= target``); ``dropped``: zero-variance groups discarded; ``filler``:
      zero-variance groups kept to hold the batch size; ``surplus``: informative groups beyond ``target`` (a draw
      larger than what was missing) left unused; ``draws``: calls of ``draw`` (1 + refills).
  """
  groups: list
  rewards_PG: 'object'
  informative: 'object'
  drawn: int
  dropped: int
  filler: int
  surplus: int
  draws: int

  def metrics(self, prefix: str = 'dynamic_sampling/') -> dict[str, float]:
    return {f'{prefix}{k}': float(getattr(self, k)) for k in ('drawn', 'dropped', 'filler', 'surplus', 'draws')}


def dynamic_sampling_refill(draw, target: int, *, max_draws: int, atol: float = 0.0) -> RefillResult:
  """DAPO's dynamic sampling: drop the groups whose G rewards are all equal and *refill* with new prompts.

  ``draw(n) -> (groups, rewards_kG)`` samples and scores new prompt groups when ``n`` informative groups are still
  missing: a list of ``k >= 1`` payloads and their ``[k, G]`` rewards. ``k`` may be ``n`` or, for static shapes,
  always the full batch (DAPO draws whole generation batches): informative groups beyond ``target`` are then left
  unused (``surplus``). ``draw`` is called at most ``max_draws`` times (the cap: a policy that solves or fails every
  prompt would otherwise loop forever). Short of ``target`` informative groups at the cap, the batch is completed
  with the earliest zero-variance groups drawn (``filler``), so the update always sees ``target`` groups (static
  shapes: one compiled program); their advantages are 0, so they add only the KL term. ``dropped`` counts every
  zero-variance group not kept.
  """
  import numpy as np
  if target < 1 or max_draws < 1:
    raise ValueError(f'dynamic_sampling_refill: expected target >= 1 and max_draws >= 1, got {target}, {max_draws}')
  keep, keep_r, spare, spare_r = [], [], [], []
  drawn = draws = 0
  while len(keep) < target and draws < max_draws:
    n = target - len(keep)
    groups, r = draw(n)
    r = np.asarray(r, np.float32)
    if not len(groups) or r.ndim != 2 or r.shape[0] != len(groups):
      raise ValueError(f'dynamic_sampling_refill: draw({n}) returned {len(groups)} groups and rewards of shape '
                       f'{r.shape}; expected k >= 1 groups and rewards [k, G]')
    draws += 1
    drawn += len(groups)
    for g, rg, ok in zip(groups, r, informative_groups(r, atol)):
      (keep if ok else spare).append(g)
      (keep_r if ok else spare_r).append(rg)
  surplus = max(0, len(keep) - target)
  keep, keep_r = keep[:target], keep_r[:target]
  filler = max(0, target - len(keep))
  if filler > len(spare):  # only when draw returned fewer groups than were missing, every time
    raise ValueError(f'dynamic_sampling_refill: {drawn} groups drawn in {draws} draws cannot fill {target}')
  groups = keep + spare[:filler]
  rewards = np.stack(keep_r + spare_r[:filler]).astype(np.float32)
  informative = np.array([True] * len(keep) + [False] * filler)
  return RefillResult(groups=groups, rewards_PG=rewards, informative=informative, drawn=drawn,
                      dropped=len(spare) - filler, filler=filler, surplus=surplus, draws=draws)
