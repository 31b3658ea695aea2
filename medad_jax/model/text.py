"""The Qwen2.5-VL text decoder: GQA attention with M-RoPE, KV caches and a shared-prompt prefix, SiLU-gated MLP.

Axis legend (as in ``layers.py``):
  B batch (rows)   T query length (this call's tokens)   S key length (this call's keys, or the cache's slots)
  P prompts when a prefix is shared (B = P * G rows, row ``p*G + g`` reads prompt ``p``)   G rows per prompt
  D model width    F MLP width        N query heads        K key/value heads        J query heads per KV head
  H head dim       h rotary frequencies (H/2)             V vocabulary             L decoder layers

This file holds the ONE decoder-layer implementation. The forward (``Qwen25VL``), the sampler's prefill and
decode (``sampling/sampler.py``) and the training steps (``rl/update.py``) all run :class:`TextModel`; what
differs between them is only which keys a query sees:

* no cache (SFT, any plain forward): the keys are this call's ``T`` tokens, causal, padding (``attention_mask``
  0) never attended. With ``return_kv=True`` the call also returns its keys/values as a :data:`Cache` of ``T``
  slots (the sampler's prefill and the update's prompt pass).
* ``cache`` (with ``cache_index``): this call's keys/values are written at slots ``[cache_index, cache_index+T)``
  of a static-shape cache and queries attend to every valid slot ``s <= cache_index + t`` (greedy decoding).
* ``prefix`` (a prompt :data:`Cache` of ``P`` rows) in addition to either of the above: the ``B = P*G`` rows share
  their prompt's keys/values, which are stored and read once per prompt, never copied G times; one softmax spans
  the prefix and the row's own keys. The sampler decodes with it (own keys = a per-sample completion cache) and the
  Con-GRPO update teacher-forces the G completions of a prompt against it (own keys = the completion tokens).

M-RoPE: every token has three positions (temporal, height, width) ``positions_3BT``; text tokens carry the same
value in all three rows. The ``H/2`` rotary frequencies are split into ``mrope_section`` chunks (e.g. 16/24/24
for the 3B model) and chunk ``i`` is rotated by position row ``i % 3`` (exactly transformers'
``Qwen2_5_VLRotaryEmbedding.recomposition_frequencies``). cos/sin and the rotation are computed in float32.

KV cache layout (a plain pytree; every leaf has the rows on axis 0; keys and values are stored head-major, the
layout the attention matmuls consume, so XLA:CPU does not transpose the cache on every decode step)::

    cache = {
        'k': (k_BKSH for each of the L layers),   # tuple; keys after the rotary embedding, in the compute dtype
        'v': (v_BKSH for each of the L layers),   # tuple
        'mask': mask_BS,                          # bool; True where the slot holds a real (non-pad) token
    }

Slots not yet written start with ``mask`` False, so they are never attended. Left padding and finished rows are
handled by writing ``attention_mask_BT`` = 0 for their tokens: those slots never become keys.

Attention implementations (``Qwen25VLConfig.attention``): ``'xla'`` is written here with einsums (logits and
softmax in float32, masked logits at jax.nn.dot_product_attention's large finite negative, so fully masked pad
rows stay finite); it is the only one that handles a shared prefix without copying it, and the one the CPU tests
use. ``'cudnn'`` calls ``jax.nn.dot_product_attention(implementation='cudnn')`` (GPU, bf16/fp16; the prefix is
then repeated G times, as cuDNN takes one key sequence per row). ``'auto'`` = cuDNN on GPU with a 16-bit compute
dtype, else XLA. A TPU splash-attention kernel would plug in at :func:`attention` (the same arguments).

Rematerialisation (``Qwen25VLConfig.remat``): ``'none'``; ``'full'`` keeps only each layer's input for the
backward pass and recomputes the rest; ``'dots'`` also keeps the matmul outputs without batch dimensions
(``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``). With remat, every cache-free call (SFT, the
update's prompt and completion passes, the sampler's prefill) runs the layers as one ``lax.scan`` over the layer
index with a checkpointed body that picks its layer's weights (:meth:`TextModel._scan_layers`): XLA then keeps
only each layer's input and recomputes one layer at a time in the backward. Unrolled, XLA:CPU kept 0.86-0.99 of
the no-remat activations (its scheduler runs the recomputations early); under the scan the 3B Con-GRPO update at
the paper's shapes needs 19.8 GiB of temporaries instead of about 258 GiB
(``python -m medad_jax.bench paper_scale``).
The cached decode path keeps a per-layer loop unless ``Qwen25VLConfig.decode_scan`` (then the same scan, with
each layer's cache slices picked beside its weights: on XLA:CPU with bf16 weights this keeps one layer's fp32
weight copy live instead of the whole decoder's, see :meth:`TextModel._scan_layers`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medad_jax.model.config import TextConfig
from medad_jax.model.layers import Embed, Linear, RMSNorm

Cache = dict  # {'k': tuple[k_BKSH], 'v': tuple[v_BKSH], 'mask': mask_BS}; see the module docstring.

ATTENTION_IMPLEMENTATIONS = ('xla', 'cudnn', 'auto')
REMAT_POLICIES = ('none', 'full', 'dots')
# jax.nn.dot_product_attention's value for masked logits (finite, so an all-masked row gives a uniform softmax).
MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)


def remat_policy(name: str):
  """``Qwen25VLConfig.remat`` -> the ``jax.checkpoint`` policy (None = save nothing but the inputs)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f'remat={name!r}: expected one of {REMAT_POLICIES}')
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable if name == 'dots' else None


