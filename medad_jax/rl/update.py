"""The jitted training steps: the SFT step (Eq. 1) and the ONE Con-GRPO update (Eq. 7-8).

Axis legend (as in ``algo.py``, plus the model's):
  P prompts   G rollouts per prompt   B = P * G rollouts (row ``p*G + g`` is rollout ``g`` of prompt ``p``)
  T prompt length (a left-padded bucket, or the whole SFT sequence)   N completion length (right-padded)
  S = T + N cache slots   D model width   V vocabulary   L image patches   C patch vector   K microbatches

Why ``jax.jit`` over split state rather than ``nnx.jit``
--------------------------------------------------------
The model is split once (``nnx.split``) into a static ``GraphDef`` (closed over) and plain ``nnx.State`` pytrees
that live in :class:`TrainState`. The step is then an ordinary pure function ``(state, batch) -> (state,
metrics)`` jitted with ``jax.jit``: shardings (``in_shardings`` / ``out_shardings``) and buffer donation are
declared exactly where it is jitted, a call costs no graph traversal of the ~1k-module model (``nnx.jit`` re-walks
the object graph on every call), and the state is a pytree that orbax saves as is. Inside, ``nnx.merge`` rebuilds
the module for the forward pass at trace time only.

State layout (:class:`TrainState`)
----------------------------------
``params`` are the trainable variables (the LoRA adapters by default, ``nnx.LoRAParam``; every ``nnx.Param``
for full fine-tuning); ``frozen`` is everything else (the base weights), passed through unchanged; ``opt_state``
is optax's; ``step`` an int32 scalar; ``rng`` a uint32 PRNG key the trainer derives per-step keys from
(``fold_in(rng, step)``, so a resumed run draws the same keys); ``ref_params`` is a frozen copy of the trainable
parameters at the start of RL and only exists for full fine-tuning (see step 3 below).

The state is donated: after a call the previous state's buffers are gone. Anything built from them (a merged
model handed to the sampler) must be rebuilt from the returned state.

The state, optimiser and placement helpers live in ``state.py`` and are re-exported here.

Con-GRPO update, per call (one jitted program; the trainer calls it mu times on one rollout batch, which reuses
the compiled program because only array values change)
-------------------------------------------------------------------------------------------------------------
1. advantages ``A_i = R_i - mean_group(R)`` (Eq. 7; ``/ std`` optional), zero-variance groups counted and
   optionally dropped;
2. teacher-forced log-probs of the sampled completion tokens under the policy, *with the image*. The prompt is run
   once per prompt (P rows) into a KV cache that is repeated to the G rollouts, exactly as the sampler does, so the
   prompt (image tokens included) costs 1/G of a per-rollout forward, in the backward pass too;
3. reference log-probs under pi_SFT (no gradient): with LoRA, the SFT adapters were merged into the base before
   RL (:func:`prepare_rl_policy`) and the reference is the same forward with the RL adapters switched off
   (``lora_disabled``), so it costs no second copy of the weights; with full fine-tuning it is ``ref_params``;
   a batch may also carry precomputed ``ref_logp_BN``;
4. ratio ``exp(logp - logp_den)``, clipped surrogate with ``eps_low`` / ``eps_high``, k3 KL with ``beta``,
   aggregation (``seq_mean_token_mean`` GRPO default, ``token_mean``, ``token_sum``);
5. gradients of the trainable parameters only, global-norm clipping and AdamW (the optax chain of
   :func:`make_optimizer`), metrics.

Ratio denominator (``GRPOConfig.ratio_to``): ``'old'`` (standard GRPO / PPO) uses the rollout policy's
log-probs ``old_logp_BN`` recorded by the sampler: the ratio starts at 1 for every rollout batch and clipping
limits how far the mu inner steps move from the policy that generated the data. ``'sft'`` follows the paper's
Eq. 8 literally, ``r_t = pi_theta / pi_SFT``: the ratio is measured against the frozen reference, so clipping
bounds the drift from pi_SFT over the whole run (a trust region around the SFT policy, on top of the KL term)
and, once the policy has moved by more than ``eps`` on a token, that token's gradient is cut for good (for
positive advantages above ``1 + eps``; negative below ``1 - eps``).

Microbatching (``num_microbatches`` K > 1): the batch is split into K slices of whole prompt groups, scanned
with ``lax.scan``, and the per-slice numerators are divided by the whole batch's denominators, so the loss and
gradients equal the single-batch ones up to summation order. Image features are then computed once for all
prompts outside the differentiated function, which requires the vision tower and token embedding to be frozen
(true for the default LoRA targets); this is checked when the step is first traced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from medad_jax.model.layers import lora_disabled
from medad_jax.model.qwen25vl import continuation_positions
from medad_jax.rl import algo
# Re-exported so a trainer needs one import (``from medad_jax.rl import update``).
from medad_jax.rl.state import (JittedStep, TrainState, batch_shardings, init_train_state, make_optimizer,  # noqa: F401
                                merge_model, optimizer_from_config, place_state, prepare_rl_policy, put_batch,
                                tree_shardings)

log = logging.getLogger(__name__)

RATIO_TO = ('old', 'sft')


# --------------------------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Static Con-GRPO settings (hashable; a change recompiles). Defaults: paper §4.1 / GRPO.

  Attributes:
    group_size: G, rollouts per prompt.
    beta: coefficient of the k3 KL to the reference (pi_SFT).
    eps_low / eps_high: clipping range ``[1 - eps_low, 1 + eps_high]`` of the ratio.
    ratio_to: ``'old'`` (rollout policy, standard GRPO) or ``'sft'`` (paper Eq. 8); see the module docstring.
    aggregation: one of :data:`medad_jax.rl.algo.AGGREGATION_MODES`.
    adv_std_norm: divide advantages by the group's reward std (GRPO's original normalisation); the paper's
      Eq. 7 does not.
    adv_eps: added to that std.
    filter_zero_variance: drop groups whose G rewards are all equal (they only carry the KL term).
    zero_variance_atol: rewards within this of each other count as equal.
    temperature: logits are divided by it before the log-softmax, for the policy, old-policy and reference
      log-probs alike: the ratio, the KL and the entropy are those of the sampling distribution
      ``softmax(z / T)`` the rollouts were drawn from (TRL and verl do the same). ``from_config`` sets it to
      ``sampling.temperature``; the trainer then takes ``old_logp`` from the sampler's sampling-distribution
      log-probs (``Rollout.sampling_logprobs_BN``). At the default T = 1 both are the plain policy.
    num_microbatches: K, gradient accumulation slices of whole prompt groups (each slice runs its own prompts'
      vision tower and decoder, so activations scale with 1/K).
    logits_chunk: completion tokens whose LM-head logits exist at once (:func:`chunked_token_logprobs`); no
      ``[rows, length, vocab]`` array is ever materialised.
    loss: the policy-gradient objective, one of :data:`medad_jax.rl.algo.LOSSES`: ``'grpo'`` (token ratios,
      Eq. 8), ``'gspo'`` (sequence ratio = geometric mean of the token ratios, clipped per sequence; needs
      ``aggregation='seq_mean_token_mean'``), ``'dr_grpo'`` (mean-only advantage and the constant normaliser
      ``aggregation='max_len_sum'``: token sum / (sequences x completion width)).
    overlong_penalty: DAPO's soft overlong punishment factor (0 = off): a completion of length L inside the last
      ``overlong_buffer`` tokens of the budget N gets the reward ``factor * (N - buffer - L) / buffer`` (down to
      ``-factor`` at N), entered as its group-centred advantage (Eq. 7's mean-only advantage is linear in R).
    overlong_buffer: that buffer, in tokens.
    tis_cap: truncated importance sampling (0 = off): each token's loss is weighted by
      ``min(pi_old / pi_sampler, tis_cap)``; needs ``sampler_logp_BN`` in the batch (the trainer then recomputes
      ``old_logp_BN`` with the update's own forward). The mismatch ``mean |old_logp - sampler_logp|`` is logged.
  """

  group_size: int = 8
  beta: float = 0.04
  eps_low: float = 0.2
  eps_high: float = 0.2
  ratio_to: str = 'old'
  aggregation: str = 'seq_mean_token_mean'
  adv_std_norm: bool = False
  adv_eps: float = 1e-6
  filter_zero_variance: bool = False
  zero_variance_atol: float = 0.0
  temperature: float = 1.0
  num_microbatches: int = 1
  loss: str = 'grpo'
  overlong_penalty: float = 0.0
  overlong_buffer: int = 0
  tis_cap: float = 0.0
  logits_chunk: int = 1024

  def __post_init__(self):
    if self.logits_chunk < 1:
      raise ValueError(f'GRPOConfig.logits_chunk={self.logits_chunk}: expected >= 1')
    if self.group_size < 1:
      raise ValueError(f'GRPOConfig.group_size={self.group_size}: expected >= 1')
    if self.beta < 0:
      raise ValueError(f'GRPOConfig.beta={self.beta}: expected >= 0')
    if not (0 <= self.eps_low < 1) or self.eps_high < 0:
      raise ValueError(f'GRPOConfig.eps_low={self.eps_low}, eps_high={self.eps_high}: expected 0 <= eps_low < 1 '
                       'and eps_high >= 0')
    if self.ratio_to not in RATIO_TO:
      raise ValueError(f'GRPOConfig.ratio_to={self.ratio_to!r}: expected one of {RATIO_TO}')
    if self.aggregation not in algo.AGGREGATION_MODES:
      raise ValueError(f'GRPOConfig.aggregation={self.aggregation!r}: expected one of {algo.AGGREGATION_MODES}')
    if not self.temperature > 0:
      raise ValueError(f'GRPOConfig.temperature={self.temperature}: expected > 0')
    if self.num_microbatches < 1:
      raise ValueError(f'GRPOConfig.num_microbatches={self.num_microbatches}: expected >= 1')
    if self.loss not in algo.LOSSES:
      raise ValueError(f'GRPOConfig.loss={self.loss!r}: expected one of {algo.LOSSES}')
    if self.loss == 'gspo' and self.aggregation != 'seq_mean_token_mean':
      raise ValueError(f"GRPOConfig.loss='gspo' with aggregation={self.aggregation!r}: GSPO averages sequence "
                       "losses; expected aggregation='seq_mean_token_mean'")
    if self.loss == 'dr_grpo' and (self.aggregation != 'max_len_sum' or self.adv_std_norm):
      raise ValueError(f"GRPOConfig.loss='dr_grpo' with aggregation={self.aggregation!r}, adv_std_norm="
                       f"{self.adv_std_norm}: Dr. GRPO expects aggregation='max_len_sum' and adv_std_norm=False")
    if self.overlong_penalty < 0 or (self.overlong_penalty > 0 and self.overlong_buffer < 1):
      raise ValueError(f'GRPOConfig.overlong_penalty={self.overlong_penalty}, overlong_buffer='
                       f'{self.overlong_buffer}: expected a factor >= 0 and, when it is > 0, a buffer >= 1 token')
    if self.overlong_penalty > 0 and self.adv_std_norm:
      raise ValueError('GRPOConfig.overlong_penalty > 0 with adv_std_norm=True: the penalty enters as a '
                       'group-centred advantage, exact only for the mean-only advantage (Eq. 7)')
    if self.tis_cap < 0:
      raise ValueError(f'GRPOConfig.tis_cap={self.tis_cap}: expected >= 0 (0 = off)')

  @property
  def needs_reference(self) -> bool:
    return self.beta > 0 or self.ratio_to == 'sft'

  @classmethod
  def from_config(cls, rl, sampling=None) -> 'GRPOConfig':
    """From the ``rl`` (and ``sampling``: its temperature) blocks of ``configs/congrpo.py``. ``rl.loss='dr_grpo'``
    implies ``aggregation='max_len_sum'``."""
    loss = rl.get('loss', 'grpo')
    aggregation = rl.aggregation
    if loss == 'dr_grpo' and aggregation == 'seq_mean_token_mean':
      aggregation = 'max_len_sum'
    return cls(group_size=rl.group_size, beta=rl.beta, eps_low=rl.eps_low, eps_high=rl.eps_high,
               ratio_to=rl.ratio_to, aggregation=aggregation, adv_std_norm=rl.adv_std_norm,
               filter_zero_variance=rl.filter_zero_variance, num_microbatches=rl.num_microbatches,
               temperature=float(sampling.temperature) if sampling is not None else 1.0, loss=loss,
               overlong_penalty=float(rl.get('overlong_penalty', 0.0)),
               overlong_buffer=int(rl.get('overlong_buffer', 0)), tis_cap=float(rl.get('tis_cap', 0.0)),
               **({'logits_chunk': rl.logits_chunk} if 'logits_chunk' in rl else {}))


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """Static SFT settings: the aggregation of the token NLL (``token_mean``: every target token weighs the same)
  and gradient-accumulation slices.

  ``focal_gamma`` > 0 weighs each target token's NLL by ``(1 - p)^gamma`` (``p``: the model's probability of
  that token, a constant of the step: the focal loss's weight without its gradient). Tokens the model already
  predicts (the template of a thought) fade out of the loss, and the few it does not -- the image-dependent
  words that decide a thought -- keep their weight. 0: plain NLL (the paper's Eq. 1).
  """

  aggregation: str = 'token_mean'
  num_microbatches: int = 1
  logits_chunk: int = 1024
  focal_gamma: float = 0.0

  def __post_init__(self):
    if self.aggregation not in algo.AGGREGATION_MODES:
      raise ValueError(f'SFTConfig.aggregation={self.aggregation!r}: expected one of {algo.AGGREGATION_MODES}')
    if self.logits_chunk < 1:
      raise ValueError(f'SFTConfig.logits_chunk={self.logits_chunk}: expected >= 1')
    if self.num_microbatches < 1:
      raise ValueError(f'SFTConfig.num_microbatches={self.num_microbatches}: expected >= 1')
    if not self.focal_gamma >= 0:
      raise ValueError(f'SFTConfig.focal_gamma={self.focal_gamma}: expected >= 0')

  @classmethod
  def from_config(cls, sft) -> 'SFTConfig':
    """From the ``sft`` block of ``configs/sft.py`` / ``configs/congrpo.py``."""
    return cls(aggregation=sft.aggregation, num_microbatches=sft.num_microbatches,
               **({'logits_chunk': sft.logits_chunk} if 'logits_chunk' in sft else {}),
               **({'focal_gamma': float(sft.focal_gamma)} if 'focal_gamma' in sft else {}))


