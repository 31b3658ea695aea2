"""One decode step for G samples per prompt that *share* the prompt's KV cache instead of copying it G times.

Axis letters: see ``ops.py``; K key/value heads, j query heads per KV head (N_q = K * j), H head dim,
L decoder layers, n completion slot.

The G samples of a prompt attend to the same prompt keys/values. ``text.repeat_cache`` would materialise them G
times and every decode step would read all ``B = P*G`` copies; here the cache is split in two::

    prefix  k, v [P, K, T, H] per layer, mask [P, T]   the prompt, written once by the prefill, read per prompt
    suffix  k, v [B, K, N, H] per layer                 the completion tokens, one row per sample

and attention takes one softmax over both parts: each query is scored against its prompt's prefix (an einsum with
the prompt axis ``P`` as a batch axis and ``G`` in the free dims) and its own suffix slots ``<= n``. Per step the
prefix is read P times instead of P*G times, and both parts are stored head-major (``[.., K, S, H]``), the layout
the attention matmuls consume, so XLA:CPU does not transpose the cache every step (with ``text.py``'s ``[B, S, K,
H]`` cache it does, once per layer per step).

The layer maths is ``text.py``'s (same modules, same order, fp32 softmax, large-negative masking), re-assembled
around this attention; the sampler tests check the result against transformers' ``generate`` and against a
teacher-forced forward of the model. LoRA adapters apply as usual (the projections are the model's ``Linear``s).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medad_jax.model.qwen25vl import continuation_positions
from medad_jax.model.text import apply_rope

GroupCache = dict  # {'prefix_k', 'prefix_v': tuple[[P,K,T,H]], 'prefix_mask': [P,T], 'suffix_k', 'suffix_v': tuple[[B,K,N,H]]}


def group_cache(cache_P: dict, num_samples: int, max_new_tokens: int) -> GroupCache:
  """A prefilled ``text.py`` cache ``[P, T, K, H]`` -> a :data:`GroupCache` with empty suffixes for ``G`` samples."""
  prefix_k = tuple(jnp.transpose(k, (0, 2, 1, 3)) for k in cache_P['k'])
  prefix_v = tuple(jnp.transpose(v, (0, 2, 1, 3)) for v in cache_P['v'])
  P, K, _, H = prefix_k[0].shape
  empty = lambda x: jnp.zeros((P * num_samples, K, max_new_tokens, H), x.dtype)  # noqa: E731
  return {'prefix_k': prefix_k, 'prefix_v': prefix_v, 'prefix_mask': cache_P['mask'],
          'suffix_k': tuple(map(empty, prefix_k)), 'suffix_v': tuple(map(empty, prefix_v))}


def grouped_attention(q_BQH: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_mask_PT: jax.Array,
                      suffix_k: jax.Array, suffix_v: jax.Array, slot: jax.Array, scale: float) -> jax.Array:
  """Single-token attention of ``B = P*G`` queries over their prompt's prefix and their own suffix ``[0, slot]``.

  ``q_BQH``: ``Q = K * j`` query heads (head ``k*j + i`` reads KV head ``k``, as ``repeat_kv``). Returns
  ``[B, Q*H]``.
  """
  B, Q, H = q_BQH.shape
  P, K, T, _ = prefix_k.shape
  G, j = B // P, Q // K
  neg = -0.7 * float(np.finfo(np.float32).max)  # jax.nn.dot_product_attention's masked-logit value
  q_PGKjH = q_BQH.reshape(P, G, K, j, H)
  s_pre = jnp.einsum('pgkjh,pkth->pgkjt', q_PGKjH, prefix_k, preferred_element_type=jnp.float32) * scale
  s_pre = jnp.where(prefix_mask_PT[:, None, None, None, :], s_pre, neg)
  q_BKjH = q_BQH.reshape(B, K, j, H)
  s_suf = jnp.einsum('bkjh,bknh->bkjn', q_BKjH, suffix_k, preferred_element_type=jnp.float32) * scale
  s_suf = jnp.where(jnp.arange(suffix_k.shape[2]) <= slot, s_suf, neg)
  w = jax.nn.softmax(jnp.concatenate([s_pre.reshape(B, K, j, T), s_suf], axis=-1), axis=-1).astype(prefix_v.dtype)
  o_pre = jnp.einsum('pgkjt,pkth->pgkjh', w[..., :T].reshape(P, G, K, j, T), prefix_v).reshape(B, K, j, H)
  o_suf = jnp.einsum('bkjn,bknh->bkjh', w[..., T:], suffix_v)
  return (o_pre + o_suf).reshape(B, Q * H)


def decode_step(model, tokens_B: jax.Array, slot: jax.Array, rope_deltas_B: jax.Array, cache: GroupCache
                ) -> tuple[jax.Array, GroupCache]:
  """Feeds one token per row (completion slot ``slot``, position ``T + slot + delta``) -> ``(logits_BV, cache)``."""
  text = model.model
  B = tokens_B.shape[0]
  T = cache['prefix_mask'].shape[1]
  x_B1D = text.embed_tokens(tokens_B[:, None]).astype(text.dtype)
  cos_B1H, sin_B1H = text.rotary(continuation_positions(T + slot, rope_deltas_B))
  new_k, new_v = [], []
  for i, layer in enumerate(text.layers):
    attn = layer.self_attn
    h_B1D = layer.input_layernorm(x_B1D)
    q_B1QH = apply_rope(attn.q_proj(h_B1D).reshape(B, 1, attn.num_heads, attn.head_dim), cos_B1H, sin_B1H)
    k_B1KH = apply_rope(attn.k_proj(h_B1D).reshape(B, 1, attn.num_kv_heads, attn.head_dim), cos_B1H, sin_B1H)
    v_B1KH = attn.v_proj(h_B1D).reshape(B, 1, attn.num_kv_heads, attn.head_dim)
    sk, sv = cache['suffix_k'][i], cache['suffix_v'][i]
    sk = jax.lax.dynamic_update_slice(sk, jnp.transpose(k_B1KH, (0, 2, 1, 3)).astype(sk.dtype), (0, 0, slot, 0))
    sv = jax.lax.dynamic_update_slice(sv, jnp.transpose(v_B1KH, (0, 2, 1, 3)).astype(sv.dtype), (0, 0, slot, 0))
    new_k.append(sk)
    new_v.append(sv)
    dt = q_B1QH.dtype
    o_BX = grouped_attention(q_B1QH[:, 0], cache['prefix_k'][i].astype(dt), cache['prefix_v'][i].astype(dt),
                             cache['prefix_mask'], sk.astype(dt), sv.astype(dt), slot, attn.head_dim**-0.5)
    x_B1D = x_B1D + attn.o_proj(o_BX[:, None, :])
    x_B1D = x_B1D + layer.mlp(layer.post_attention_layernorm(x_B1D))
  logits_BV = model.logits(text.norm(x_B1D))[:, 0]
  return logits_BV, {**cache, 'suffix_k': tuple(new_k), 'suffix_v': tuple(new_v)}
