"""Patch buckets chosen from a dataset's own image sizes.

Every image is resized by the processor (Qwen2-VL ``smart_resize`` between ``min_pixels`` and ``max_pixels``)
to its own patch grid, so a real dataset -- every image a different size -- gives many patch counts. Padding each
image's patches up to one of a few buckets bounds the number of compiled programs by the number of buckets; this
module picks the buckets that waste the least padding on the dataset at hand:

* :func:`image_patch_counts`: the patch count of every image of a split (from the image headers; nothing decoded);
* :func:`choose_buckets`: the ``k`` bucket sizes minimising the total padding over those counts (an exact dynamic
  programme over the distinct counts; the largest bucket is the largest count, so every image fits);
* :func:`padding_report`: images per bucket and the padded fraction, for the run's log.

Not yet used by the trainer's batching (``train/pipeline.py`` pads a batch's patches to a multiple of
``PATCH_BUCKET``); this is the data side of per-image patch buckets.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medad_jax.data import images as images_lib
from medad_jax.data.lengths import image_tokens


def image_patch_counts(records: Sequence, processor) -> np.ndarray:
  """Patches (before the 2x2 merge) of each distinct image (by ``image_id``) of ``records``."""
  merge2 = processor.vision_cfg.spatial_merge_size ** 2
  seen, out = set(), []
  it = records.iter_records() if hasattr(records, 'iter_records') else (records[i] for i in range(len(records)))
  for r in it:
    if r.image_id in seen:
      continue
    seen.add(r.image_id)
    with images_lib.open_image(r.image) as im:
      out.append(image_tokens(*im.size, processor) * merge2)
  return np.asarray(out, np.int64)


def choose_buckets(counts: Sequence[int], k: int) -> tuple[int, ...]:
  """The at most ``k`` bucket sizes (ascending) minimising ``sum(bucket(c) - c)`` over ``counts``, where
  ``bucket(c)`` is the smallest bucket >= c. Exact: dynamic programme over the sorted distinct counts."""
  if k < 1:
    raise ValueError(f'k = {k}: need at least one bucket')
  vals, freq = np.unique(np.asarray(counts, np.int64), return_counts=True)
  if not len(vals):
    raise ValueError('no image sizes to choose buckets from')
  n = len(vals)
  cum_f = np.concatenate([[0], np.cumsum(freq)])
  cum_fv = np.concatenate([[0], np.cumsum(freq * vals)])

  def cost(i, j):  # values i..j-1 padded to vals[j-1] (vectorised over i)
    return vals[j - 1] * (cum_f[j] - cum_f[i]) - (cum_fv[j] - cum_fv[i])

  best = np.full((k + 1, n + 1), np.inf)
  arg = np.zeros((k + 1, n + 1), np.int64)
  best[0, 0] = 0.0
  for b in range(1, k + 1):
    for j in range(1, n + 1):
      i = np.arange(j)
      c = best[b - 1, i] + cost(i, j)
      m = int(np.argmin(c))
      best[b, j], arg[b, j] = c[m], m
  b = int(np.argmin(best[1:, n])) + 1
  out, j = [], n
  while j > 0:
    out.append(int(vals[j - 1]))
    j, b = int(arg[b, j]), b - 1
  return tuple(sorted(out))


def padding_report(counts: Sequence[int], buckets: Sequence[int]) -> dict:
  """``{'buckets', 'images_per_bucket', 'padded_fraction'}`` of ``counts`` padded to ``buckets``."""
  counts = np.asarray(counts, np.int64)
  buckets = np.asarray(sorted(buckets), np.int64)
  if counts.max() > buckets[-1]:
    raise ValueError(f'an image of {counts.max()} patches exceeds the largest bucket {buckets[-1]}')
  idx = np.searchsorted(buckets, counts, side='left')
  padded = buckets[idx]
  return {'buckets': buckets.tolist(), 'images_per_bucket': np.bincount(idx, minlength=len(buckets)).tolist(),
          'padded_fraction': float((padded - counts).sum() / padded.sum())}
