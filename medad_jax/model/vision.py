"""Qwen2.5-VL vision encoder (``Qwen2_5_VisionTransformerPretrainedModel``) in Flax NNX.

Axis legend (extends the one in ``layers.py``; letters not listed there are defined here):
  L patches (vision tokens)        P patch vector (C*Tp*p*p)         D vision width      F MLP width
  N heads                          H head dim                        E rotary frequencies (H // 4)
  M merged tokens (L // U)         U patches per merged token (merge**2)
  O out_hidden_size (LLM width)    G images/videos (grid_thw rows)   X any trailing feature axes

Data flow, per forward pass (HF does the same, in this order):

1. ``patch_embed``: the processor's ``pixel_values[L, P]`` rows are the flattened (C, Tp, p, p) voxels of each
   patch, so HF's Conv3d with kernel == stride is exactly ``pixel_values @ kernel[P, D]``.
2. Window permutation: patches are reordered (in whole merge units of U patches) so that every attention window
   of ``window_size`` pixels is one contiguous run of tokens. Rotary positions are permuted the same way.
3. ``depth`` pre-norm blocks; blocks listed in ``fullatt_block_indexes`` attend over a whole image (per frame),
   the others only inside their window.
4. ``merger``: RMSNorm, then U consecutive patches (one 2x2 merge unit) are concatenated and sent through a
   GELU MLP to the LLM width; the inverse permutation restores the processor's (raster, merge-unit) order.

Everything that depends on ``grid_thw`` *values* is computed on the host by :func:`vision_meta`, so the jitted
forward only sees arrays of static shape (it recompiles only when the total patch count ``L`` changes; use
``vision_meta(..., pad_to=...)`` with a few bucket sizes to bound that).

Attention and HF's ``cu_seqlens``: HF packs all images into one sequence and runs attention separately on each
``[cu_seqlens[i], cu_seqlens[i+1])`` slice (``cu_seqlens`` = one slice per image frame for full blocks,
``cu_window_seqlens`` = one slice per window for window blocks). Here each patch carries a *segment id*
(``VisionMeta.full_seg_L`` / ``window_seg_L``): slice ``i`` of HF's ``cu_seqlens`` is exactly the run of patches
whose segment id is ``i``, and a patch attends to the patches with its own id (``seg[q] == seg[k]``). Masked
logits get a large negative value before an fp32 softmax, so their weight is exactly 0 and the result equals HF's
per-slice attention up to summation order. Two layouts keep memory linear in ``L`` for a given image size:

* Window blocks (:func:`windowed_segment_attention`): a window is one contiguous run of at most
  ``Wl = (window_size / patch_size)**2`` patches (:func:`vision_meta` checks it, padding included), so the call is
  cut into chunks of ``Wl`` queries and chunk ``c`` attends to the ``3 * Wl`` keys of chunks ``c-1..c+1`` under the
  same mask: exact, with ``[L / Wl, N, Wl, 3 * Wl]`` logits instead of ``[N, L, L]``, and no attention between
  windows of different images even when several images share a call.
* Full blocks (:func:`segment_attention`): every query sees every key of the call under the frame mask, computed
  ``4 * Wl`` queries at a time in a rematerialised loop (``xla``), so ``[N, 4 * Wl, L]`` logits are alive at once.
  Called on ONE image (``jax.vmap`` over images, as ``sampling.sampler.embed_prompts`` does), that is attention
  over that image's frames; in a packed multi-image call (``Qwen25VL.embed``, HF-style parity) no weight crosses
  images either, but the loop still multiplies every query with all ``L`` keys of the call: compute grows with
  ``L**2`` and each step's logits with ``L``, so pack few images per call.

Measured (XLA:CPU ``memory_analysis()`` temporaries of the 3B tower's fp32 forward, abstract parameters;
``python -m medad_jax.testing.vision_ref --preset=qwen2_5_vl_3b --side=32 --side=72``): one 448-px image
(L=1,024) 0.076 GiB, against 0.197 GiB with one ``[L, L]`` mask per block (the previous implementation); one
1008-px image (L=5,184) 0.53 GiB against 4.92 GiB. ``tests/test_vision.py`` checks the same ordering on the small
preset. With ``attn_implementation='cudnn'`` (GPU, bf16/fp16 only; not exercised by the CPU test suite) the same
calls go to cuDNN's fused kernel with the masks as additive biases (``[L / Wl, 1, Wl, 3 * Wl]`` for window blocks,
``[1, 1, L, L]`` for full blocks, without the query loop); logits are never stored.

``remat`` (``VisionTransformer(remat=...)``) wraps each block in ``nnx.remat``: ``'full'`` keeps only the block
inputs for the backward, ``'dots'`` also the weight-matmul outputs (``checkpoint_dots_with_no_batch_dims``); the
outputs and gradients are unchanged (``tests/test_vision.py``).

dtype policy: parameters are stored in ``param_dtype`` and cast to the compute ``dtype`` at use; RMSNorm
statistics, rotary embeddings and the attention softmax are always float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medad_jax.model.config import VisionConfig
from medad_jax.model.layers import Linear, RMSNorm

# ---------------------------------------------------------------------------------------------- host-side meta


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionMeta:
  """Per-call index arrays derived from ``grid_thw`` (all int32 except ``valid_M``); a pytree for ``jax.jit``.

  Patch-level arrays are in *window order* (the order the transformer blocks see). ``window_index_M[j]`` is the
  original (processor-order) merged token placed at window-order position ``j`` (HF's ``window_index``);
  ``reverse_index_M`` is its inverse (HF's ``argsort(window_index)``). With ``pad_to``, the tail of every array
  describes padding patches: their own segment, rotary position (0, 0), and ``valid_M`` False.
  """

  pos_L2: np.ndarray | jax.Array  # (row, col) of each patch in its image, for the 2D rotary embedding
  window_seg_L: np.ndarray | jax.Array  # segment id for window-attention blocks (one id per window)
  full_seg_L: np.ndarray | jax.Array  # segment id for full-attention blocks (one id per image frame)
  window_index_M: np.ndarray | jax.Array
  reverse_index_M: np.ndarray | jax.Array
  valid_M: np.ndarray | jax.Array  # bool: False for merged tokens that only hold padding


def _check_grid(grid_thw, cfg: VisionConfig) -> np.ndarray:
  grid = np.asarray(grid_thw)
  if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
    raise ValueError(f'grid_thw: expected an integer array of shape [num_images, 3] (t, h, w), got shape '
                     f'{grid.shape}')
  if not np.issubdtype(grid.dtype, np.integer):
    raise ValueError(f'grid_thw: expected integers, got dtype {grid.dtype}')
  m = cfg.spatial_merge_size
  for i, (t, h, w) in enumerate(grid.tolist()):
    if t < 1 or h < 1 or w < 1:
      raise ValueError(f'grid_thw[{i}] = {(t, h, w)}: every entry must be >= 1')
    if h % m or w % m:
      raise ValueError(f'grid_thw[{i}] = {(t, h, w)}: height and width (in patches) must be multiples of '
                       f'spatial_merge_size={m}')
  return grid.astype(np.int64)


def _window_order(t: int, mh: int, mw: int, win: int) -> tuple[np.ndarray, np.ndarray]:
  """Merge units of one image (``t`` frames of ``mh x mw`` units) in window order, and each window's size.

  Windows tile every frame row-major, ``win x win`` units each; windows at the bottom/right edges are partial
  (HF pads the index grid with -100 and drops the padding, which is what the ``valid`` mask does here).
  Returns ``(order[t*mh*mw], counts[num_windows])``.
  """
  nh, nw = -(-mh // win), -(-mw // win)
  grid = np.full((t, nh * win, nw * win), -1, np.int64)
  grid[:, :mh, :mw] = np.arange(t * mh * mw).reshape(t, mh, mw)
  grid = grid.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
  valid = grid >= 0
  return grid[valid], valid.sum(-1)


def _patch_positions(t: int, h: int, w: int, m: int) -> np.ndarray:
  """(row, col) of each patch in processor order: raster over merge units, raster inside a unit. [t*h*w, 2]."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  to_units = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
  return np.tile(np.stack([to_units(rows), to_units(cols)], -1), (t, 1))


def window_len(cfg: VisionConfig) -> int:
  """``Wl``: the most patches one attention window holds, ``(window_size // patch_size)**2`` (whole merge units)."""
  return (cfg.window_size // cfg.spatial_merge_size // cfg.patch_size)**2 * cfg.spatial_merge_size**2


def full_attn_query_chunk(cfg: VisionConfig) -> int:
  """Queries per step of the full-attention blocks' ``xla`` loop (:func:`segment_attention`): ``4 * Wl`` (256
  for the released towers), so their logits stay within ``4 / 3`` of a window block's (``[N, L, 3 * Wl]``)."""
  return 4 * window_len(cfg)


def _check_window_runs(seg_L: np.ndarray, wl: int, grid: np.ndarray) -> None:
  """The window blocks' exactness condition: every window id is ONE contiguous run of at most ``wl`` patches."""
  starts = np.concatenate([[0], np.flatnonzero(np.diff(seg_L)) + 1])
  lengths = np.diff(np.concatenate([starts, [len(seg_L)]]))
  ids = seg_L[starts]
  if len(np.unique(ids)) != len(ids) or lengths.max() > wl:
    raise ValueError(f'vision_meta: window segments of grid_thw {grid.tolist()} are not contiguous runs of at '
                     f'most {wl} patches (run lengths {sorted(set(lengths.tolist()))}); the blockwise window '
                     f'attention would not be exact')


def vision_meta(grid_thw, cfg: VisionConfig, *, pad_to: int | None = None) -> VisionMeta:
  """Host-side index arrays for :class:`VisionTransformer` from ``grid_thw[G, 3]`` (t, h, w in patches).

  ``pad_to`` (a multiple of ``spatial_merge_size**2``, >= the patch count) appends padding patches so calls with
  different images share one compiled shape; feed zero rows of ``pixel_values`` for them and drop the output rows
  where ``valid_M`` is False (they come last).
  """
  grid = _check_grid(grid_thw, cfg)
  m = cfg.spatial_merge_size
  unit = m * m
  win = cfg.window_size // m // cfg.patch_size
  if win < 1:
    raise ValueError(f'VisionConfig: window_size={cfg.window_size} is smaller than one merge unit '
                     f'(spatial_merge_size * patch_size = {m * cfg.patch_size} pixels)')
  window_index, window_seg_units, pos, full_seg = [], [], [], []
  num_units = num_windows = num_frames = 0
  for t, h, w in grid.tolist():
    order, counts = _window_order(t, h // m, w // m, win)
    window_index.append(order + num_units)
    window_seg_units.append(np.repeat(np.arange(len(counts)) + num_windows, counts))
    pos.append(_patch_positions(t, h, w, m))
    full_seg.append(np.repeat(np.arange(t) + num_frames, h * w))
    num_units += t * (h // m) * (w // m)
    num_windows += len(counts)
    num_frames += t
  window_index_M = np.concatenate(window_index)
  # Patch-level permutation: merge unit j of the window order brings its U patches along, in order.
  perm_L = (window_index_M[:, None] * unit + np.arange(unit)).reshape(-1)
  pos_L2 = np.concatenate(pos)[perm_L]
  full_seg_L = np.concatenate(full_seg)[perm_L]
  window_seg_L = np.repeat(np.concatenate(window_seg_units), unit)
  num_patches = num_units * unit
  valid_M = np.ones(num_units, bool)
  if pad_to is not None:
    if pad_to < num_patches or pad_to % unit:
      raise ValueError(f'vision_meta: pad_to={pad_to} must be >= the patch count {num_patches} of grid_thw '
                       f'{grid.tolist()} and a multiple of spatial_merge_size**2={unit}')
    extra_L, extra_M = pad_to - num_patches, (pad_to - num_patches) // unit
    window_index_M = np.concatenate([window_index_M, np.arange(num_units, num_units + extra_M)])
    pos_L2 = np.concatenate([pos_L2, np.zeros((extra_L, 2), np.int64)])
    # Padding gets segment ids of its own, so it never mixes with real patches and no softmax row is empty: one
    # id for the full-attention blocks, and runs of at most one window's patches for the window blocks (so the
    # window-block invariant below holds for padding too).
    full_seg_L = np.concatenate([full_seg_L, np.full(extra_L, num_frames)])
    window_seg_L = np.concatenate([window_seg_L, num_windows + np.arange(extra_L) // window_len(cfg)])
    valid_M = np.concatenate([valid_M, np.zeros(extra_M, bool)])
  _check_window_runs(window_seg_L, window_len(cfg), grid)
  i32 = lambda a: np.ascontiguousarray(a, dtype=np.int32)
  return VisionMeta(pos_L2=i32(pos_L2), window_seg_L=i32(window_seg_L), full_seg_L=i32(full_seg_L),
                    window_index_M=i32(window_index_M), reverse_index_M=i32(np.argsort(window_index_M)),
                    valid_M=valid_M)


# ------------------------------------------------------------------------------------------- pure functions

ATTN_IMPLEMENTATIONS = (None, 'xla', 'cudnn')
# Per-block rematerialisation: 'full' keeps only each block's input for the backward; 'dots' also keeps the
# outputs of the weight matmuls (qkv, proj, MLP: dots without batch dimensions) and recomputes the attention.
REMAT_POLICIES = {'none': None, 'full': None, 'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}


def rotary_inv_freq(cfg: VisionConfig) -> np.ndarray:
  """``inv_freq[E]``, E = H // 4: one frequency set shared by the row and the column axis (float32)."""
  half = cfg.head_dim // 2
  return (1.0 / (cfg.rope_theta**(np.arange(0, half, 2, dtype=np.float32) / half))).astype(np.float32)


def rotary_cos_sin(pos_L2: jax.Array, cfg: VisionConfig) -> tuple[jax.Array, jax.Array]:
  """float32 ``(cos_LH, sin_LH)``: H = [row E | col E | row E | col E]."""
  freqs_L2E = pos_L2[..., None].astype(jnp.float32) * jnp.asarray(rotary_inv_freq(cfg))
  freqs_LH2 = freqs_L2E.reshape(pos_L2.shape[0], -1)  # [row E | col E]
  freqs_LH = jnp.concatenate([freqs_LH2, freqs_LH2], axis=-1)
  return jnp.cos(freqs_LH), jnp.sin(freqs_LH)


def _rotate_half(x_LNH: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x_LNH, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x_LNH: jax.Array, cos_LH: jax.Array, sin_LH: jax.Array) -> jax.Array:
  """Rotates in float32 and casts back to the input dtype (as HF's ``apply_rotary_pos_emb_vision``)."""
  x = x_LNH.astype(jnp.float32)
  y = x * cos_LH[:, None, :] + _rotate_half(x) * sin_LH[:, None, :]
  return y.astype(x_LNH.dtype)


def segment_attention(q_LNH: jax.Array, k_LNH: jax.Array, v_LNH: jax.Array, seg_L: jax.Array, *,
                      implementation: str | None = None, query_chunk: int | None = None) -> jax.Array:
  """Attention of every patch to the patches of its own segment (``seg[q] == seg[k]``): ``[L, N, H]``.

  Used by the full-attention blocks. In one call it materialises an ``[L, L]`` mask and (``xla``) ``[N, L, L]``
  fp32 logits. With ``query_chunk`` (ignored by ``cudnn``, whose fused kernel never stores logits) the queries are
  processed ``query_chunk`` at a time in a loop (``jax.lax.map``), each chunk against all ``L`` keys: every
  softmax row is computed whole, so the result is the same, with ``[N, query_chunk, L]`` logits alive at once; the
  chunk body is rematerialised, so the backward keeps no ``[N, L, L]`` probabilities either.
  """
  L = q_LNH.shape[0]

  def attend(q_TNH, seg_T):
    mask_11TL = (seg_T[:, None] == seg_L[None, :])[None, None]
    return jax.nn.dot_product_attention(q_TNH[None], k_LNH[None], v_LNH[None], mask=mask_11TL,
                                        implementation=implementation)[0]

  if implementation == 'cudnn' or query_chunk is None or L <= query_chunk:
    return attend(q_LNH, seg_L)
  C = -(-L // query_chunk)
  tail = C * query_chunk - L
  # Chunk-padding queries get id -1, which no key has: their rows are fully masked (uniform weights, finite) and
  # are dropped below.
  q_CTNH = jnp.pad(q_LNH, ((0, tail), (0, 0), (0, 0))).reshape(C, query_chunk, *q_LNH.shape[1:])
  seg_CT = jnp.concatenate([seg_L, jnp.full((tail,), -1, seg_L.dtype)]).reshape(C, query_chunk)
  o_CTNH = jax.lax.map(jax.checkpoint(lambda qs: attend(*qs)), (q_CTNH, seg_CT))
  return o_CTNH.reshape(C * query_chunk, *q_LNH.shape[1:])[:L]


def windowed_segment_attention(q_LNH: jax.Array, k_LNH: jax.Array, v_LNH: jax.Array, seg_L: jax.Array,
                               block: int, *, implementation: str | None = None) -> jax.Array:
  """:func:`segment_attention` when every segment is one contiguous run of at most ``block`` patches: ``[L, N, H]``.

  The patches are cut into ``C = ceil(L / block)`` chunks of ``block`` queries; chunk ``c`` attends to the keys of
  chunks ``c-1, c, c+1`` (``3 * block`` keys) under the same segment-equality mask. A run of at most ``block``
  patches that contains a query of chunk ``c`` lies inside chunks ``c-1..c+1``, so every key the full mask would
  allow is present and the result is the same softmax over the same non-zero terms (masked logits get the same
  large negative value, so their weight is exactly 0). Memory: ``[C, N, block, 3*block]`` logits, i.e.
  ``N * L * 3 * block`` instead of ``N * L**2``. :func:`vision_meta` checks the run-length condition on the host.
  """
  L, N, H = q_LNH.shape
  C = -(-L // block)
  tail = C * block - L
  # Chunk-padding queries/keys get id -2 (they see only each other, so no softmax row is empty); the key-side
  # halo chunks before the first and after the last chunk get id -1, which no query has. Real ids are >= 0.
  seg_q = jnp.concatenate([seg_L, jnp.full((tail,), -2, seg_L.dtype)])
  seg_k = jnp.concatenate([jnp.full((block,), -1, seg_L.dtype), seg_q, jnp.full((block,), -1, seg_L.dtype)])
  pad_kv = lambda a: jnp.pad(a, ((block, tail + block), (0, 0), (0, 0)))
  halo = lambda a: jnp.concatenate([a[:-2], a[1:-1], a[2:]], axis=1)  # [C + 2, block, ...] -> [C, 3 * block, ...]
  k_CSNH = halo(pad_kv(k_LNH).reshape(C + 2, block, N, H))
  v_CSNH = halo(pad_kv(v_LNH).reshape(C + 2, block, N, H))
  q_CTNH = jnp.pad(q_LNH, ((0, tail), (0, 0), (0, 0))).reshape(C, block, N, H)
  seg_CS = halo(seg_k.reshape(C + 2, block))
  mask_C1TS = (seg_q.reshape(C, block)[:, :, None] == seg_CS[:, None, :])[:, None]
  o_CTNH = jax.nn.dot_product_attention(q_CTNH, k_CSNH, v_CSNH, mask=mask_C1TS, implementation=implementation)
  return o_CTNH.reshape(C * block, N, H)[:L]


def merge_units_permute(x_LX: jax.Array, index_M: jax.Array, unit: int) -> jax.Array:
  """Reorders ``x`` in whole merge units: ``out`` unit ``j`` = ``x`` unit ``index_M[j]``."""
  L = x_LX.shape[0]
  return jnp.take(x_LX.reshape(L // unit, unit, *x_LX.shape[1:]), index_M, axis=0).reshape(x_LX.shape)


# ------------------------------------------------------------------------------------------------- modules


class PatchEmbed(nnx.Module):
  """``proj.kernel[P, D]`` = HF Conv3d ``weight[D, C, Tp, p, p]`` reshaped to ``[D, P]`` and transposed."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype='float32', param_dtype='float32'):
    self.proj = Linear(cfg.patch_dim, cfg.hidden_size, use_bias=False, rngs=rngs, dtype=dtype,
                       param_dtype=param_dtype)

  def __call__(self, pixel_values_LP: jax.Array) -> jax.Array:
    return self.proj(pixel_values_LP)


class VisionAttention(nnx.Module):
  """Multi-head self-attention with fused ``qkv``, 2D rotary on q/k, block-diagonal mask."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype='float32', param_dtype='float32',
               attn_implementation: str | None = None):
    if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
      raise ValueError(f'VisionConfig: hidden_size={cfg.hidden_size} must split into num_heads={cfg.num_heads} '
                       f'heads whose size is a multiple of 4 (2D rotary), got head_dim={cfg.head_dim}')
    d = cfg.hidden_size
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.attn_implementation = attn_implementation
    self.query_chunk = full_attn_query_chunk(cfg)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.qkv = Linear(d, 3 * d, use_bias=True, **kw)
    self.proj = Linear(d, d, use_bias=True, **kw)

  def __call__(self, x_LD: jax.Array, cos_LH: jax.Array, sin_LH: jax.Array, seg_L: jax.Array, *,
               window: int | None = None) -> jax.Array:
    """``window=None``: attention within each segment over the whole call (:func:`segment_attention`); an int
    ``Wl``: segments are contiguous runs of at most ``Wl`` patches (:func:`windowed_segment_attention`)."""
    L = x_LD.shape[0]
    qkv_L3NH = self.qkv(x_LD).reshape(L, 3, self.num_heads, self.head_dim)
    q_LNH, k_LNH, v_LNH = qkv_L3NH[:, 0], qkv_L3NH[:, 1], qkv_L3NH[:, 2]
    q_LNH, k_LNH = apply_rotary(q_LNH, cos_LH, sin_LH), apply_rotary(k_LNH, cos_LH, sin_LH)
    if window is None:
      o_LNH = segment_attention(q_LNH, k_LNH, v_LNH, seg_L, implementation=self.attn_implementation,
                                query_chunk=self.query_chunk)
    else:
      o_LNH = windowed_segment_attention(q_LNH, k_LNH, v_LNH, seg_L, window, implementation=self.attn_implementation)
    return self.proj(o_LNH.reshape(L, -1))


class VisionMLP(nnx.Module):
  """``down(silu(gate(x)) * up(x))``, all projections with bias."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype='float32', param_dtype='float32'):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate_proj, self.up_proj, self.down_proj = Linear(d, f, **kw), Linear(d, f, **kw), Linear(f, d, **kw)

  def __call__(self, x_LD: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x_LD)) * self.up_proj(x_LD))


class VisionBlock(nnx.Module):
  """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype='float32', param_dtype='float32',
               attn_implementation: str | None = None):
    self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                attn_implementation=attn_implementation)
    self.mlp = VisionMLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x_LD: jax.Array, cos_LH: jax.Array, sin_LH: jax.Array, seg_L: jax.Array, *,
               window: int | None = None) -> jax.Array:
    x_LD = x_LD + self.attn(self.norm1(x_LD), cos_LH, sin_LH, seg_L, window=window)
    return x_LD + self.mlp(self.norm2(x_LD))


class PatchMerger(nnx.Module):
  """``mlp_2(gelu(mlp_0(concat_U(ln_q(x)))))``: [L, D] -> [M, O] (HF ``merger.mlp.0`` / ``merger.mlp.2``)."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype='float32', param_dtype='float32'):
    self.unit = cfg.spatial_merge_size**2
    width = cfg.hidden_size * self.unit
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.ln_q = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.mlp_0 = Linear(width, width, **kw)
    self.mlp_2 = Linear(width, cfg.out_hidden_size, **kw)

  def __call__(self, x_LD: jax.Array) -> jax.Array:
    x_MX = self.ln_q(x_LD).reshape(x_LD.shape[0] // self.unit, -1)
    return self.mlp_2(jax.nn.gelu(self.mlp_0(x_MX), approximate=False))


def _block_call(window: int | None):
  """``f(block, x, cos, sin, seg)`` with the static ``window`` bound (so ``nnx.remat`` sees only array inputs)."""
  return lambda block, x_LD, cos_LH, sin_LH, seg_L: block(x_LD, cos_LH, sin_LH, seg_L, window=window)


class VisionTransformer(nnx.Module):
  """The Qwen2.5-VL vision tower: ``pixel_values[L, P]`` + :class:`VisionMeta` -> image features ``[M, O]``."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype='float32', param_dtype='float32',
               attn_implementation: str | None = None, remat: str = 'none'):
    bad = [i for i in cfg.fullatt_block_indexes if not 0 <= i < cfg.depth]
    if bad:
      raise ValueError(f'VisionConfig: fullatt_block_indexes {bad} outside [0, depth={cfg.depth})')
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
      raise ValueError(f'attn_implementation={attn_implementation!r}; expected one of {ATTN_IMPLEMENTATIONS}')
    if remat not in REMAT_POLICIES:
      raise ValueError(f'remat={remat!r}; expected one of {sorted(REMAT_POLICIES)}')
    self.cfg = cfg
    self.remat = remat
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.patch_embed = PatchEmbed(cfg, **kw)
    self.blocks = nnx.List(
        [VisionBlock(cfg, attn_implementation=attn_implementation, **kw) for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, **kw)

  def __call__(self, pixel_values_LP: jax.Array, meta: VisionMeta) -> jax.Array:
    """Returns ``feats[M, O]`` in processor order (HF's ``pooler_output``); M = L // spatial_merge_size**2."""
    cfg = self.cfg
    unit = cfg.spatial_merge_size**2
    if pixel_values_LP.ndim != 2 or pixel_values_LP.shape[1] != cfg.patch_dim:
      raise ValueError(f'pixel_values: expected shape [num_patches, {cfg.patch_dim}] (C*Tp*p*p = '
                       f'{cfg.in_channels}*{cfg.temporal_patch_size}*{cfg.patch_size}**2), got '
                       f'{pixel_values_LP.shape}')
    L = pixel_values_LP.shape[0]
    if meta.pos_L2.shape[0] != L or meta.window_index_M.shape[0] * unit != L:
      raise ValueError(f'pixel_values has {L} patches but the VisionMeta describes {meta.pos_L2.shape[0]} '
                       f'(sum of t*h*w over grid_thw, plus pad_to padding)')
    x_LD = merge_units_permute(self.patch_embed(pixel_values_LP), meta.window_index_M, unit)
    cos_LH, sin_LH = rotary_cos_sin(meta.pos_L2, cfg)
    wl = window_len(cfg)
    for i, block in enumerate(self.blocks):
      full = i in cfg.fullatt_block_indexes
      seg_L, window = (meta.full_seg_L, None) if full else (meta.window_seg_L, wl)
      call = _block_call(window)
      if self.remat != 'none':
        call = nnx.remat(call, policy=REMAT_POLICIES[self.remat], graph_updates=False)
      x_LD = call(block, x_LD, cos_LH, sin_LH, seg_L)
    return jnp.take(self.merger(x_LD), meta.reverse_index_M, axis=0)
