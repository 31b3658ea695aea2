"""Synthetic model inputs for tests and benchmarks: prompts with images built directly from token ids."""

from __future__ import annotations

import numpy as np

from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.inputs import model_inputs  # noqa: F401  (re-exported for tests)


def prompt_batch(cfg: Qwen25VLConfig, rows, *, seed: int = 0, left: bool = True) -> dict[str, np.ndarray]:
  """Token ids built directly: ``('t', n)`` = n random text tokens, ``('img', (t, h, w))`` = vision_start,
  ``t*h*w/merge**2`` image tokens, vision_end. Rows are padded to the longest (left by default).

  Returns dict(input_ids [B, T], attention_mask [B, T], and with images image_grid_thw [G, 3] and
  pixel_values [sum t*h*w, P] float32 ~ N(0, 1)).
  """
  rng = np.random.default_rng(seed)
  m2 = cfg.vision.spatial_merge_size**2
  seqs, grids = [], []
  for row in rows:
    seq = []
    for kind, arg in row:
      if kind == 't':
        seq += rng.integers(0, cfg.text.vocab_size - 6, arg).tolist()  # the last 6 ids are special tokens
      else:
        seq += [cfg.vision_start_token_id] + [cfg.image_token_id] * (int(np.prod(arg)) // m2) + [
            cfg.vision_end_token_id]
        grids.append(arg)
    seqs.append(seq)
  T = max(map(len, seqs))
  ids = np.full((len(rows), T), cfg.pad_token_id, np.int64)
  mask = np.zeros((len(rows), T), np.int64)
  for b, seq in enumerate(seqs):
    sl = slice(T - len(seq), T) if left else slice(0, len(seq))
    ids[b, sl], mask[b, sl] = seq, 1
  out = dict(input_ids=ids, attention_mask=mask)
  if grids:
    grid = np.asarray(grids, np.int64)
    out['image_grid_thw'] = grid
    out['pixel_values'] = rng.standard_normal((int(grid.prod(-1).sum()), cfg.vision.patch_dim)).astype(np.float32)
  return out
