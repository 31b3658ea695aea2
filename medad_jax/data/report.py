"""Dataset inspection: label counts, and a contact sheet of sample images with the five-region grid drawn."""

from __future__ import annotations

import collections
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from medad_jax.data import regions
from medad_jax.data.schema import ANATOMIES, LETTERS, MODALITIES, TASKS, MedADRecord, load_image

_AXES = ('task', 'modality', 'anatomy', 'answer', 'region', 'pathology', 'split', 'source')
_ORDER = {'task': TASKS, 'modality': MODALITIES, 'anatomy': ANATOMIES, 'answer': LETTERS,
          'region': regions.REGIONS + ('none',)}


def summarize(records: Iterable[MedADRecord]) -> dict:
  """Counts per split of: records and images, and records by task / modality / anatomy / answer letter / lesion
  region / pathology / source; plus answer letters per task (to check that letters are balanced)."""
  out: dict = {}
  images: dict[str, set] = collections.defaultdict(set)
  for r in records:
    s = out.setdefault(r.split, {'records': 0, **{a: collections.Counter() for a in _AXES if a != 'split'},
                                 'answer_by_task': collections.defaultdict(collections.Counter)})
    s['records'] += 1
    images[r.split].add(r.image_id)
    for axis in _AXES:
      if axis == 'split':
        continue
      v = getattr(r, axis)
      s[axis][v if v is not None else 'none'] += 1
    s['answer_by_task'][r.task][r.answer] += 1
  for split, s in out.items():
    s['images'] = len(images[split])
    for axis in list(s):
      if isinstance(s[axis], collections.Counter):
        order = _ORDER.get(axis)
        keys = [k for k in order if k in s[axis]] if order else sorted(s[axis])
        s[axis] = {k: s[axis][k] for k in keys}
    s['answer_by_task'] = {t: {l: s['answer_by_task'][t][l] for l in LETTERS} for t in TASKS
                           if t in s['answer_by_task']}
  return out


def format_summary(summary: dict) -> str:
  lines = []
  for split, s in sorted(summary.items()):
    lines.append(f'== {split}: {s["records"]} records, {s["images"]} images')
    for axis in ('task', 'modality', 'anatomy', 'answer', 'region', 'pathology', 'source'):
      lines.append(f'  {axis:10s} ' + ', '.join(f'{k}: {v}' for k, v in s[axis].items()))
    for task, counts in s['answer_by_task'].items():
      lines.append(f'  answer|{task:28s} ' + ' '.join(f'{l}:{n}' for l, n in counts.items()))
  return '\n'.join(lines)


def draw_region_grid(im: Image.Image, color=(255, 255, 0), width: int = 1) -> Image.Image:
  """A copy of ``im`` with the five-region boundaries (``regions.boundary_segments``) drawn on it."""
  im = im.convert('RGB').copy()
  w, h = im.size
  dr = ImageDraw.Draw(im)
  for (xa, ya), (xb, yb) in regions.boundary_segments():
    dr.line([(xa * (w - 1), ya * (h - 1)), (xb * (w - 1), yb * (h - 1))], fill=color, width=width)
  return im


def contact_sheet(records: Sequence[MedADRecord], *, columns: int = 6, tile: int = 224,
                  marks: Sequence[tuple[float, float] | None] | None = None) -> Image.Image:
  """One tile per record: image with the region grid, captioned modality / anatomy / lesion region.

  ``marks`` optionally gives a normalized ``(x, y)`` per record to draw as a red cross (e.g. a lesion centroid).
  """
  if not records:
    raise ValueError('contact_sheet needs at least one record')
  caption_h = 30
  rows = (len(records) + columns - 1) // columns
  sheet = Image.new('RGB', (columns * tile, rows * (tile + caption_h)), (32, 32, 32))
  dr = ImageDraw.Draw(sheet)
  for i, r in enumerate(records):
    x0, y0 = (i % columns) * tile, (i // columns) * (tile + caption_h)
    im = draw_region_grid(load_image(r).resize((tile, tile), Image.BILINEAR))
    if marks is not None and marks[i] is not None:
      mx, my = marks[i][0] * tile, marks[i][1] * tile
      d = ImageDraw.Draw(im)
      d.line([(mx - 6, my), (mx + 6, my)], fill=(255, 0, 0), width=2)
      d.line([(mx, my - 6), (mx, my + 6)], fill=(255, 0, 0), width=2)
    sheet.paste(im, (x0, y0))
    lesion = f'{r.pathology or "?"} @ {r.region}' if r.region else ('normal' if r.abnormal is False else 'no region')
    dr.text((x0 + 3, y0 + tile + 2), f'{r.modality} / {r.anatomy}', fill=(255, 255, 255))
    dr.text((x0 + 3, y0 + tile + 15), lesion, fill=(200, 200, 200))
  return sheet


def pick_one_per_image(records: Iterable[MedADRecord], n: int, seed: int = 0) -> list[MedADRecord]:
  """Up to ``n`` records with distinct images (first record of each image), sampled with ``seed``."""
  first: dict[str, MedADRecord] = {}
  for r in records:
    first.setdefault(r.image_id, r)
  recs = list(first.values())
  idx = np.random.default_rng(seed).permutation(len(recs))[:n]
  return [recs[i] for i in sorted(idx)]