def resolve_attention(name: str, dtype) -> str:
  """``'auto'`` -> ``'cudnn'`` on GPU with a 16-bit compute dtype, else ``'xla'``."""
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'attention={name!r}: expected one of {ATTENTION_IMPLEMENTATIONS}')
  if name == 'auto':
    gpu = jax.default_backend() == 'gpu'
    return 'cudnn' if gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else 'xla'
  return name


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
  """Causal + key-validity mask: query ``t`` (at slot ``query_slot_T[t]``) sees valid slots ``s <= slot``."""
  S = key_mask_BS.shape[1]
  causal_TS = jnp.arange(S)[None, :] <= query_slot_T[:, None]
  return key_mask_BS[:, None, :] & causal_TS[None]


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype='float32') -> Cache:
  """An empty cache of ``max_len`` slots (every slot invalid)."""
  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  zeros = lambda: jnp.zeros(shape, jnp.dtype(dtype))  # noqa: E731
  return {'k': tuple(zeros() for _ in range(cfg.num_layers)), 'v': tuple(zeros() for _ in range(cfg.num_layers)),
          'mask': jnp.zeros((batch, max_len), bool)}


def repeat_cache(cache: Cache, n: int) -> Cache:
  """Each row repeated ``n`` times in place (row ``b`` -> rows ``b*n .. b*n+n-1``). A reference for tests: the
  sampler and the update share a prompt through ``prefix=`` instead of copying it."""
  return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), cache)


