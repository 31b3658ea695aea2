"""The Qwen2.5-VL text decoder: GQA attention with M-RoPE and a static-shape KV cache, SiLU-gated MLP.

Axis legend (as in ``layers.py``):
  B batch          T query length (this call's tokens)     S key length (the cache length when a cache is used)
  D model width    F MLP width        N query heads        K key/value heads        H head dim
  h rotary frequencies (H/2)          V vocabulary         L decoder layers

M-RoPE: every token has three positions (temporal, height, width) ``positions_3BT``; text tokens carry the same
value in all three rows. The ``H/2`` rotary frequencies are split into ``mrope_section`` chunks (e.g. 16/24/24
for the 3B model) and chunk ``i`` is rotated by position row ``i % 3`` (exactly transformers'
``Qwen2_5_VLRotaryEmbedding.recomposition_frequencies``). cos/sin and the rotation are computed in float32.

KV cache (a plain pytree so ``jax.tree.map(lambda x: jnp.repeat(x, G, axis=0), cache)`` broadcasts a prefilled
prompt to G samples; every leaf has the batch on axis 0)::

    cache = {
        'k': (k_BSKH for each of the L layers),   # tuple; keys after the rotary embedding, in the compute dtype
        'v': (v_BSKH for each of the L layers),   # tuple
        'mask': mask_BS,                          # bool; True where the slot holds a real (non-pad) token
    }

The write position ``cache_index`` (an int32 scalar, may be traced) is passed next to the cache, not inside it,
so the cache stays broadcastable. A call with ``T`` tokens writes slots ``[cache_index, cache_index + T)`` with
``lax.dynamic_update_slice`` and its queries attend to every valid slot ``s <= cache_index + t``. Prefill
(``T`` = prompt length, ``cache_index`` = 0) and decode (``T`` = 1) are the same code path. Left padding and
finished rows are handled by writing ``attention_mask_BT`` = 0 for their tokens: those slots never become keys.
Slots not yet written start with ``mask`` False, so they are never attended either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medad_jax.model.config import TextConfig
from medad_jax.model.layers import Embed, Linear, RMSNorm

Cache = dict  # {'k': tuple[k_BSKH], 'v': tuple[v_BSKH], 'mask': mask_BS}; see the module docstring.


# ----------------------------------------------------------------------------- rotary (M-RoPE)


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
  """``inv_freq_h = theta ** (-2i / H)`` in float32, as transformers' default rope init."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def mrope_row_of_freq(mrope_section: tuple[int, ...], head_dim: int) -> np.ndarray:
  """For each of the ``H/2`` frequencies, which position row (0 = t, 1 = h, 2 = w) rotates it: ``[h]`` int."""
  if sum(mrope_section) != head_dim // 2:
    raise ValueError(f'mrope_section {mrope_section} sums to {sum(mrope_section)}; expected head_dim/2 = '
                     f'{head_dim // 2}')
  return np.concatenate([np.full((n,), i % 3, np.int32) for i, n in enumerate(mrope_section)])


def mrope_cos_sin(positions_3BT: jax.Array, inv_freq_h: jax.Array, mrope_section: tuple[int, ...]
                  ) -> tuple[jax.Array, jax.Array]:
  """3-row positions -> ``(cos_BTH, sin_BTH)`` in float32 (frequency ``j`` uses row ``mrope_row_of_freq[j]``)."""
  row_h = mrope_row_of_freq(mrope_section, 2 * inv_freq_h.shape[0])
  pos_hBT = positions_3BT.astype(jnp.float32)[row_h]          # static gather over the 3 rows
  freqs_BTh = jnp.moveaxis(pos_hBT, 0, -1) * inv_freq_h
  emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
  return jnp.cos(emb_BTH), jnp.sin(emb_BTH)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
  """``x * cos + rotate_half(x) * sin`` (the half-split convention of transformers), in float32."""
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rot = jnp.concatenate([-x2, x1], axis=-1)
  out = x * cos_BTH[:, :, None, :] + rot * sin_BTH[:, :, None, :]
  return out.astype(x_BTNH.dtype)


