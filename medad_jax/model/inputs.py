"""From processor-style batches to the keyword arguments of ``Qwen25VL.__call__`` (host side)."""

from __future__ import annotations

import numpy as np

from medad_jax.model import vision as vision_lib
from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.rope_index import rope_index


def model_inputs(cfg: Qwen25VLConfig, batch: dict) -> dict:
  """``{input_ids [B,T], attention_mask [B,T], pixel_values? [L,P], image_grid_thw? [G,3]}`` ->
  ``{input_ids_BT, attention_mask_BT, positions_3BT, pixel_values?, vision_meta?}`` (M-RoPE positions and
  vision index arrays computed on the host)."""
  ids = np.asarray(batch['input_ids'], np.int32)
  mask = np.asarray(batch.get('attention_mask', np.ones_like(ids)), np.int32)
  grid = batch.get('image_grid_thw')
  positions, _ = rope_index(cfg, ids, mask, grid)
  out = dict(input_ids_BT=ids, attention_mask_BT=mask, positions_3BT=positions)
  if batch.get('pixel_values') is not None:
    out['pixel_values'] = np.asarray(batch['pixel_values'], np.float32)
    out['vision_meta'] = vision_lib.vision_meta(np.asarray(grid), cfg.vision)
  return out