def attention(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array, *,
              prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None, implementation: str = 'xla'
              ) -> jax.Array:
  """GQA attention of ``q`` over the row's own keys and, optionally, a prefix shared by groups of rows.

  ``q_BTNH`` (query head ``k*J + j`` reads KV head ``k``: transformers' ``repeat_kv`` order); own keys/values
  ``[B, K, S, H]`` with ``mask_BTS``; ``prefix = (k_PKSH, v_PKSH, mask_PS)`` read by rows ``p*G .. p*G+G-1``
  (every prefix key precedes every own key). Returns ``o_BTNH`` in the values' dtype.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BKSH.shape[1]
  J = N // K
  scale = H**-0.5
  if implementation == 'cudnn':
    k, v, m = k_BKSH, v_BKSH, mask_BTS
    if prefix is not None:
      pk, pv, pm = prefix
      G = B // pk.shape[0]
      k = jnp.concatenate([jnp.repeat(pk, G, axis=0), k], axis=2)
      v = jnp.concatenate([jnp.repeat(pv, G, axis=0), v], axis=2)
      m = jnp.concatenate([jnp.broadcast_to(jnp.repeat(pm, G, axis=0)[:, None], (B, T, pm.shape[1])), m], axis=2)
    return jax.nn.dot_product_attention(q_BTNH, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask=m[:, None],
                                        scale=scale, implementation='cudnn')
  if implementation != 'xla':
    raise ValueError(f'attention implementation {implementation!r}: expected xla or cudnn (resolve auto first)')
  # One query per row (decode): the same maths without the size-1 query axis. XLA:CPU copies around a degenerate
  # dimension of a dot; dropping it made the tiny preset's decode 1.2-1.4x faster (`python -m medad_jax.bench sampler`
  # "our decode": 0.051-0.058 -> 0.041 s, 64 steps).
  t = 't' if T > 1 else ''
  q = q_BTNH.reshape((B, T, K, J, H) if t else (B, K, J, H))
  s_own = jnp.einsum(f'b{t}kjh,bksh->bkj{t}s', q, k_BKSH, preferred_element_type=jnp.float32) * scale
  s_own = jnp.where((mask_BTS if t else mask_BTS[:, 0])[:, None, None], s_own, MASKED_LOGIT)   # [B, K, J, (T,) S]
  if prefix is None:
    w = jax.nn.softmax(s_own, axis=-1).astype(v_BKSH.dtype)
    return _weighted_values(w, v_BKSH, t).reshape(B, T, N, H)
  pk_PKRH, pv_PKRH, pm_PR = prefix
  P, R = pk_PKRH.shape[0], pk_PKRH.shape[2]
  G = B // P
  s_pre = jnp.einsum(f'pg{t}kjh,pkrh->pgkj{t}r', q.reshape((P, G) + q.shape[1:]), pk_PKRH,
                     preferred_element_type=jnp.float32) * scale
  s_pre = jnp.where(pm_PR.reshape((P, 1, 1, 1) + (1,) * len(t) + (R,)), s_pre, MASKED_LOGIT)
  s_all = jnp.concatenate([s_pre.reshape(s_own.shape[:-1] + (R,)), s_own], axis=-1)
  w = jax.nn.softmax(s_all, axis=-1).astype(v_BKSH.dtype)
  w_pre = w[..., :R].reshape((P, G) + s_own.shape[1:-1] + (R,))
  if t:
    o_pre = jnp.einsum('pgkjtr,pkrh->pgtkjh', w_pre, pv_PKRH)
  else:   # decode: see _weighted_values
    o_pre = _sum_products(w_pre[..., None], pv_PKRH[:, None, :, None])
  o_own = _weighted_values(w[..., R:], v_BKSH, t)
  return (o_pre.reshape(o_own.shape) + o_own).reshape(B, T, N, H)


def _weighted_values(w_BKJTS: jax.Array, v_BKSH: jax.Array, t: str) -> jax.Array:
  """``sum_s w[b,k,j,(t,)s] v[b,k,s,h]`` -> ``[B, (T,) K, J, H]``. With one query per row (``t == ''``, decode) a
  multiply-and-sum over the keys, not a dot: XLA:CPU ran that batched dot (J = 2 rows per batch element) in a
  transposed layout at ~2 GFLOP/s. ``python -m medad_jax.bench opprofile --what decode --configs mini --prompts 16
  --group 2 --prompt-len 150 --new-tokens 96``: one decode call 1.79 -> 1.13 s (WORKSPACE.md "Where the time goes").
  The scores stay dots (as a multiply-and-sum they were slower)."""
  if t:
    return jnp.einsum('bkjts,bksh->btkjh', w_BKJTS, v_BKSH)
  return _sum_products(w_BKJTS[..., None], v_BKSH[:, :, None])


def _sum_products(w: jax.Array, v: jax.Array) -> jax.Array:
  """``sum(w * v, axis=-2)`` accumulated in float32 (as a dot would), in the values' dtype."""
  f32 = jnp.float32
  return jnp.sum(w.astype(f32) * v.astype(f32), axis=-2).astype(v.dtype)


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
  """Grouped-query self-attention with q/k/v biases, M-RoPE, optional KV cache and shared prefix."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype='float32', param_dtype='float32',
               implementation: str = 'xla'):
    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(f'hidden_size {cfg.hidden_size}, num_heads {cfg.num_heads}, num_kv_heads '
                       f'{cfg.num_kv_heads}: expected hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0')
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.implementation = resolve_attention(implementation, dtype)
    D, H = cfg.hidden_size, cfg.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = Linear(D, cfg.num_heads * H, use_bias=True, **kw)
    self.k_proj = Linear(D, cfg.num_kv_heads * H, use_bias=True, **kw)
    self.v_proj = Linear(D, cfg.num_kv_heads * H, use_bias=True, **kw)
    self.o_proj = Linear(cfg.num_heads * H, D, use_bias=False, **kw)

  def __call__(self, x_BTD: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array, mask_BTS: jax.Array, *,
               kv: tuple[jax.Array, jax.Array] | None = None, cache_index: jax.Array | int = 0,
               prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Returns ``(y_BTD, (k, v))``: this call's keys/values ``[B, K, T, H]`` without ``kv``, else the updated
    cache slices ``[B, K, S, H]`` (written at ``cache_index``). See :func:`attention` for ``prefix``."""
    B, T, _ = x_BTD.shape
    q_BTNH = apply_rope(self.q_proj(x_BTD).reshape(B, T, self.num_heads, self.head_dim), cos_BTH, sin_BTH)
    k_BTKH = apply_rope(self.k_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim), cos_BTH, sin_BTH)
    v_BTKH = self.v_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim)
    k_BKTH, v_BKTH = jnp.swapaxes(k_BTKH, 1, 2), jnp.swapaxes(v_BTKH, 1, 2)
    if kv is not None:
      k_cache, v_cache = kv
      start = (0, 0, cache_index, 0)
      k_BKSH = jax.lax.dynamic_update_slice(k_cache, k_BKTH.astype(k_cache.dtype), start)
      v_BKSH = jax.lax.dynamic_update_slice(v_cache, v_BKTH.astype(v_cache.dtype), start)
      new_kv = (k_BKSH, v_BKSH)
    else:
      k_BKSH, v_BKSH = k_BKTH, v_BKTH
      new_kv = (k_BKTH, v_BKTH)
    dt = q_BTNH.dtype
    pre = None if prefix is None else (prefix[0].astype(dt), prefix[1].astype(dt), prefix[2])
    o_BTNH = attention(q_BTNH, k_BKSH.astype(dt), v_BKSH.astype(dt), mask_BTS, prefix=pre,
                       implementation=self.implementation)
    return self.o_proj(o_BTNH.reshape(B, T, self.num_heads * self.head_dim)), new_kv


