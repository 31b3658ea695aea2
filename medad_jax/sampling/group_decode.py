"""One decode step for G samples per prompt that *share* the prompt's KV cache instead of copying it G times.

Axis letters: see ``ops.py`` (K key/value heads, J query heads per KV head, H head dim, N completion slots).

The G samples of a prompt attend to the same prompt keys/values. ``text.repeat_cache`` would materialise them G
times and every decode step would read all ``B = P*G`` copies; here the cache is split in two::

    prefix  k, v [P, K, T, H] per layer, mask [P, T]   the prompt, written once by the prefill, read per prompt
    suffix  k, v [B, K, N, H] per layer                 the completion tokens, one row per sample

and attention takes one softmax over both parts: each query is scored against its prompt's prefix (an einsum with
the prompt axis ``P`` as a batch axis and ``G`` in the free dims) and its own suffix slots ``<= n``. Per step the
prefix is read P times instead of P*G times, and both parts are stored head-major (``[.., K, slots, H]``), the
layout the attention matmuls consume, so XLA:CPU does not transpose the cache every step (with ``text.py``'s
``[B, slots, K, H]`` cache it does, once per layer per step).

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

# {'prefix_k', 'prefix_v': tuple of [P, K, T, H], 'prefix_mask': [P, T], 'suffix_k', 'suffix_v': tuple of [B, K, N, H]}
GroupCache = dict


def group_cache(cache_P: dict, num_samples: int, max_new_tokens: int) -> GroupCache:
  """A prefilled ``text.py`` cache ``[P, T, K, H]`` -> a :data:`GroupCache` with empty suffixes for ``G`` samples."""
  prefix_k = tuple(jnp.transpose(k, (0, 2, 1, 3)) for k in cache_P['k'])
  prefix_v = tuple(jnp.transpose(v, (0, 2, 1, 3)) for v in cache_P['v'])
  P, K, _, H = prefix_k[0].shape
  empty = lambda x: jnp.zeros((P * num_samples, K, max_new_tokens, H), x.dtype)  # noqa: E731
  return {'prefix_k': prefix_k, 'prefix_v': prefix_v, 'prefix_mask': cache_P['mask'],
          'suffix_k': tuple(map(empty, prefix_k)), 'suffix_v': tuple(map(empty, prefix_v))}


def grouped_attention(q_BKJH: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_mask_PT: jax.Array,
                      suffix_k: jax.Array, suffix_v: jax.Array, slot: jax.Array, scale: float) -> jax.Array:
  """Single-token attention of ``B = P*G`` queries over their prompt's prefix and their own suffix ``[0, slot]``.

  ``q_BKJH``: query head ``k*J + j`` reads KV head ``k`` (transformers' ``repeat_kv`` order). ``prefix_k/v``:
  ``[P, K, T, H]``; ``suffix_k/v``: ``[B, K, N, H]``. Returns ``o_BKJH``.
  """
  B, K, J, H = q_BKJH.shape
  P, _, T, _ = prefix_k.shape
  G = B // P
  neg = -0.7 * float(np.finfo(np.float32).max)  # jax.nn.dot_product_attention's masked-logit value
  s_PGKJT = jnp.einsum('pgkjh,pkth->pgkjt', q_BKJH.reshape(P, G, K, J, H), prefix_k,
                       preferred_element_type=jnp.float32) * scale
  s_PGKJT = jnp.where(prefix_mask_PT[:, None, None, None, :], s_PGKJT, neg)
  s_BKJN = jnp.einsum('bkjh,bknh->bkjn', q_BKJH, suffix_k, preferred_element_type=jnp.float32) * scale
  s_BKJN = jnp.where(jnp.arange(suffix_k.shape[2]) <= slot, s_BKJN, neg)
  w = jax.nn.softmax(jnp.concatenate([s_PGKJT.reshape(B, K, J, T), s_BKJN], axis=-1), axis=-1)
  w = w.astype(prefix_v.dtype)
  o_pre = jnp.einsum('pgkjt,pkth->pgkjh', w[..., :T].reshape(P, G, K, J, T), prefix_v).reshape(B, K, J, H)
  return o_pre + jnp.einsum('bkjn,bknh->bkjh', w[..., T:], suffix_v)


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
    K, H = attn.num_kv_heads, attn.head_dim
    J = attn.num_heads // K
    q = apply_rope(attn.q_proj(h_B1D).reshape(B, 1, K * J, H), cos_B1H, sin_B1H)  # query head k*J + j
    q_BKJH = q.reshape(B, K, J, H)
    k_B1KH = apply_rope(attn.k_proj(h_B1D).reshape(B, 1, K, H), cos_B1H, sin_B1H)
    v_B1KH = attn.v_proj(h_B1D).reshape(B, 1, K, H)
    sk, sv = cache['suffix_k'][i], cache['suffix_v'][i]
    sk = jax.lax.dynamic_update_slice(sk, jnp.transpose(k_B1KH, (0, 2, 1, 3)).astype(sk.dtype), (0, 0, slot, 0))
    sv = jax.lax.dynamic_update_slice(sv, jnp.transpose(v_B1KH, (0, 2, 1, 3)).astype(sv.dtype), (0, 0, slot, 0))
    new_k.append(sk)
    new_v.append(sv)
    dt = q_BKJH.dtype
    o_BKJH = grouped_attention(q_BKJH, cache['prefix_k'][i].astype(dt), cache['prefix_v'][i].astype(dt),
                               cache['prefix_mask'], sk.astype(dt), sv.astype(dt), slot, H**-0.5)
    x_B1D = x_B1D + attn.o_proj(o_BKJH.reshape(B, 1, K * J * H))
    x_B1D = x_B1D + layer.mlp(layer.post_attention_layernorm(x_B1D))
  logits_BV = model.logits(text.norm(x_B1D))[:, 0]
  return logits_BV, {**cache, 'suffix_k': tuple(new_k), 'suffix_v': tuple(new_v)}
