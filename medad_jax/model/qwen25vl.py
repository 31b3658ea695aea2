"""The full Qwen2.5-VL model: vision tower + text decoder + LM head, and a cache-checking greedy decoder.

Axis legend (as in ``layers.py`` / ``text.py``):
  B batch   T query length   S cache length   D text width   V vocabulary   L patches   P patch vector
  M merged image tokens (vision-tower output rows)

Parameter paths mirror the Hugging Face names (see ``checkpoint.py``): ``visual`` (``VisionTransformer``),
``model`` (``TextModel``: ``embed_tokens``, ``layers``, ``norm``) and ``lm_head`` (``None`` when the head is tied
to ``embed_tokens``).

Positions are always given by the caller: the prompt's come from :func:`medad_jax.model.rope_index.rope_index`
(host side), generated tokens' from :func:`continuation_positions` (``cache slot + rope_delta``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medad_jax.model import text as text_lib
from medad_jax.model import vision as vision_lib
from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.layers import Linear, lora_enabled
from medad_jax.model.rope_index import rope_index
from medad_jax.model.vision import VisionMeta, VisionTransformer


def continuation_positions(start_index: jax.Array | int, rope_deltas_B: jax.Array, length: int = 1) -> jax.Array:
  """M-RoPE positions ``[3, B, length]`` of tokens written at cache slots ``start_index ..``: slot + delta."""
  pos_BT = start_index + jnp.arange(length, dtype=jnp.int32)[None, :] + rope_deltas_B.astype(jnp.int32)[:, None]
  return jnp.broadcast_to(pos_BT[None], (3, *pos_BT.shape))


class Qwen25VL(nnx.Module):
  """``Qwen2_5_VLForConditionalGeneration`` in NNX. ``dtype``/``param_dtype`` default to the config's."""

  def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=None):
    dtype = dtype or cfg.dtype
    param_dtype = param_dtype or cfg.param_dtype
    if cfg.vision.out_hidden_size != cfg.text.hidden_size:
      raise ValueError(f'vision out_hidden_size {cfg.vision.out_hidden_size} != text hidden_size '
                       f'{cfg.text.hidden_size}: image features could not replace token embeddings')
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.visual = VisionTransformer(cfg.vision, attn_implementation=text_lib.resolve_attention(cfg.attention, dtype),
                                    remat=cfg.remat, **kw)
    self.model = text_lib.TextModel(cfg.text, attention=cfg.attention, remat=cfg.remat,
                                     decode_scan=cfg.decode_scan, **kw)
    self.lm_head = None if cfg.text.tie_word_embeddings else Linear(cfg.text.hidden_size, cfg.text.vocab_size,
                                                                    use_bias=False, **kw)

  # ------------------------------------------------------------------ pieces

  def init_cache(self, batch: int, max_len: int) -> text_lib.Cache:
    """An empty KV cache (see ``text.py``) of ``max_len`` slots in the compute dtype."""
    return text_lib.init_cache(self.cfg.text, batch, max_len, self.dtype)

  def embed(self, input_ids_BT: jax.Array, pixel_values_LP: jax.Array | None = None,
            vision_meta: VisionMeta | None = None) -> jax.Array:
    """Token embeddings with image features written at ``<|image_pad|>`` positions -> ``x_BTD``.

    The vision tower's rows are consumed in row-major (batch, time) order of the image tokens, as HF's
    ``masked_scatter``; the gather index is a cumsum, so shapes stay static under ``jit``. The per-image token
    count is checked on the host by ``rope_index``; here, outside ``jit``, the total is checked too.
    """
    x_BTD = self.model.embed_tokens(input_ids_BT)
    if pixel_values_LP is None:
      return x_BTD
    if vision_meta is None:
      raise ValueError('pixel_values given without vision_meta (build it with vision.vision_meta(grid_thw, ...))')
    feats_MD = self.visual(pixel_values_LP, vision_meta)
    is_img_BT = input_ids_BT == self.cfg.image_token_id
    if not isinstance(input_ids_BT, jax.core.Tracer) and not isinstance(vision_meta.valid_M, jax.core.Tracer):
      n_tok, n_feat = int(np.sum(np.asarray(is_img_BT))), int(np.sum(np.asarray(vision_meta.valid_M)))
      if n_tok != n_feat:
        raise ValueError(f'input_ids hold {n_tok} image tokens (id {self.cfg.image_token_id}) but the images give '
                         f'{n_feat} features (sum of t*h*w/merge**2 over grid_thw)')
    idx_BT = jnp.cumsum(is_img_BT.reshape(-1)).reshape(is_img_BT.shape) - 1
    idx_BT = jnp.clip(idx_BT, 0, feats_MD.shape[0] - 1)
    img_BTD = jnp.take(feats_MD, idx_BT, axis=0).astype(x_BTD.dtype)
    return jnp.where(is_img_BT[..., None], img_BTD, x_BTD)

  def embed_per_image(self, input_ids_PT: jax.Array, pixel_values_ILC: jax.Array | None, vision_meta_I,
                      image_src_PT: jax.Array, *, stop_gradient: bool = False) -> jax.Array:
    """Token embeddings with image features in place of ``<|image_pad|>`` tokens -> ``x_PTD``, images kept apart.

    The layout of ``sampling/prompts.py``'s ``PromptBatch`` (used by the sampler and both training steps): each
    image is padded to a patch bucket on its own, ``[I, L, C]``, and the vision tower runs once per image
    (``vmap`` over ``I``), so no attention is ever computed across the images of a batch and memory grows with
    the number of images, not with its square. ``image_src_PT`` is the row of the flattened ``[I * M, D]``
    features each image token takes (-1 for other tokens). ``stop_gradient``: the image features are constants
    (a frozen tower keeps nothing for the backward pass).
    """
    x_PTD = self.model.embed_tokens(input_ids_PT)
    if pixel_values_ILC is None:
      return x_PTD
    feats_IMD = jax.vmap(lambda pix, meta: self.visual(pix, meta))(pixel_values_ILC, vision_meta_I)
    if stop_gradient:
      feats_IMD = jax.lax.stop_gradient(feats_IMD)
    feats_XD = feats_IMD.reshape(-1, feats_IMD.shape[-1]).astype(x_PTD.dtype)
    img_PTD = jnp.take(feats_XD, jnp.maximum(image_src_PT, 0), axis=0)
    return jnp.where((image_src_PT >= 0)[..., None], img_PTD, x_PTD)

  def logits(self, hidden_BTD: jax.Array) -> jax.Array:
    """LM head -> ``logits_BTV`` in float32 (accumulated in float32 even for a bf16 model)."""
    if self.lm_head is None:
      w_DV = self.model.embed_tokens.embedding[...].astype(self.dtype).T
    elif self.lm_head.lora_a is not None and lora_enabled():
      return self.lm_head(hidden_BTD).astype(jnp.float32)  # an adapted head: keep the LoRA term
    else:
      w_DV = self.lm_head.kernel[...].astype(self.dtype)
    return jnp.einsum('BTD,DV->BTV', hidden_BTD.astype(self.dtype), w_DV, preferred_element_type=jnp.float32)

  def hidden_states(self, input_ids_BT: jax.Array, *, attention_mask_BT: jax.Array, positions_3BT: jax.Array,
                    pixel_values: jax.Array | None = None, vision_meta: VisionMeta | None = None,
                    cache: text_lib.Cache | None = None, cache_index: jax.Array | int = 0
                    ) -> tuple[jax.Array, text_lib.Cache | None]:
    """The final-norm hidden states ``[B, T, D]`` and the new cache, without the LM head (memory-saving losses)."""
    x_BTD = self.embed(input_ids_BT, pixel_values, vision_meta)
    return self.model(x_BTD, attention_mask_BT=attention_mask_BT, positions_3BT=positions_3BT, cache=cache,
                      cache_index=cache_index)

  def __call__(self, input_ids_BT: jax.Array, *, attention_mask_BT: jax.Array, positions_3BT: jax.Array,
               pixel_values: jax.Array | None = None, vision_meta: VisionMeta | None = None,
               cache: text_lib.Cache | None = None, cache_index: jax.Array | int = 0
               ) -> tuple[jax.Array, text_lib.Cache | None]:
    """-> ``(logits_BTV float32, new_cache or None)``.

    Args:
      input_ids_BT: token ids (padding anywhere, marked by ``attention_mask_BT`` = 0).
      attention_mask_BT: 1 for real tokens; 0 tokens are never attended (written to the cache as invalid).
      positions_3BT: M-RoPE positions (``rope_index`` for a prompt, ``continuation_positions`` afterwards).
      pixel_values: ``[L, P]`` patches of all images of the batch, in order; ``vision_meta`` from their grids.
      cache, cache_index: optional KV cache and the slot where this call's first token is written.
    """
    h_BTD, cache = self.hidden_states(input_ids_BT, attention_mask_BT=attention_mask_BT,
                                      positions_3BT=positions_3BT, pixel_values=pixel_values,
                                      vision_meta=vision_meta, cache=cache, cache_index=cache_index)
    return self.logits(h_BTD), cache