class DecoderLayer(nnx.Module):
  """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype='float32', param_dtype='float32',
               attention: str = 'xla'):
    self.self_attn = Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, implementation=attention)
    self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

  def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_BTS, kv=None, cache_index=0, prefix=None):
    """Returns ``(x_BTD, (k, v))``; see :meth:`Attention.__call__`."""
    h_BTD, new_kv = self.self_attn(self.input_layernorm(x_BTD), cos_BTH, sin_BTH, mask_BTS, kv=kv,
                                   cache_index=cache_index, prefix=prefix)
    x_BTD = x_BTD + h_BTD
    x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
    return x_BTD, new_kv


def _run_layer(layer: DecoderLayer, x_BTD, cos_BTH, sin_BTH, mask_BTS, kv, cache_index, prefix):
  return layer(x_BTD, cos_BTH, sin_BTH, mask_BTS, kv, cache_index, prefix)


class TextModel(nnx.Module):
  """Token embedding, ``L`` decoder layers and the final norm (HF ``Qwen2_5_VLTextModel``)."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype='float32', param_dtype='float32',
               attention: str = 'xla', remat: str = 'none', decode_scan: bool = False):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    remat_policy(remat)  # validates the name
    self.remat = remat
    self.decode_scan = bool(decode_scan)
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention=attention)
                            for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

  def _uniform_layers(self) -> bool:
    """True when every decoder layer has the same structure (always, unless LoRA adapters were added to some
    layers only): then the cache-free forward scans one layer program over the stacked layer weights."""
    first = nnx.graphdef(self.layers[0])
    return all(nnx.graphdef(layer) == first for layer in self.layers[1:])

  def _scan_layers(self, x_BTD, cos_BTH, sin_BTH, mask_BTS, prefix, key_mask_BS, return_kv, cache=None,
                   cache_index=0):
    """The ``L`` layers as one ``lax.scan`` over their stacked weights (and stacked prefix keys/values).

    Why a scan: XLA schedules a rematerialised *unrolled* stack so that the recomputed activations of many layers
    are live at once (measured: remat saved almost nothing on XLA:CPU); under ``lax.scan`` the backward pass
    recomputes and frees one layer per iteration, so only each layer's input (``[L, B, T, D]``) is kept. The
    parameters stay a list of layers (checkpoint keys, LoRA patterns and sharding rules are per layer); each
    iteration picks its layer's arrays with a ``lax.switch`` (no stacked copy of the decoder: stacking cost 5.3 GiB
    per call for the 3B in bf16, and XLA:CPU built it in fp32 -- the 3B Con-GRPO update's temporaries fell from
    29.6 to 19.8 GiB).

    With ``cache`` (``decode_scan``): each iteration also picks its layer's cache slices, and only this call's
    ``T`` new slots leave the scan; they are written into each layer's cache after it (in place). Why: in the
    sampler's ``while_loop`` the unrolled loop's weights are loop invariants, and XLA:CPU (no bf16 matmul) hoists
    an fp32 convert of *every* bf16 decoder weight out of the loop (11.5 GiB for the 3B); here each convert
    depends on the layer index, so one layer's copy is live at a time. The cost is a copy of one layer's cache
    slices per layer and token.
    """
    graphdef = nnx.graphdef(self.layers[0])
    states = [nnx.state(layer) for layer in self.layers]
    pre_mask = None if prefix is None else prefix['mask']
    pre_kv = None if prefix is None else (jnp.stack(prefix['k']), jnp.stack(prefix['v']))

    n = len(self.layers)
    own = None if cache is None else [(cache['k'][i], cache['v'][i]) for i in range(n)]
    T = x_BTD.shape[1]

    def body(x, xs):
      i, kv = xs
      # Layer i's weights, picked by a switch over the layers' own arrays (closed over: the loop's invariant
      # operands) instead of a stacked [L, ...] copy of the decoder made at every call (5.3 GiB for the 3B in
      # bf16; XLA:CPU, which has no bf16 matmul, even built it in fp32). One layer's weights per iteration.
      if own is None:
        state, own_kv = jax.lax.switch(i, [lambda s=s: s for s in states]), None
      else:
        state, own_kv = jax.lax.switch(i, [lambda s=s, c=c: (s, c) for s, c in zip(states, own)])
      # Cost: the switch's transpose returns a cotangent for every layer's *trainable* arrays (zeros but layer i's),
      # which the scan's backward accumulates each iteration -- L x (trainable size) adds per backward: small for
      # LoRA adapters, a real cost for full fine-tuning under remat (frozen weights get no cotangent).
      layer = nnx.merge(graphdef, state)
      pre = None if kv is None else (kv[0], kv[1], pre_mask)
      x, (k, v) = layer(x, cos_BTH, sin_BTH, mask_BTS, own_kv, cache_index, pre)
      if own_kv is not None:   # only this call's slots leave the scan
        k, v = (jax.lax.dynamic_slice_in_dim(a, cache_index, T, axis=2) for a in (k, v))
      return x, ((k, v) if return_kv or own_kv is not None else None)

    if self.remat != 'none' and cache is None:
      body = jax.checkpoint(body, policy=remat_policy(self.remat), prevent_cse=False)
    x_BTD, kv_L = jax.lax.scan(body, x_BTD, (jnp.arange(n), pre_kv))
    if cache is not None:
      k_L, v_L = kv_L
      start = (0, 0, cache_index, 0)
      put = lambda c, new: jax.lax.dynamic_update_slice(c, new.astype(c.dtype), start)  # noqa: E731
      return x_BTD, {'k': tuple(put(cache['k'][i], k_L[i]) for i in range(n)),
                     'v': tuple(put(cache['v'][i], v_L[i]) for i in range(n)), 'mask': key_mask_BS}
    if not return_kv:
      return x_BTD, None
    k_L, v_L = kv_L
    return x_BTD, {'k': tuple(k_L[i] for i in range(n)), 'v': tuple(v_L[i] for i in range(n)), 'mask': key_mask_BS}

  def rotary(self, positions_3BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cos_BTH, sin_BTH)`` float32 for 3-row M-RoPE positions ``[3, B, T]``."""
    inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta)
    return mrope_cos_sin(positions_3BT, inv_freq, self.cfg.mrope_section)

  def __call__(self, x_BTD: jax.Array, *, attention_mask_BT: jax.Array, positions_3BT: jax.Array,
               cache: Cache | None = None, cache_index: jax.Array | int = 0, prefix: Cache | None = None,
               return_kv: bool = False) -> tuple[jax.Array, Cache | None]:
    """Input embeddings ``x_BTD`` -> ``(normed hidden_BTD, cache or None)``.

    ``attention_mask_BT`` is 1 for real tokens and 0 for padding; ``positions_3BT`` are the M-RoPE positions of
    this call's tokens (see ``rope_index.py``). With ``cache``, this call's tokens occupy slots
    ``[cache_index, cache_index + T)`` and the updated cache is returned; without, ``return_kv=True`` returns this
    call's keys/values as a cache of ``T`` slots. ``prefix``: a prompt cache of ``P`` rows shared by the ``B``
    rows in groups of ``B // P`` (see the module docstring).
    """
    B, T, _ = x_BTD.shape
    if positions_3BT.shape != (3, B, T):
      raise ValueError(f'positions_3BT has shape {positions_3BT.shape}; expected (3, {B}, {T})')
    if attention_mask_BT.shape != (B, T):
      raise ValueError(f'attention_mask_BT has shape {attention_mask_BT.shape}; expected ({B}, {T})')
    pre = None
    if prefix is not None:
      P = prefix['mask'].shape[0]
      if B % P:
        raise ValueError(f'{B} rows cannot share a prefix of {P} prompts: expected a multiple of {P}')
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
    scan = self.decode_scan if cache is not None else self.remat != 'none'
    if scan and self._uniform_layers():
      x_BTD, new_cache = self._scan_layers(x_BTD, cos_BTH, sin_BTH, mask_BTS, prefix, key_mask_BS, return_kv,
                                           cache, cache_index)
      return self.norm(x_BTD), new_cache
    run = _run_layer
    if self.remat != 'none':
      # graph_updates=False: the layer is only read, and the step may run it under jax.vmap / lax.scan traces.
      run = nnx.remat(_run_layer, policy=remat_policy(self.remat), graph_updates=False)
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache['k'][i], cache['v'][i])
      if prefix is not None:
        pre = (prefix['k'][i], prefix['v'][i], prefix['mask'])
      x_BTD, (k, v) = run(layer, x_BTD, cos_BTH, sin_BTH, mask_BTS, kv, cache_index, pre)
      new_k.append(k)
      new_v.append(v)
    if cache is not None or return_kv:
      new_cache = {'k': tuple(new_k), 'v': tuple(new_v), 'mask': key_mask_BS}
    else:
      new_cache = None
    return self.norm(x_BTD), new_cache