# ----------------------------------------------------------------------------- masks and cache


def attention_mask_BTS(key_mask_BS: jax.Array, query_slot_T: jax.Array) -> jax.Array:
  """Causal + key-validity mask: query ``t`` (at cache slot ``query_slot_T[t]``) sees valid slots ``s <= slot``."""
  S = key_mask_BS.shape[1]
  causal_TS = jnp.arange(S)[None, :] <= query_slot_T[:, None]
  return key_mask_BS[:, None, :] & causal_TS[None]


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype='float32') -> Cache:
  """An empty cache of ``max_len`` slots (every slot invalid)."""
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  zeros = lambda: jnp.zeros(shape, jnp.dtype(dtype))  # noqa: E731
  return {'k': tuple(zeros() for _ in range(cfg.num_layers)), 'v': tuple(zeros() for _ in range(cfg.num_layers)),
          'mask': jnp.zeros((batch, max_len), bool)}


def repeat_cache(cache: Cache, n: int) -> Cache:
  """Each batch row repeated ``n`` times in place (row ``b`` -> rows ``b*n .. b*n+n-1``), e.g. prompt -> G samples."""
  return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), cache)


# ----------------------------------------------------------------------------- modules


class MLP(nnx.Module):
  """``down(silu(gate(x)) * up(x))``, no biases."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype='float32', param_dtype='float32'):
    kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
    self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
    self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class Attention(nnx.Module):
  """Grouped-query self-attention with q/k/v biases, M-RoPE, optional KV cache; softmax in float32."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype='float32', param_dtype='float32'):
    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(f'hidden_size {cfg.hidden_size}, num_heads {cfg.num_heads}, num_kv_heads '
                       f'{cfg.num_kv_heads}: expected hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0')
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    D, H = cfg.hidden_size, cfg.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = Linear(D, cfg.num_heads * H, use_bias=True, **kw)
    self.k_proj = Linear(D, cfg.num_kv_heads * H, use_bias=True, **kw)
    self.v_proj = Linear(D, cfg.num_kv_heads * H, use_bias=True, **kw)
    self.o_proj = Linear(cfg.num_heads * H, D, use_bias=False, **kw)

  def __call__(self, x_BTD: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array, mask_BTS: jax.Array, *,
               kv: tuple[jax.Array, jax.Array] | None = None, cache_index: jax.Array | int = 0
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Returns ``(y_BTD, (k_BSKH, v_BSKH) or None)``.

    Without ``kv`` the keys are this call's ``T`` tokens (``S == T``). With ``kv`` (this layer's cache slices
    ``[B, S, K, H]``) the new keys/values are written at ``cache_index`` and attention runs over all ``S`` slots.
    """
    B, T, _ = x_BTD.shape
    q_BTNH = self.q_proj(x_BTD).reshape(B, T, self.num_heads, self.head_dim)
    k_BTKH = self.k_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim)
    v_BTKH = self.v_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim)
    q_BTNH = apply_rope(q_BTNH, cos_BTH, sin_BTH)
    k_BTKH = apply_rope(k_BTKH, cos_BTH, sin_BTH)
    new_kv = None
    if kv is not None:
      k_cache, v_cache = kv
      start = (0, cache_index, 0, 0)
      k_BSKH = jax.lax.dynamic_update_slice(k_cache, k_BTKH.astype(k_cache.dtype), start)
      v_BSKH = jax.lax.dynamic_update_slice(v_cache, v_BTKH.astype(v_cache.dtype), start)
      new_kv = (k_BSKH, v_BSKH)
      k_BSKH, v_BSKH = k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype)
    else:
      k_BSKH, v_BSKH = k_BTKH, v_BTKH
    # The XLA implementation handles GQA (N a multiple of K), computes logits and softmax in float32, and fills
    # masked logits with a large finite negative, so fully masked (pad) query rows stay finite instead of NaN.
    o_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], scale=self.head_dim**-0.5,
                                          implementation='xla')
    return self.o_proj(o_BTNH.reshape(B, T, self.num_heads * self.head_dim)), new_kv


class DecoderLayer(nnx.Module):
  """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype='float32', param_dtype='float32'):
    self.self_attn = Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

  def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_BTS, *, kv=None, cache_index=0):
    """Returns ``(x_BTD, new_kv)``; see :meth:`Attention.__call__`."""
    h_BTD, new_kv = self.self_attn(self.input_layernorm(x_BTD), cos_BTH, sin_BTH, mask_BTS, kv=kv,
                                   cache_index=cache_index)
    x_BTD = x_BTD + h_BTD
    x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
    return x_BTD, new_kv


