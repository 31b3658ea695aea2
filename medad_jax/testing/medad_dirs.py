"""MedAD directories shaped like a real hospital export, for tests: every image a different size and pixel format,
plus a few records the loader must skip (each with its expected reason)."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from medad_jax.data import synth

# (width, height): twenty sizes, square to 1:5, tiny to a few hundred pixels
SIZES = ((40, 40), (56, 80), (100, 60), (123, 77), (200, 150), (64, 300), (300, 64), (57, 57), (90, 140),
         (250, 250), (33, 120), (120, 33), (75, 75), (160, 90), (90, 160), (45, 200), (210, 70), (128, 128),
         (61, 97), (333, 111))
MODES = ('L', 'RGB', 'RGBA', 'I;16', 'P')


def _convert(rgb: Image.Image, mode: str, rng: np.random.Generator) -> Image.Image:
  if mode == 'L':
    return rgb.convert('L')
  if mode == 'RGBA':
    a = np.asarray(rgb.convert('RGBA')).copy()
    a[..., 3] = rng.integers(128, 256, a.shape[:2], dtype=np.uint8)
    return Image.fromarray(a, 'RGBA')
  if mode == 'I;16':
    return Image.fromarray((np.asarray(rgb.convert('L')).astype(np.uint16) * 257))
  if mode == 'P':
    return rgb.convert('P', palette=Image.Palette.ADAPTIVE)
  return rgb


def write_mixed_size_dir(root: str, *, num_images: int = 20, seed: int = 0) -> dict:
  """medad-synth questions (five per image) whose images are re-saved at :data:`SIZES` in :data:`MODES` (grayscale,
  RGB, RGBA, 16-bit, palette), then three bad records appended to ``train.jsonl``. Returns ``{'records': total
  lines with a record, 'bad': {reason: count}, 'sizes': {(w, h)}}``."""
  synth.write_dir(synth.SynthConfig(num_images=num_images, seed=seed, image_size=112), root)
  rng = np.random.default_rng(seed)
  names = sorted(os.listdir(os.path.join(root, 'images')))
  sizes = set()
  for k, name in enumerate(names):
    path = os.path.join(root, 'images', name)
    w, h = SIZES[k % len(SIZES)]
    with Image.open(path) as im:
      rgb = im.convert('RGB').resize((w, h), Image.Resampling.BILINEAR)
    _convert(rgb, MODES[k % len(MODES)], rng).save(path)
    sizes.add((w, h))
  Image.fromarray(np.zeros((4, 1000), np.uint8)).save(os.path.join(root, 'images', 'strip.png'))  # 250:1
  with open(os.path.join(root, 'train.jsonl')) as f:
    lines = [json.loads(l) for l in f if l.strip()]
  bad = []
  r = dict(lines[0], id='bad-tags', image_id='bad-tags', question='Where?</think><answer>A</answer>')
  bad.append(r)
  bad.append(dict(lines[0], id='bad-strip', image_id='strip', image='images/strip.png'))
  bad.append(dict(lines[1], id='bad-long', image_id='bad-long', cot='The image shows a bright region. ' * 80))
  with open(os.path.join(root, 'train.jsonl'), 'a') as f:
    for b in bad:
      f.write(json.dumps(b) + '\n')
  n_test = sum(1 for l in open(os.path.join(root, 'test.jsonl')) if l.strip())
  return {'records': len(lines) + len(bad) + n_test, 'sizes': sizes,
          'bad': {'reserved_text': 1, 'bad_aspect_ratio': 1, 'target_too_long': 1}}