# ----------------------------------------------------------------------------- greedy decoding (cache check)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_len'))
def _greedy_prefill(graphdef, state, ids_BT, mask_BT, positions_3BT, pixels_LP, meta, *, max_len: int):
  m = nnx.merge(graphdef, state)
  logits, cache = m(ids_BT, attention_mask_BT=mask_BT, positions_3BT=positions_3BT, pixel_values=pixels_LP,
                    vision_meta=meta, cache=m.init_cache(ids_BT.shape[0], max_len), cache_index=0)
  return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _greedy_step(graphdef, state, tok_B, cache, index, rope_deltas_B):
  m = nnx.merge(graphdef, state)
  # Finished rows keep feeding (pad) tokens marked valid, as transformers' generate does; their output is discarded.
  logits, cache = m(tok_B[:, None], attention_mask_BT=jnp.ones((tok_B.shape[0], 1), jnp.int32),
                    positions_3BT=continuation_positions(index, rope_deltas_B), cache=cache, cache_index=index)
  return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def greedy_generate(model: Qwen25VL, inputs: dict, max_new_tokens: int,
                    eos_token_ids: tuple[int, ...] | None = None) -> np.ndarray:
  """Greedy continuation ``[B, max_new_tokens]`` (int32) of left-padded prompts, one jitted step per token.

  ``inputs``: ``input_ids`` [B, T], ``attention_mask`` [B, T] (optional), and for images ``pixel_values`` [L, P] +
  ``image_grid_thw`` [num_images, 3]. Once a row emits one of ``eos_token_ids`` (default: the config's), it emits
  ``pad_token_id`` afterwards (as transformers' ``generate``); the loop stops early when every row is done.
  This Python loop exists to check the KV cache; the compiled sampler lives elsewhere.
  """
  cfg = model.cfg
  eos = np.asarray(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids, np.int32)
  ids = np.asarray(inputs['input_ids'], np.int32)
  B, T = ids.shape
  mask = np.asarray(inputs.get('attention_mask', np.ones_like(ids)), np.int32)
  grid, pixels = inputs.get('image_grid_thw'), inputs.get('pixel_values')
  if (pixels is None) != (grid is None):
    raise ValueError('inputs: pixel_values and image_grid_thw must be given together')
  positions, deltas = rope_index(cfg, ids, mask, grid)
  meta = None if grid is None else vision_lib.vision_meta(np.asarray(grid), cfg.vision)
  graphdef, state = nnx.split(model)
  tok, cache = _greedy_prefill(graphdef, state, ids, mask, positions, None if pixels is None else jnp.asarray(pixels),
                               meta, max_len=T + max_new_tokens)
  out = np.full((B, max_new_tokens), cfg.pad_token_id, np.int32)
  done = np.zeros((B,), bool)
  for i in range(max_new_tokens):
    t = np.where(done, cfg.pad_token_id, np.asarray(tok))
    out[:, i] = t
    done |= np.isin(t, eos)
    if done.all() or i == max_new_tokens - 1:
      break
    tok, cache = _greedy_step(graphdef, state, jnp.asarray(t), cache, jnp.int32(T + i), jnp.asarray(deltas))
  return out
