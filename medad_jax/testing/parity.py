"""Whole-model logits of our Qwen2.5-VL and of transformers' on the same prompt batch (parity checks)."""

from __future__ import annotations

import types

import jax
import numpy as np

from medad_jax.model.config import Qwen25VLConfig


def mm_token_type_ids(cfg: Qwen25VLConfig, ids: np.ndarray) -> np.ndarray:
  """Exactly the processor's ``create_mm_token_type_ids`` (1 at image tokens, 2 at video tokens, else 0)."""
  from transformers.processing_utils import ProcessorMixin
  proc = types.SimpleNamespace(image_token_ids=[cfg.image_token_id], video_token_ids=[cfg.video_token_id],
                               audio_token_ids=[None])
  return np.asarray(ProcessorMixin.create_mm_token_type_ids(proc, ids.tolist()), np.int64)


def hf_logits(hf_model, cfg: Qwen25VLConfig, batch: dict) -> np.ndarray:
  """transformers' logits ``[B, T, V]`` for a :func:`medad_jax.testing.inputs.prompt_batch` batch."""
  import torch
  inputs = {k: torch.tensor(v) for k, v in batch.items()}
  inputs['mm_token_type_ids'] = torch.tensor(mm_token_type_ids(cfg, batch['input_ids']))
  with torch.no_grad():
    return hf_model(**inputs).logits.float().numpy()


def our_logits(model, batch: dict) -> np.ndarray:
  """Our logits ``[B, T, V]`` (float32) for the same batch: M-RoPE positions from ``rope_index``, images through
  the vision tower."""
  from medad_jax.model import vision as vision_lib
  from medad_jax.model.rope_index import rope_index
  cfg = model.cfg
  grid = batch.get('image_grid_thw')
  pos, _ = rope_index(cfg, batch['input_ids'], batch['attention_mask'], grid)
  kw = {}
  if grid is not None:
    kw = dict(pixel_values=batch['pixel_values'], vision_meta=vision_lib.vision_meta(grid, cfg.vision))
  logits, _ = jax.jit(lambda ids, mask, pos, kw: model(ids, attention_mask_BT=mask, positions_3BT=pos, **kw))(
      batch['input_ids'], batch['attention_mask'], pos, kw)
  return np.asarray(logits)
