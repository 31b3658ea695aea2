"""Host-side prompt batches for the sampler: left padding to a length bucket, image patches padded to a patch
bucket, M-RoPE positions and ``rope_deltas``. Axis letters: see ``ops.py``; L patches, C patch vector.

Compiled programs are keyed by shapes, so every shape the sampler sees comes from a short list of buckets:
prompt length ``T`` (``length_buckets``), patches per image ``L`` (``patch_buckets``), the number of images ``I``
(``P`` times the most images in one prompt, laid out per prompt: dummy images fill the rest) and optionally the
number of prompts ``P``
(``num_prompts``: extra all-padding prompts that start *done*). A new batch whose sizes fall in the same buckets
reuses the compiled prefill and decode.

Images are kept apart, ``[I, L, C]``, so the sampler runs the vision tower once per image (``vmap``): attention
cost grows with the sum of the squared patch counts, not with the square of the batch's total (the tower's own
multi-image call attends over all patches of the call with a block mask). ``image_src_PT`` says which row of the
flattened ``[I * L / merge**2, D]`` features each ``<|image_pad|>`` token takes (-1 for other tokens).

Prompts are re-packed to the left: the real tokens of a row (``attention_mask`` 1) keep their order and are moved
to the end of the row. This is exact: padding is never attended and positions count real tokens only
(``rope_index``), so a prompt gives the same logits whatever padding it had.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.rope_index import rope_index
from medad_jax.model.vision import VisionMeta, vision_meta

DEFAULT_LENGTH_BUCKETS = (32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
DEFAULT_PATCH_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


def pick_bucket(n: int, buckets: Sequence[int], what: str) -> int:
  """The smallest bucket ``>= n``; a clear error when ``n`` exceeds the largest."""
  fits = [b for b in sorted(buckets) if b >= n]
  if not fits:
    raise ValueError(f'{what} = {n} exceeds the largest bucket {max(buckets)}; pass larger buckets')
  return fits[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """Left-padded prompts ready for :func:`medad_jax.sampling.sampler.prefill` (numpy, host side).

  Rows past the real prompts are padding rows (all pad tokens) that start done (``done_P``).
  """

  input_ids_PT: np.ndarray          # int32, left-padded with the pad token
  attention_mask_PT: np.ndarray     # int32, 1 for real tokens
  positions_3PT: np.ndarray         # int32 M-RoPE positions (0 for padding)
  rope_deltas_P: np.ndarray         # int32: a token at cache slot c has position c + delta
  pixel_values_ILC: np.ndarray | None  # float32 patches per image, zero rows up to the patch bucket
  vision_meta_I: VisionMeta | None  # one VisionMeta per image, stacked on a leading I axis
  image_src_PT: np.ndarray          # int32 row of the flattened image features for image tokens, else -1
  done_P: np.ndarray                # bool: True for padding rows
  prompt_lengths_P: np.ndarray      # int32 real tokens per row (0 for padding rows)

  @property
  def num_prompts(self) -> int:
    return int(self.input_ids_PT.shape[0])

  @property
  def prompt_len(self) -> int:
    return int(self.input_ids_PT.shape[1])


def _rows(input_ids, attention_mask) -> list[np.ndarray]:
  """The real tokens of every prompt, from a ragged list or a padded ``[P, T]`` array with its mask."""
  if isinstance(input_ids, np.ndarray) or hasattr(input_ids, 'shape'):
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
      raise ValueError(f'input_ids has shape {ids.shape}; expected [P, T] (or a list of 1-D token sequences)')
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
      raise ValueError(f'attention_mask has shape {mask.shape}; expected {ids.shape} like input_ids')
    return [ids[i][mask[i]] for i in range(ids.shape[0])]
  if attention_mask is not None:
    raise ValueError('attention_mask is only meaningful with a padded [P, T] input_ids array, not a ragged list')
  rows = []
  for i, r in enumerate(input_ids):
    a = np.asarray(r)
    if a.ndim != 1:
      raise ValueError(f'input_ids[{i}] has shape {a.shape}; expected a 1-D sequence of token ids')
    rows.append(a)
  return rows


def prepare_prompts(cfg: Qwen25VLConfig, input_ids, *, attention_mask=None, pixel_values=None,
                    image_grid_thw=None, length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
                    patch_buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS, num_prompts: int | None = None
                    ) -> PromptBatch:
  """Processor-style inputs -> a bucketed, left-padded :class:`PromptBatch`.

  Args:
    cfg: the model config (pad / image token ids, merge size, vision shapes).
    input_ids: a list of 1-D token sequences, or a padded ``[P, T]`` array with ``attention_mask`` (either side).
      Image prompts hold one ``<|image_pad|>`` token per merged patch, as the processor writes them.
    pixel_values: ``[L, C]`` patches of all images of the batch in prompt order (the processor's output).
    image_grid_thw: ``[num_images, 3]`` patch grids of those images, in the same order.
    length_buckets / patch_buckets: allowed padded prompt lengths / patch counts per image.
    num_prompts: pad the batch with all-padding rows (done from the start) to this many prompts.
  """
  rows = _rows(input_ids, attention_mask)
  if not rows:
    raise ValueError('input_ids holds no prompts')
  empty = [i for i, r in enumerate(rows) if r.size == 0]
  if empty:
    raise ValueError(f'prompt {empty[0]} has no real tokens (attention_mask all 0 or an empty sequence)')
  floats = [i for i, r in enumerate(rows) if not np.issubdtype(r.dtype, np.integer)]
  if floats:
    raise ValueError(f'prompt {floats[0]}: token ids have dtype {rows[floats[0]].dtype}; expected integers')
  bad = [(i, int(r.min()), int(r.max())) for i, r in enumerate(rows)
         if r.min() < 0 or r.max() >= cfg.text.vocab_size]
  if bad:
    i, lo, hi = bad[0]
    raise ValueError(f'prompt {i}: token ids span [{lo}, {hi}]; expected ids in [0, {cfg.text.vocab_size})')
  P_real = len(rows)
  P = P_real if num_prompts is None else num_prompts
  if P < P_real:
    raise ValueError(f'num_prompts={num_prompts} is smaller than the {P_real} prompts given')
  if not 0 <= cfg.pad_token_id < cfg.text.vocab_size:
    # Padding is never attended, but an out-of-vocabulary id embeds to NaN and 0 * NaN poisons attention.
    raise ValueError(f'cfg.pad_token_id={cfg.pad_token_id} is outside the vocabulary [0, {cfg.text.vocab_size}); '
                     'set it to an in-vocabulary id (e.g. load_checkpoint(path, cfg=...))')
  T = pick_bucket(max(r.size for r in rows), length_buckets, 'prompt length (tokens)')
  ids = np.full((P, T), cfg.pad_token_id, np.int32)
  mask = np.zeros((P, T), np.int32)
  for i, r in enumerate(rows):
    ids[i, T - r.size:] = r
    mask[i, T - r.size:] = 1

  if (pixel_values is None) != (image_grid_thw is None):
    raise ValueError('pixel_values and image_grid_thw must be given together')
  pixels, meta, grid = None, None, None
  image_src = np.full((P, T), -1, np.int32)
  if pixel_values is not None:
    grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    pixels, meta, image_src = _per_image(cfg, np.asarray(pixel_values, np.float32), grid, ids, mask, P,
                                         patch_buckets)
  positions, deltas = rope_index(cfg, ids, mask, grid)
  done = np.arange(P) >= P_real
  lengths = np.array([r.size for r in rows] + [0] * (P - P_real), np.int32)
  return PromptBatch(input_ids_PT=ids, attention_mask_PT=mask, positions_3PT=positions, rope_deltas_P=deltas,
                     pixel_values_ILC=pixels, vision_meta_I=meta, image_src_PT=image_src, done_P=done,
                     prompt_lengths_P=lengths)


def _per_image(cfg: Qwen25VLConfig, pixels: np.ndarray, grid: np.ndarray, ids: np.ndarray, mask: np.ndarray,
               P: int, patch_buckets: Sequence[int]) -> tuple[np.ndarray, VisionMeta, np.ndarray]:
  """Concatenated patches -> ``([I, L, C] patches, stacked metas, image_src_PT)``, laid out per prompt row.

  With at most ``m`` images in any prompt, ``I = P * m`` and the images of prompt ``p`` occupy slots
  ``[p*m, p*m + m)`` (unused slots hold a dummy one-unit image that is encoded and never read). Any slice of whole
  prompts therefore owns the matching slice of images: the training steps split microbatches before the tower.
  """
  C = cfg.vision.patch_dim
  if pixels.ndim != 2 or pixels.shape[1] != C:
    raise ValueError(f'pixel_values has shape {pixels.shape}; expected [num_patches, {C}]')
  counts = grid.prod(-1)
  if pixels.shape[0] != int(counts.sum()):
    raise ValueError(f'pixel_values has {pixels.shape[0]} patches but image_grid_thw {grid.tolist()} describes '
                     f'{int(counts.sum())} (sum of t*h*w)')
  unit = cfg.vision.spatial_merge_size**2
  feats = counts // unit
  is_img = (ids == cfg.image_token_id) & mask.astype(bool)
  if int(is_img.sum()) != int(feats.sum()):
    raise ValueError(f'input_ids hold {int(is_img.sum())} image tokens (id {cfg.image_token_id}) but '
                     f'image_grid_thw {grid.tolist()} gives {int(feats.sum())} (sum of t*h*w/merge**2)')
  # Images are given in prompt order: prompt p takes images until their features cover its image tokens.
  owner, img, tokens_P = [], 0, is_img.sum(1)
  for p in range(P):
    need = int(tokens_P[p])
    mine = []
    while need > 0:
      if img >= len(grid) or feats[img] > need:
        raise ValueError(f'prompt {p} holds {int(tokens_P[p])} image tokens, which do not add up to whole images '
                         f'of image_grid_thw {grid.tolist()} taken in order')
      need -= int(feats[img])
      mine.append(img)
      img += 1
    owner.append(mine)
  m = max(1, max(len(o) for o in owner))
  L = pick_bucket(int(counts.max()), [b for b in patch_buckets if b % unit == 0], 'image patches per image')
  I = P * m
  out = np.zeros((I, L, C), np.float32)
  starts = np.concatenate([[0], np.cumsum(counts)])
  metas = [None] * I
  image_src = np.full(ids.shape, -1, np.int32)
  for p, mine in enumerate(owner):
    flat = []
    for j, i in enumerate(mine):
      slot = p * m + j
      out[slot, :counts[i]] = pixels[starts[i]:starts[i + 1]]
      metas[slot] = vision_meta(grid[i:i + 1], cfg.vision, pad_to=L)
      flat.append(slot * (L // unit) + np.arange(feats[i]))
    if flat:
      image_src[p][is_img[p]] = np.concatenate(flat)  # boolean indexing is row-major: the images' order
  mm = cfg.vision.spatial_merge_size
  dummy = vision_meta(np.array([[1, mm, mm]]), cfg.vision, pad_to=L)
  meta = jax.tree.map(lambda *xs: np.stack(xs), *[x if x is not None else dummy for x in metas])
  return out, meta, image_src