class TextModel(nnx.Module):
  """Token embedding, ``L`` decoder layers and the final norm (HF ``Qwen2_5_VLTextModel``)."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype='float32', param_dtype='float32'):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                            for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

  def rotary(self, positions_3BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cos_BTH, sin_BTH)`` float32 for 3-row M-RoPE positions ``[3, B, T]``."""
    inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta)
    return mrope_cos_sin(positions_3BT, inv_freq, self.cfg.mrope_section)

  def __call__(self, x_BTD: jax.Array, *, attention_mask_BT: jax.Array, positions_3BT: jax.Array,
               cache: Cache | None = None, cache_index: jax.Array | int = 0) -> tuple[jax.Array, Cache | None]:
    """Input embeddings ``x_BTD`` -> ``(normed hidden_BTD, new_cache or None)``.

    ``attention_mask_BT`` is 1 for real tokens and 0 for padding; ``positions_3BT`` are the M-RoPE positions of
    this call's tokens (see ``rope_index.py``). With a cache, this call's tokens occupy slots
    ``[cache_index, cache_index + T)``.
    """
    B, T, _ = x_BTD.shape
    if positions_3BT.shape != (3, B, T):
      raise ValueError(f'positions_3BT has shape {positions_3BT.shape}; expected (3, {B}, {T})')
    if attention_mask_BT.shape != (B, T):
      raise ValueError(f'attention_mask_BT has shape {attention_mask_BT.shape}; expected ({B}, {T})')
    cos_BTH, sin_BTH = self.rotary(positions_3BT)
    valid_BT = attention_mask_BT.astype(bool)
    if cache is None:
      key_mask_BS, query_slot_T = valid_BT, jnp.arange(T)
    else:
      S = cache['mask'].shape[1]
      # dynamic_update_slice clamps an out-of-range start (it would overwrite the last slots), so refuse it here
      # whenever the index is known; a traced index is the caller's (the sampler's) responsibility.
      if T > S or (not isinstance(cache_index, jax.core.Tracer) and not 0 <= int(cache_index) <= S - T):
        raise ValueError(f'cannot write {T} tokens at cache_index {cache_index} into a cache of {S} slots')
      key_mask_BS = jax.lax.dynamic_update_slice(cache['mask'], valid_BT, (0, cache_index))
      query_slot_T = cache_index + jnp.arange(T)
    mask_BTS = attention_mask_BTS(key_mask_BS, query_slot_T)
    x_BTD = x_BTD.astype(self.dtype)
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache['k'][i], cache['v'][i])
      x_BTD, new_kv = layer(x_BTD, cos_BTH, sin_BTH, mask_BTS, kv=kv, cache_index=cache_index)
      if new_kv is not None:
        new_k.append(new_kv[0])
        new_v.append(new_kv[1])
    new_cache = None if cache is None else {'k': tuple(new_k), 'v': tuple(new_v), 'mask': key_mask_BS}
    return self.norm(x_BTD), new_cache