# ---------------------------------------------------------------------------------------- shared pieces


def _frozen_vision(params) -> bool:
  """True when no trainable parameter lives in the vision tower (the default LoRA targets)."""
  return not any(re.match(r'^visual(/|$)', '/'.join(map(str, p))) for p, _ in nnx.to_flat_state(params))


def _apply_updates(tx, state: TrainState, grads, has_tokens: jax.Array) -> tuple[TrainState, jax.Array]:
  """One optax step; skipped (state kept, step still counted) when the batch had no token to learn from."""
  def apply(params, opt_state):
    updates, new_opt = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt, optax.tree.norm(updates).astype(jnp.float32)

  def skip(params, opt_state):
    return params, opt_state, jnp.zeros((), jnp.float32)

  new_params, new_opt, upd_norm = jax.lax.cond(has_tokens, apply, skip, state.params, state.opt_state)
  return state.replace(params=new_params, opt_state=new_opt, step=state.step + 1), upd_norm


def _split_microbatches(tree, k: int, what: str = 'batch', unit: int = 1):
  """``[X, ...] -> [k, X/k, ...]`` for every leaf, *strided* in units of ``unit`` rows: slice ``i`` takes units
  ``i, i+k, i+2k, ...``. With the batch axis sharded in contiguous blocks over the devices, every slice then holds
  an equal share of every device's rows (a contiguous split would put a slice on a few devices only)."""
  def one(x):
    if x.shape[0] % (k * unit):
      raise ValueError(f'num_microbatches={k} does not divide the {what} axis of size {x.shape[0]}'
                       + (f' into groups of {unit}' if unit > 1 else ''))
    y = x.reshape(x.shape[0] // (k * unit), k, unit, *x.shape[1:])
    return jnp.moveaxis(y, 1, 0).reshape(k, x.shape[0] // k, *x.shape[1:])
  return jax.tree.map(one, tree)


def _microbatches(batch: dict, k: int, prompt_keys: tuple[str, ...], row_keys: tuple[str, ...],
                  positions_key: str, src_key: str, group: int = 1) -> dict:
  """The batch split into ``k`` strided slices of whole prompts (their ``group`` completion rows and their
  images with them), for ``lax.scan``.

  Images are laid out per prompt (``prompts.py``: the images of prompt ``p`` occupy image slots ``[p*m, (p+1)*m)``),
  so a slice of prompts owns the matching images and its vision tower runs inside the scan body;
  ``prompt_index`` (each row's index in the whole batch) lets :func:`_embed_rows` make the feature index of its
  image tokens local to the slice.
  """
  out = {kk: batch[kk] for kk in prompt_keys if kk in batch}
  out[positions_key] = jnp.moveaxis(batch[positions_key], 1, 0)
  n_prompts = batch[positions_key].shape[1]
  out['prompt_index'] = jnp.arange(n_prompts, dtype=jnp.int32)
  if 'pixel_values_ILC' in batch:
    out[src_key] = batch[src_key]
  out = _split_microbatches(out, k)
  out[positions_key] = jnp.moveaxis(out[positions_key], 2, 1)
  rows = {kk: batch[kk] for kk in row_keys if kk in batch}
  out.update(_split_microbatches(rows, k, unit=group))
  if 'pixel_values_ILC' in batch:
    m = batch['pixel_values_ILC'].shape[0] // n_prompts
    out['pixel_values_ILC'] = _split_microbatches(batch['pixel_values_ILC'], k, 'image', unit=m)
    out['vision_meta_I'] = _split_microbatches(batch['vision_meta_I'], k, 'image', unit=m)
  return out


def _embed_rows(model: nnx.Module, mb: dict, ids_key: str, src_key: str, frozen_vision: bool) -> jax.Array:
  """Embeddings of a (micro)batch's rows with its own images' features (``Qwen25VL.embed_per_image``)."""
  ids = mb[ids_key]
  if 'pixel_values_ILC' not in mb:
    return model.embed(ids, mb.get('pixel_values_LC'), mb.get('vision_meta'))
  src = mb[src_key]
  pixels = mb['pixel_values_ILC']
  if 'prompt_index' in mb:  # a microbatch: prompt p's image slots moved from p*m to its local index j*m
    P_loc = ids.shape[0]
    feats_per_prompt = (pixels.shape[0] // P_loc) * mb['vision_meta_I'].window_index_M.shape[-1]
    shift = (mb['prompt_index'] - jnp.arange(P_loc, dtype=jnp.int32)) * feats_per_prompt
    src = jnp.where(src >= 0, src - shift[:, None], -1)
  # With nothing trainable in the tower, its features are constants: nothing of it is kept for the backward pass.
  return model.embed_per_image(ids, pixels, mb['vision_meta_I'], src, stop_gradient=frozen_vision)


def chunked_token_logprobs(model: nnx.Module, h_XD: jax.Array, ids_X: jax.Array, *, temperature: float = 1.0,
                           chunk: int = 1024) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Log-probs of ``ids_X`` under the LM head applied to hidden states ``h_XD`` (any leading axes ``X``), in
  chunks of ``chunk`` positions -> ``(logp_X, entropy_X, argmax_hit_X)`` (entropy and hits without gradient).

  Only ``[chunk, V]`` float32 logits exist at a time: ``lax.scan`` over the chunks with a rematerialised body, so
  the backward pass recomputes each chunk's logits instead of storing them (no ``[rows, length, V]`` array in the
  forward or the backward). Equal to the unchunked ``algo.selected_logprobs`` / ``algo.entropy`` up to summation
  order (``tests/test_rl_update.py``).
  """
  lead = ids_X.shape
  D = h_XD.shape[-1]
  h = h_XD.reshape(-1, D)
  ids = ids_X.reshape(-1)
  n = h.shape[0]
  c = max(1, min(chunk, n))
  nc = -(-n // c)
  pad = nc * c - n
  h = jnp.pad(h, ((0, pad), (0, 0))).reshape(nc, c, D)
  ids = jnp.pad(ids, (0, pad)).reshape(nc, c)

  @jax.checkpoint
  def one(h_cD, ids_c):
    logits = model.logits(h_cD[None])[0]
    logp = algo.selected_logprobs(logits, ids_c, temperature=temperature)
    sg = jax.lax.stop_gradient(logits)
    return logp, algo.entropy(sg, temperature=temperature), (jnp.argmax(sg, -1) == ids_c)

  def body(_, xs):
    return None, one(*xs)

  _, (logp, ent, hit) = jax.lax.scan(body, None, (h, ids))
  unpad = lambda x: x.reshape(-1)[:n].reshape(lead)  # noqa: E731
  return unpad(logp), unpad(ent), unpad(hit)


# ------------------------------------------------------------------------------------------------- SFT


SFT_KEYS = ('input_ids_BT', 'attention_mask_BT', 'positions_3BT', 'loss_mask_BT')
_SFT_ROW_KEYS = SFT_KEYS[:2] + SFT_KEYS[3:] + ('target_pos_BM', 'target_ids_BM', 'target_mask_BM')


def sft_targets(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(pos_BM, ids_BM, mask_BM)``: the positions whose hidden state predicts a target token, the target ids and
  which of the M slots are real. The pipeline supplies them (``M`` = a bucket of the batch's longest answer, so
  logits exist only where there is a target); otherwise every position predicts the next one (``M = T - 1``)."""
  if 'target_pos_BM' in batch:
    return batch['target_pos_BM'], batch['target_ids_BM'], batch['target_mask_BM'].astype(jnp.float32)
  ids = batch['input_ids_BT']
  B, T = ids.shape
  mask = algo.first_token_unscored(batch['loss_mask_BT'].astype(jnp.float32))[:, 1:]
  return jnp.broadcast_to(jnp.arange(T - 1), (B, T - 1)), ids[:, 1:], mask


def sft_loss_parts(model: nnx.Module, batch: dict, cfg: SFTConfig, frozen_vision: bool = False
                   ) -> tuple[jax.Array, dict]:
  """-> ``(numerator, stats)``; the loss is ``numerator / denominator(loss_mask)`` (see :func:`_sft_denominator`)."""
  x_BTD = _embed_rows(model, batch, 'input_ids_BT', 'image_src_BT', frozen_vision)
  h_BTD, _ = model.model(x_BTD, attention_mask_BT=batch['attention_mask_BT'], positions_3BT=batch['positions_3BT'])
  pos_BM, ids_BM, mask_BM = sft_targets(batch)
  h_BMD = jnp.take_along_axis(h_BTD, pos_BM[..., None].astype(jnp.int32), axis=1)
  logp_BM, _, hit_BM = chunked_token_logprobs(model, h_BMD, ids_BM, chunk=cfg.logits_chunk)
  nll_BM = -logp_BM
  loss_BM = nll_BM
  if cfg.focal_gamma:
    loss_BM = nll_BM * jax.lax.stop_gradient((1.0 - jnp.exp(logp_BM)) ** cfg.focal_gamma)
  num, _ = algo.aggregate_parts(loss_BM, mask_BM, cfg.aggregation)
  on = mask_BM > 0
  stats = {'tokens': jnp.sum(mask_BM), 'loss_num': jax.lax.stop_gradient(num),
           'nll_sum': jax.lax.stop_gradient(jnp.sum(jnp.where(on, nll_BM, 0.0))),
           'correct_sum': jnp.sum(jnp.where(on, hit_BM, False).astype(jnp.float32))}
  return num, stats


def _sft_denominator(batch: dict, cfg: SFTConfig) -> jax.Array:
  mask = sft_targets(batch)[2]
  return algo.aggregate_parts(jnp.zeros_like(mask), mask, cfg.aggregation)[1]


def make_sft_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: SFTConfig = SFTConfig(), *,
                  mesh: Mesh | None = None, lr_schedule: optax.Schedule | None = None) -> JittedStep:
  """The jitted SFT step (Eq. 1): masked NLL over the assistant tokens, gradients of the trainable params.

  Batch (host or device arrays; rows are examples, each with its own image)::

      input_ids_BT [B, T] int32, attention_mask_BT [B, T], positions_3BT [3, B, T] (rope_index),
      loss_mask_BT [B, T]   1 where token t is an assistant target (prompt, image and padding tokens: 0),
      pixel_values_ILC [I, L, C], vision_meta_I, image_src_BT   optional: the images, one patch bucket each, laid
                            out per row (``sampling/prompts.py``), or packed ``pixel_values_LC`` + ``vision_meta``,
      target_pos_BM, target_ids_BM, target_mask_BM   optional (:func:`sft_targets`; the pipeline supplies them).

  Memory: logits exist only at target positions and only ``logits_chunk`` of them at a time; with
  ``num_microbatches`` K > 1 each slice of rows runs its own images through the vision tower inside the scan.

  Metrics: ``loss``, ``nll`` (token mean), ``token_accuracy`` (greedy next-token accuracy on the targets),
  ``target_tokens``, ``grad_norm`` (before clipping), ``update_norm``, ``lr``.
  """

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    for k in SFT_KEYS:
      if k not in batch:
        raise KeyError(f'SFT batch: missing key {k!r}; expected {SFT_KEYS} (+ images, targets)')
    denom = _sft_denominator(batch, cfg)
    K = cfg.num_microbatches
    frozen_vision = _frozen_vision(state.params)

    def loss_fn(params, mb):
      model = nnx.merge(graphdef, params, state.frozen)
      num, stats = sft_loss_parts(model, mb, cfg, frozen_vision)
      return num / jnp.maximum(denom, 1.0), stats

    grad_fn = jax.grad(loss_fn, has_aux=True)
    if K == 1:
      grads, stats = grad_fn(state.params, batch)
    else:
      if 'pixel_values_LC' in batch:
        raise ValueError('SFTConfig.num_microbatches > 1 needs per-row images (pixel_values_ILC, image_src_BT; '
                         'train.pipeline.sft_batch), not one packed pixel_values_LC')
      mbs = _microbatches(batch, K, _SFT_ROW_KEYS, (), 'positions_3BT', 'image_src_BT')

      def body(acc, mb):
        g, s = grad_fn(state.params, mb)
        return jax.tree.map(jnp.add, acc, (g, s)), None

      zero = (jax.tree.map(jnp.zeros_like, state.params),
              {k: jnp.zeros((), jnp.float32) for k in ('tokens', 'loss_num', 'nll_sum', 'correct_sum')})
      (grads, stats), _ = jax.lax.scan(body, zero, mbs)
    n = jnp.maximum(stats['tokens'], 1.0)
    grad_norm = optax.tree.norm(grads)
    new_state, upd_norm = _apply_updates(tx, state, grads, stats['tokens'] > 0)
    metrics = {'loss': stats['loss_num'] / jnp.maximum(denom, 1.0), 'nll': stats['nll_sum'] / n,
               'token_accuracy': stats['correct_sum'] / n, 'target_tokens': stats['tokens'],
               'grad_norm': grad_norm, 'update_norm': upd_norm}
    if lr_schedule is not None:
      metrics['lr'] = jnp.asarray(lr_schedule(state.step), jnp.float32)
    return new_state, metrics

  return JittedStep(step, mesh)


# -------------------------------------------------------------------------------------------- Con-GRPO


ROLLOUT_KEYS = ('prompt_ids_PT', 'prompt_mask_PT', 'prompt_positions_3PT', 'rope_deltas_P', 'completion_ids_BN',
                'completion_mask_BN', 'old_logp_BN', 'rewards_B')


def rollout_batch(prompts, rollout, rewards_B) -> dict:
  """The update's batch from the sampler's ``PromptBatch`` + ``Rollout`` and host rewards ``[B]``."""
  batch = {
      'prompt_ids_PT': prompts.input_ids_PT, 'prompt_mask_PT': prompts.attention_mask_PT,
      'prompt_positions_3PT': prompts.positions_3PT, 'rope_deltas_P': prompts.rope_deltas_P,
      'completion_ids_BN': rollout.tokens_BN, 'completion_mask_BN': rollout.completion_mask_BN,
      'old_logp_BN': rollout.policy_logprobs_BN, 'rewards_B': np.asarray(rewards_B, np.float32)}
  if prompts.pixel_values_ILC is not None:
    batch.update(pixel_values_ILC=prompts.pixel_values_ILC, vision_meta_I=prompts.vision_meta_I,
                 image_src_PT=prompts.image_src_PT)
  return batch


def embed_prompts(model: nnx.Module, batch: dict, frozen_vision: bool = False) -> jax.Array:
  """Prompt embeddings ``x_PTD`` with the images' features at the ``<|image_pad|>`` tokens, from either layout:
  the sampler's (``pixel_values_ILC``, ``vision_meta_I``, ``image_src_PT``: images kept apart, the vision tower
  run per image, exactly as the sampler embedded the prompts it drew the rollouts from), the processor's packed
  ``pixel_values_LC`` + ``vision_meta``, or none (text-only prompts)."""
  return _embed_rows(model, batch, 'prompt_ids_PT', 'image_src_PT', frozen_vision)


def completion_hidden(model: nnx.Module, batch: dict, group_size: int, frozen_vision: bool = False) -> jax.Array:
  """Teacher-forced final hidden states ``[B, N, D]`` whose LM-head output predicts each completion token.

  The prompt runs once per prompt (``P`` rows, with its image) and returns its keys/values; the ``B = P*G``
  completions then run against that prompt cache as a shared ``prefix`` (``text.py``): it is never copied G times,
  exactly as in the sampler. Position ``j`` predicts ``completion_ids_BN[:, j]`` (from the last prompt position for
  ``j = 0``).
  """
  ids_PT, mask_PT = batch['prompt_ids_PT'], batch['prompt_mask_PT']
  comp_BN = batch['completion_ids_BN']
  Pn, T = ids_PT.shape
  N = comp_BN.shape[1]
  if comp_BN.shape[0] != Pn * group_size:
    raise ValueError(f'Con-GRPO batch: {comp_BN.shape[0]} completion rows for {Pn} prompts; expected '
                     f'prompts * group_size = {Pn * group_size}')
  x_PTD = embed_prompts(model, batch, frozen_vision)
  h_PTD, prefix = model.model(x_PTD, attention_mask_BT=mask_PT, positions_3BT=batch['prompt_positions_3PT'],
                              return_kv=True)
  deltas_B = jnp.repeat(batch['rope_deltas_P'].astype(jnp.int32), group_size, axis=0)
  x_BND = model.model.embed_tokens(comp_BN)
  h_BND, _ = model.model(x_BND, attention_mask_BT=batch['completion_mask_BN'].astype(jnp.int32),
                         positions_3BT=continuation_positions(T, deltas_B, N), prefix=prefix)
  last_BD = jnp.repeat(h_PTD[:, -1], group_size, axis=0)
  return jnp.concatenate([last_BD[:, None], h_BND[:, :-1]], axis=1)


def completion_logprobs(model: nnx.Module, batch: dict, group_size: int, temperature: float = 1.0,
                        chunk: int = 1024, frozen_vision: bool = False) -> tuple[jax.Array, jax.Array]:
  """-> ``(logp_BN, entropy_BN)`` of the completion tokens under ``model`` (entropy without gradient), through
  the LM head in chunks of ``chunk`` tokens (:func:`chunked_token_logprobs`)."""
  h_BND = completion_hidden(model, batch, group_size, frozen_vision)
  logp, ent, _ = chunked_token_logprobs(model, h_BND, batch['completion_ids_BN'], temperature=temperature,
                                        chunk=chunk)
  return logp, ent


def grpo_advantages(rewards_B: jax.Array, cfg: GRPOConfig) -> tuple[jax.Array, jax.Array]:
  """-> ``(adv_B, zero_var_P)`` from group-contiguous rewards."""
  r_PG = rewards_B.astype(jnp.float32).reshape(-1, cfg.group_size)
  adv = algo.group_advantages(r_PG, std_norm=cfg.adv_std_norm, eps=cfg.adv_eps).reshape(-1)
  return adv, algo.zero_variance_groups(r_PG, atol=cfg.zero_variance_atol)


_STAT_SUMS = ('tokens', 'pg_num', 'kl_num', 'kl_tok_sum', 'clip_low_sum', 'clip_high_sum', 'ratio_sum',
              'entropy_sum', 'logp_diff_sum', 'mismatch_sum', 'tis_sum', 'tis_capped_sum', 'overlong_sum',
              'overlong_rows')


def grpo_objective(logp_BN: jax.Array, old_logp_BN: jax.Array, ref_logp_BN: jax.Array | None, adv_B: jax.Array,
                   mask_BN: jax.Array, cfg: GRPOConfig, *, sampler_logp_BN: jax.Array | None = None
                   ) -> tuple[jax.Array, dict]:
  """Eq. 8 (or the ``cfg.loss`` variant) on log-prob arrays -> ``(numerator, stats)``; the loss is
  ``numerator / max(denominator, 1)`` with the denominator of ``algo.aggregate_parts(., mask, cfg.aggregation)``.

  ``ref_logp_BN`` may be None only when ``cfg.needs_reference`` is False. ``sampler_logp_BN``: the rollout engine's
  log-probs when ``old_logp_BN`` was recomputed by the update's forward (needed by ``cfg.tis_cap``); then the
  mismatch stat is ``|old_logp - sampler_logp|``, else ``|logp - old_logp|`` (the sampler's log-probs against the
  update's own at the current parameters: the rollout-update mismatch at the first inner step).

  Order: overlong penalty (an advantage term), surrogate (token or sequence ratio), TIS weight on the surrogate,
  k3 KL, aggregation.
  """
  ref = None if ref_logp_BN is None else jax.lax.stop_gradient(ref_logp_BN)
  if cfg.needs_reference and ref is None:
    raise ValueError(f'GRPOConfig(beta={cfg.beta}, ratio_to={cfg.ratio_to!r}) needs reference log-probs')
  if cfg.tis_cap > 0 and sampler_logp_BN is None:
    raise ValueError(f'GRPOConfig.tis_cap={cfg.tis_cap} needs sampler_logp_BN (the rollout engine\'s log-probs) '
                     'besides old_logp_BN recomputed by the update\'s forward')
  on = mask_BN > 0
  s = lambda x: jnp.sum(jnp.where(on, x, 0.0).astype(jnp.float32))  # noqa: E731
  adv = adv_B.astype(jnp.float32)
  overlong_B = jnp.zeros_like(adv)
  if cfg.overlong_penalty > 0:
    len_B = jnp.sum(mask_BN.astype(jnp.float32), axis=-1)
    overlong_B = jnp.where(len_B > 0, algo.overlong_penalty(len_B, mask_BN.shape[1], cfg.overlong_buffer,
                                                            cfg.overlong_penalty), 0.0)
    adv = adv + jnp.where(len_B > 0, algo.group_centred(overlong_B, cfg.group_size), 0.0)
  den_logp = ref if cfg.ratio_to == 'sft' else old_logp_BN
  if cfg.loss == 'gspo':
    pg_BN, aux = algo.gspo_surrogate(logp_BN, den_logp, adv, mask_BN, eps_low=cfg.eps_low, eps_high=cfg.eps_high)
  else:
    pg_BN, aux = algo.clipped_surrogate(logp_BN, den_logp, adv, eps_low=cfg.eps_low, eps_high=cfg.eps_high)
  tis = jnp.ones_like(logp_BN)
  if cfg.tis_cap > 0:
    tis = algo.tis_weights(old_logp_BN, sampler_logp_BN, cfg.tis_cap)
    pg_BN = pg_BN * tis
  kl_BN = algo.k3_kl(logp_BN, ref) if ref is not None else jnp.zeros_like(logp_BN)
  pg_num, _ = algo.aggregate_parts(pg_BN, mask_BN, cfg.aggregation)
  kl_num, _ = algo.aggregate_parts(kl_BN, mask_BN, cfg.aggregation)
  ratio = jax.lax.stop_gradient(aux['ratio'])
  mis_a, mis_b = (old_logp_BN, sampler_logp_BN) if sampler_logp_BN is not None else (logp_BN, old_logp_BN)
  stats = {'tokens': jnp.sum(mask_BN.astype(jnp.float32)), 'pg_num': jax.lax.stop_gradient(pg_num),
           'kl_num': jax.lax.stop_gradient(kl_num), 'kl_tok_sum': s(jax.lax.stop_gradient(kl_BN)),
           'clip_low_sum': s(aux['clipped_low']), 'clip_high_sum': s(aux['clipped_high']), 'ratio_sum': s(ratio),
           'logp_diff_sum': s(jax.lax.stop_gradient(logp_BN) - old_logp_BN),
           'mismatch_sum': s(jnp.abs(jax.lax.stop_gradient(mis_a) - jax.lax.stop_gradient(mis_b))),
           'tis_sum': s(tis), 'tis_capped_sum': s((tis >= cfg.tis_cap) & (cfg.tis_cap > 0)),
           'overlong_sum': jnp.sum(overlong_B), 'overlong_rows': jnp.sum((overlong_B < 0).astype(jnp.float32)),
           'ratio_min': jnp.min(jnp.where(on, ratio, jnp.inf)), 'ratio_max': jnp.max(jnp.where(on, ratio, -jnp.inf))}
  return pg_num + cfg.beta * kl_num, stats


def grpo_loss_parts(policy: nnx.Module, reference: Callable[[], jax.Array] | None, mb: dict, cfg: GRPOConfig,
                    frozen_vision: bool = False) -> tuple[jax.Array, dict]:
  """:func:`grpo_objective` on one (micro)batch of rollouts, with the policy's teacher-forced log-probs.

  ``mb`` holds the rollout batch keys plus ``adv_B`` and ``loss_mask_BN`` (completion mask, zero-variance groups
  removed when filtering). ``reference()`` returns ``ref_logp_BN`` (called only when needed and the batch does not
  carry ``ref_logp_BN``).
  """
  logp, ent = completion_logprobs(policy, mb, cfg.group_size, cfg.temperature, cfg.logits_chunk, frozen_vision)
  ref = None
  if cfg.needs_reference:
    ref = mb['ref_logp_BN'] if 'ref_logp_BN' in mb else reference()
  num, stats = grpo_objective(logp, mb['old_logp_BN'], ref, mb['adv_B'], mb['loss_mask_BN'], cfg,
                              sampler_logp_BN=mb.get('sampler_logp_BN'))
  stats['entropy_sum'] = jnp.sum(jnp.where(mb['loss_mask_BN'] > 0, ent, 0.0))
  return num, stats


def make_congrpo_update(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: GRPOConfig, *,
                        mesh: Mesh | None = None, lr_schedule: optax.Schedule | None = None) -> JittedStep:
  """The ONE jitted Con-GRPO update (see the module docstring): ``(state, batch) -> (state, metrics)``.

  Batch (``rollout_batch`` builds it from the sampler's output)::

      prompt_ids_PT [P, T], prompt_mask_PT [P, T], prompt_positions_3PT [3, P, T], rope_deltas_P [P]
      pixel_values_ILC [I, L, C], vision_meta_I, image_src_PT   optional: the prompts' images, once per prompt,
                                                                as the sampler's PromptBatch holds them (or the
                                                                packed pixel_values_LC + vision_meta)
      completion_ids_BN [B, N], completion_mask_BN [B, N]       B = P * G, row p*G + g = rollout g of prompt p
      old_logp_BN [B, N]    log-probs of the sampled tokens under the rollout policy (0 where masked)
      rewards_B [B]         total rewards (Eq. 3)
      ref_logp_BN [B, N]    optional precomputed reference log-probs: with mu > 1 inner iterations, compute them
                            once per rollout batch (``rollout_logprobs(..., adapters=False)``) instead of mu times
      sampler_logp_BN [B, N] optional: the rollout engine's log-probs when ``old_logp_BN`` was recomputed by the
                            update's forward (truncated importance sampling, ``GRPOConfig.tis_cap``)

  Metrics (scalars): ``loss``, ``pg_loss``, ``kl_loss`` (beta * kl), ``kl`` (aggregated k3), ``kl_token_mean``,
  ``clip_frac_low`` / ``clip_frac_high`` (fraction of tokens whose lower / upper clip binds), ``ratio_mean`` /
  ``ratio_min`` / ``ratio_max``, ``entropy``, ``grad_norm`` (before clipping), ``update_norm``, ``reward_mean`` /
  ``reward_std``, ``adv_abs_mean``, ``zero_var_groups`` / ``zero_var_frac`` (groups with equal rewards, among
  those with completion tokens), ``completion_tokens``,
  ``completion_len``, ``logp_old_diff`` (mean ``logp - old_logp``: 0 at the first inner step when the teacher-
  forced log-probs match the sampler's), ``lr``; ``logp_mismatch`` (mean ``|logp - old_logp|``, or
  ``|old_logp - sampler_logp|`` with ``sampler_logp_BN``: the rollout-update mismatch, ~0 in fp32),
  ``tis_weight_mean`` / ``tis_capped_frac``, ``overlong_penalty`` (mean per rollout) / ``overlong_frac``.
  """
  K = cfg.num_microbatches

  def update(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    for k in ROLLOUT_KEYS:
      if k not in batch:
        raise KeyError(f'Con-GRPO batch: missing key {k!r}; expected {ROLLOUT_KEYS} (+ images, ref_logp_BN)')
    G = cfg.group_size
    if batch['rewards_B'].shape[0] % G:
      raise ValueError(f'rewards_B has {batch["rewards_B"].shape[0]} rows, not a multiple of group_size={G}')
    adv_B, zero_var_P = grpo_advantages(batch['rewards_B'], cfg)
    mask = batch['completion_mask_BN'].astype(jnp.float32)
    # Padding prompts (no completion tokens at all) are not groups: they are left out of the zero-variance count.
    real_P = jnp.any(mask.reshape(-1, G * mask.shape[1]) > 0, axis=1)
    if cfg.filter_zero_variance:
      mask = mask * jnp.repeat(~zero_var_P, G)[:, None].astype(jnp.float32)
    _, denom = algo.aggregate_parts(jnp.zeros_like(mask), mask, cfg.aggregation)
    use_lora_ref = state.ref_params is None
    frozen_vision = _frozen_vision(state.params)

    def loss_fn(params, mb):
      policy = nnx.merge(graphdef, params, state.frozen)

      def reference():
        if use_lora_ref:
          with lora_disabled():
            ref_model = nnx.merge(graphdef, params, state.frozen)
            return jax.lax.stop_gradient(completion_logprobs(ref_model, mb, G, cfg.temperature, cfg.logits_chunk,
                                                             frozen_vision)[0])
        ref_model = nnx.merge(graphdef, state.ref_params, state.frozen)
        return completion_logprobs(ref_model, mb, G, cfg.temperature, cfg.logits_chunk, frozen_vision)[0]

      num, stats = grpo_loss_parts(policy, reference, mb, cfg, frozen_vision)
      return num / jnp.maximum(denom, 1.0), stats

    grad_fn = jax.grad(loss_fn, has_aux=True)
    full = {**batch, 'adv_B': adv_B, 'loss_mask_BN': mask}
    if K == 1:
      grads, stats = grad_fn(state.params, full)
    else:
      if 'pixel_values_LC' in batch:
        raise ValueError('GRPOConfig.num_microbatches > 1 needs per-prompt images (pixel_values_ILC, image_src_PT: '
                         'the sampler\'s PromptBatch layout), not one packed pixel_values_LC')
      prompt_keys = ('prompt_ids_PT', 'prompt_mask_PT', 'rope_deltas_P')
      row_keys = ('completion_ids_BN', 'completion_mask_BN', 'old_logp_BN', 'adv_B', 'loss_mask_BN') + (
          ('ref_logp_BN',) if 'ref_logp_BN' in batch else ()) + (
          ('sampler_logp_BN',) if 'sampler_logp_BN' in batch else ())
      mbs = _microbatches(full, K, prompt_keys, row_keys, 'prompt_positions_3PT', 'image_src_PT', group=G)

      def body(acc, mb):
        g, s = grad_fn(state.params, mb)
        g_acc, s_acc = acc
        s_new = {k: (jnp.minimum if k == 'ratio_min' else jnp.maximum if k == 'ratio_max' else jnp.add)(
            s_acc[k], s[k]) for k in s_acc}
        return (jax.tree.map(jnp.add, g_acc, g), s_new), None

      zero_s = {k: jnp.zeros((), jnp.float32) for k in _STAT_SUMS}
      zero_s.update(ratio_min=jnp.array(jnp.inf, jnp.float32), ratio_max=jnp.array(-jnp.inf, jnp.float32))
      (grads, stats), _ = jax.lax.scan(body, (jax.tree.map(jnp.zeros_like, state.params), zero_s), mbs)

    grad_norm = optax.tree.norm(grads)
    has_tokens = stats['tokens'] > 0
    new_state, upd_norm = _apply_updates(tx, state, grads, has_tokens)
    n = jnp.maximum(stats['tokens'], 1.0)
    d = jnp.maximum(denom, 1.0)
    pg_loss, kl = stats['pg_num'] / d, stats['kl_num'] / d
    r = batch['rewards_B'].astype(jnp.float32)
    comp = batch['completion_mask_BN'].astype(jnp.float32)
    metrics = {
        'loss': pg_loss + cfg.beta * kl, 'pg_loss': pg_loss, 'kl_loss': cfg.beta * kl, 'kl': kl,
        'kl_token_mean': stats['kl_tok_sum'] / n,
        'clip_frac_low': stats['clip_low_sum'] / n, 'clip_frac_high': stats['clip_high_sum'] / n,
        'ratio_mean': stats['ratio_sum'] / n,
        'ratio_min': jnp.where(has_tokens, stats['ratio_min'], 1.0),
        'ratio_max': jnp.where(has_tokens, stats['ratio_max'], 1.0),
        'entropy': stats['entropy_sum'] / n, 'logp_old_diff': stats['logp_diff_sum'] / n,
        'grad_norm': grad_norm, 'update_norm': upd_norm,
        'reward_mean': jnp.mean(r), 'reward_std': jnp.std(r), 'adv_abs_mean': jnp.mean(jnp.abs(adv_B)),
        'zero_var_groups': jnp.sum((zero_var_P & real_P).astype(jnp.int32)),
        'zero_var_frac': jnp.sum((zero_var_P & real_P).astype(jnp.float32)) / jnp.maximum(jnp.sum(real_P), 1),
        'completion_tokens': stats['tokens'], 'completion_len': jnp.sum(comp) / comp.shape[0],
        'logp_mismatch': stats['mismatch_sum'] / n, 'tis_weight_mean': stats['tis_sum'] / n,
        'tis_capped_frac': stats['tis_capped_sum'] / n, 'overlong_penalty': stats['overlong_sum'] / comp.shape[0],
        'overlong_frac': stats['overlong_rows'] / comp.shape[0],
    }
    if lr_schedule is not None:
      metrics['lr'] = jnp.asarray(lr_schedule(state.step), jnp.float32)
    return new_state, metrics

  return JittedStep(update, mesh)


@functools.partial(jax.jit, static_argnames=('graphdef', 'group_size', 'temperature', 'adapters', 'logits_chunk'))
def rollout_logprobs(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, batch: dict, *,
                     group_size: int, temperature: float = 1.0, adapters: bool = True,
                     logits_chunk: int = 1024) -> jax.Array:
  """Teacher-forced ``logp_BN`` of a rollout batch (e.g. recomputed old log-probs, or reference log-probs with
  ``adapters=False``), by the same code path as the update."""
  model = nnx.merge(graphdef, params, frozen)
  with contextlib.nullcontext() if adapters else lora_disabled():
    return completion_logprobs(model, batch, group_size, temperature, logits_chunk, frozen_vision=True)[0]
