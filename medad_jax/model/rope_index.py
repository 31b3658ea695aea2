"""Host-side (numpy) M-RoPE position ids for Qwen2.5-VL prompts with images, with left or right padding.

A port of transformers' ``Qwen2_5_VLModel.get_rope_index`` for images (``mm_token_type_ids`` built the way the
processor builds them: 1 where ``input_ids == image_token_id``, else 0). Per row, over its non-pad tokens:

* a run of ``n`` text tokens gets positions ``p, p+1, .., p+n-1`` in all three rows (t, h, w); ``p += n``;
* a run of image tokens for an image with patch grid ``(gt, gh, gw)`` (merged grid ``gh/m x gw/m``, ``m`` the
  spatial merge size) gets ``t = p + it``, ``h = p + ih``, ``w = p + iw`` over the merged grid in (t, h, w)
  raster order; then ``p += max(gh, gw) / m``.

Pad tokens get position 0 (never attended). Images are consumed from ``image_grid_thw`` in batch-row order, which
is also the order of the vision tower's output features.

``rope_deltas[b]`` continues positions during generation: a token written at cache slot ``c`` (slot = index in
the padded sequence, prompt occupying slots ``[0, T)``) has position ``c + rope_deltas[b]`` in all three rows.
So ``rope_deltas = max_position + 1 - T``. transformers counts from the number of non-pad tokens ``n`` instead;
its delta is ours plus ``T - n`` (the row's padding).

Video tokens are outside this port's scope (MedAD uses still images) and are refused with an error.
"""

from __future__ import annotations

import numpy as np

from medad_jax.model.config import Qwen25VLConfig


def image_token_counts(image_grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
  """Number of ``<|image_pad|>`` tokens (= vision-tower output rows) per image: ``t*h*w / m**2``."""
  g = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  return g.prod(-1) // spatial_merge_size**2


def _runs(types_n: np.ndarray) -> list[tuple[int, int, int]]:
  """Maximal runs of equal values -> [(value, start, end)]."""
  if types_n.size == 0:
    return []
  cut = np.flatnonzero(np.diff(types_n)) + 1
  starts = np.concatenate([[0], cut])
  ends = np.concatenate([cut, [types_n.size]])
  return [(int(types_n[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def image_positions(start: int, grid_thw, spatial_merge_size: int) -> np.ndarray:
  """``[3, n]`` positions of one image's merged tokens starting at text position ``start``."""
  gt, gh, gw = (int(x) for x in grid_thw)
  lh, lw = gh // spatial_merge_size, gw // spatial_merge_size
  t, h, w = np.meshgrid(np.arange(gt), np.arange(lh), np.arange(lw), indexing='ij')
  return np.stack([t.ravel(), h.ravel(), w.ravel()]) + start


def rope_index(cfg: Qwen25VLConfig, input_ids_BT, attention_mask_BT=None, image_grid_thw=None
               ) -> tuple[np.ndarray, np.ndarray]:
  """-> ``(positions_3BT int32, rope_deltas_B int32)``; see the module docstring.

  Args:
    cfg: model config (token ids, ``vision.spatial_merge_size``).
    input_ids_BT: token ids, padded on either side.
    attention_mask_BT: 1 for real tokens, 0 for padding (default: all real).
    image_grid_thw: ``[num_images, 3]`` patch grids of the batch's images in order (None for text-only).
  """
  ids = np.asarray(input_ids_BT)
  if ids.ndim != 2:
    raise ValueError(f'input_ids has shape {ids.shape}; expected [B, T]')
  B, T = ids.shape
  mask = np.ones((B, T), bool) if attention_mask_BT is None else np.asarray(attention_mask_BT).astype(bool)
  if mask.shape != (B, T):
    raise ValueError(f'attention_mask has shape {mask.shape}; expected {(B, T)} like input_ids')
  if np.any((ids == cfg.video_token_id) & mask):
    raise ValueError(f'input_ids contain video tokens (id {cfg.video_token_id}); only images are supported')
  m = cfg.vision.spatial_merge_size
  grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  counts = image_token_counts(grids, m)
  positions = np.zeros((3, B, T), np.int64)
  deltas = np.zeros((B,), np.int64)
  img = 0
  for b in range(B):
    types = (ids[b][mask[b]] == cfg.image_token_id).astype(np.int64)
    parts, p = [], 0
    for kind, s, e in _runs(types):
      if kind == 0:
        parts.append(np.broadcast_to(np.arange(e - s) + p, (3, e - s)))
        p += e - s
        continue
      if img >= len(grids):
        raise ValueError(f'row {b}: image-token run at non-pad offset {s} but image_grid_thw has only {len(grids)} '
                         'image(s)')
      if e - s != counts[img]:
        raise ValueError(f'row {b}: image-token run of length {e - s} at non-pad offset {s}, but image {img} with '
                         f'grid {tuple(grids[img].tolist())} needs {counts[img]} tokens (t*h*w/{m * m})')
      parts.append(image_positions(p, grids[img], m))
      p += int(max(grids[img][1], grids[img][2])) // m
      img += 1
    if parts:
      pos_3n = np.concatenate(parts, axis=1)
      positions[:, b, mask[b]] = pos_3n
      deltas[b] = pos_3n.max() + 1 - T
    else:
      deltas[b] = -T  # an all-pad row: the first generated token (slot T) gets position 0
  if img != len(grids):
    raise ValueError(f'image_grid_thw has {len(grids)} images but input_ids hold image-token runs for {img}')
  return positions.astype(np.int32), deltas.astype(np.int32)
