"""``medad-synth``: seeded synthetic medical-like images whose VQA answers can be read from the pixels.

Every image is drawn in three layers from its own random streams (so dropping the lesion changes nothing else):

1. **Anatomy** -> a tissue-intensity map ``t[H, W]`` in ``[0, 1]``: each anatomy has its own shape (brain: tall oval
   with bright rim and dark midline; liver: wedge with vessel dots; retina: disc with bright optic disc and
   vessels; breast: dome from the top; skin: full-field crease pattern; lung: two tall dark ovals; thyroid:
   butterfly around a dark ring; alimentary: folded ring around a dark lumen; chest: rib bands and spine; lymph
   node: notched bean with bright cortex).
2. **Lesion** (abnormal images only) -> blended into ``t`` with weight ``alpha[H, W]``. Pathologies differ in size,
   shape, texture and intensity: Mass (large, lobulated, bright, mottled), Cyst (medium, smooth, dark with bright
   rim), Nodule (small, round, uniformly bright), Calcification (cluster of tiny very bright dots), Infiltrate
   (large, hazy, streaky, soft-edged). The lesion mask is ``alpha >= 0.5``; its centroid defines the region label
   (``regions.region_of``), and placement keeps it >= ``_CENTROID_MARGIN`` from every region boundary and the whole
   lesion inside the modality's field of view.
3. **Modality** -> colour palette, texture and framing: MRI (grey, smooth, noisy black background, bias field),
   CT (grey, fine grain, circular field of view, table bar), OCT (grey streaky speckle in a horizontal band),
   Ultrasound (grey speckle in a fan), Dermoscopy (skin colours, vignette, hairs), CE-MRI (grey, high contrast,
   bright vessels, black side bars), Endoscopy (red-pink, octagonal frame, specular highlights), Fundus
   (orange-red disc on black), X-ray (grey full frame, smooth, corner marker), Microscopy (H&E pinks with purple
   nuclei).

Records: five per image (one per task), question from the 10 templates, options with plausible distractors, the
correct letter balanced per (split, task) in blocks of four, a two-sentence CoT naming the drawn evidence, and a
seeded 70/30 train/test split by image. Image ``k`` depends only on ``(seed, k)``, so images can be made in any
order or in parallel and the bytes are reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import multiprocessing
import os
import time

import numpy as np
from PIL import Image, ImageDraw

from medad_jax.data import regions, templates
from medad_jax.data.schema import ANATOMIES, LETTERS, MODALITIES, TASKS, MedADRecord
from medad_jax.data.templates import NO_ABNORMALITY, NO_LESION, PATHOLOGIES

log = logging.getLogger(__name__)

# (modality, anatomy) pairs of the MedAD-38K sources (§3.1): BraTS/Br35H, LiverCT/Mosmed, RESC, BUSI/DDTI, ISIC/PH2,
# ATLAS, Kvasir/CVC, IDRiD, Chest X-ray, lymphoma/BACH microscopy.
REALISTIC_PAIRS: tuple[tuple[str, str], ...] = (
    ('MRI', 'Brain'), ('CT', 'Liver'), ('CT', 'Lung'), ('OCT', 'Retina'), ('Ultrasound', 'Breast'),
    ('Ultrasound', 'Thyroid'), ('Dermoscopy', 'Skin'), ('CE-MRI', 'Liver'), ('Endoscopy', 'Alimentary'),
    ('Fundus', 'Retina'), ('X-ray', 'Chest'), ('Microscopy', 'Lymph Node'), ('Microscopy', 'Breast'))
SOURCE = 'medad-synth'
_CENTROID_MARGIN = 0.03  # normalized distance of a lesion centroid from every region boundary
_ALPHA_FOOTPRINT = 0.02  # alpha above this counts as visible lesion, and must lie inside the field of view


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  """What to generate. ``pairs``: 'realistic' (the source datasets' pairs) or 'all' (every modality x anatomy)."""
  num_images: int = 500
  seed: int = 0
  image_size: int = 224  # a multiple of 28 keeps the Qwen2.5-VL processor from resizing
  abnormal_fraction: float = 0.6
  test_fraction: float = 0.3  # paper §4.1: test set = 30 %
  pairs: str = 'realistic'
  # False: the thoughts conclude with the option text only, never the letter (for the ``option`` answer format,
  # ``schema.ANSWER_FORMATS``); the images, questions, options and answers are the same either way.
  cot_letters: bool = True
  # Lesion conspicuity, a difficulty knob: every lesion's size (radii, the spread and size of calcification dots)
  # times this factor; 1.0 is the benchmark as designed. Small images make small lesions a pixel or two wide (a
  # calcification dot at 84 px), so a scale > 1 keeps them visible. Labels follow the drawn mask either way, the
  # random draws are the same (1.0 gives the same bytes as before the knob) and the answer statistics -- the blind
  # prior -- do not change; only what the pixels show does.
  lesion_scale: float = 1.0

  @classmethod
  def tiny(cls, seed: int = 0) -> 'SynthConfig':
    return cls(num_images=200, seed=seed)

  @classmethod
  def small(cls, seed: int = 0) -> 'SynthConfig':
    return cls(num_images=2_000, seed=seed)

  @classmethod
  def full(cls, seed: int = 0) -> 'SynthConfig':
    return cls(num_images=38_000, seed=seed)

  def __post_init__(self):
    if self.num_images < 1 or self.image_size < 32:
      raise ValueError(f'need num_images >= 1 and image_size >= 32, got {self}')
    if self.pairs not in ('realistic', 'all'):
      raise ValueError(f"pairs must be 'realistic' or 'all', got {self.pairs!r}")
    if not (0.0 <= self.abnormal_fraction <= 1.0 and 0.0 < self.test_fraction < 1.0):
      raise ValueError(f'bad fractions in {self}')
    if not 0.75 <= self.lesion_scale <= 1.5:  # at 2.0 some lesions no longer fit their region's field of view
      raise ValueError(f'lesion_scale must be in [0.75, 1.5], got {self}')

  def pair_list(self) -> tuple[tuple[str, str], ...]:
    return REALISTIC_PAIRS if self.pairs == 'realistic' else tuple((m, a) for m in MODALITIES for a in ANATOMIES)


@dataclasses.dataclass(frozen=True)
class SynthImage:
  """One generated image and the facts drawn into it."""
  index: int
  image_id: str
  split: str
  modality: str
  anatomy: str
  pathology: str | None  # None: normal image
  region: str | None  # region of the lesion-mask centroid
  centroid: tuple[float, float] | None  # normalized (x, y)
  pixels: np.ndarray  # [H, W, 3] uint8
  lesion_mask: np.ndarray  # [H, W] bool, alpha >= 0.5: the lesion proper (its centroid gives the region)
  lesion_footprint: np.ndarray  # [H, W] bool, alpha > 0: every pixel the lesion touches
  png: bytes


# ---------------------------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  c = ((np.arange(size, dtype=np.float32) + 0.5) / size)
  return np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(c[:, None], (size, size))


def _smooth_noise(rng: np.random.Generator, shape: int | tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
  """Zero-mean, unit-ish noise with ``cells = (rows, cols)`` degrees of freedom, bicubically upsampled to
  ``shape`` (``[H, W]``, or an int for a square)."""
  h, w = (shape, shape) if isinstance(shape, int) else shape
  lo = rng.standard_normal(cells, dtype=np.float32)
  return np.asarray(Image.fromarray(lo).resize((w, h), Image.BICUBIC))


def _ellipse(X, Y, cx, cy, a, b, angle=0.0):
  """Normalized elliptical radius (<= 1 inside)."""
  c, s = np.cos(angle), np.sin(angle)
  dx, dy = X - cx, Y - cy
  u, v = c * dx + s * dy, -s * dx + c * dy
  return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def _stamp(mask: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> None:
  """ORs a small axis-aligned ellipse into the bool ``mask`` in place, touching only its bounding box."""
  size = mask.shape[0]
  X, Y = _grid(size)
  i0, i1 = max(0, int((cy - ry) * size)), min(size, int((cy + ry) * size) + 2)
  j0, j1 = max(0, int((cx - rx) * size)), min(size, int((cx + rx) * size) + 2)
  if i0 < i1 and j0 < j1:
    mask[i0:i1, j0:j1] |= _ellipse(X[i0:i1, j0:j1], Y[i0:i1, j0:j1], cx, cy, rx, ry) < 1


def _inside(d, soft=0.03):
  return np.clip((1.0 - d) / soft + 0.5, 0.0, 1.0)


def _draw(size: int, fn) -> np.ndarray:
  """Rasterizes PIL drawing calls (given pixel coordinates via ``fn(draw, s)``) into a float map."""
  im = Image.new('F', (size, size), 0.0)
  fn(ImageDraw.Draw(im), float(size))
  return np.asarray(im)


def _curve(rng, x0, y0, x1, y1, bend, n=12):
  """Points of a gently bent polyline (normalized coordinates)."""
  ts = np.linspace(0.0, 1.0, n)
  nx, ny = -(y1 - y0), (x1 - x0)
  k = bend * np.sin(np.pi * ts)
  return [(x0 + (x1 - x0) * t + nx * kk, y0 + (y1 - y0) * t + ny * kk) for t, kk in zip(ts, k)]


# ---------------------------------------------------------------------------------------------- anatomy -> t


def anatomy_map(anatomy: str, size: int, rng: np.random.Generator) -> np.ndarray:
  """``t[H, W]`` tissue intensity of the anatomy, randomly shifted/scaled a little."""
  X0, Y0 = _grid(size)
  dx, dy = rng.uniform(-0.03, 0.03, size=2)
  sc = rng.uniform(0.93, 1.05)
  X, Y = (X0 - 0.5 - dx) / sc + 0.5, (Y0 - 0.5 - dy) / sc + 0.5
  tex = _smooth_noise(rng, size, (10, 10))

  def jit(pts):  # the same shift/scale as X, Y, for shapes drawn with PIL (normalized coordinates)
    return [((x - 0.5) * sc + 0.5 + dx, (y - 0.5) * sc + 0.5 + dy) for x, y in pts]

  if anatomy == 'Brain':
    d = _ellipse(X, Y, 0.5, 0.5, 0.34, 0.42)
    gyri = np.sin(38 * X + 5 * np.sin(11 * Y)) * np.sin(33 * Y + 4 * np.sin(9 * X))
    t = _inside(d) * (0.55 + 0.07 * gyri + 0.03 * tex)
    t = np.where((d > 0.9) & (d < 1.0), 0.92, t)
    t = np.where((np.abs(X - 0.5) < 0.009) & (d < 0.9), 0.22, t)
  elif anatomy == 'Liver':
    t = _inside(_ellipse(X, Y, 0.5, 0.5, 0.47, 0.44)) * (0.33 + 0.02 * tex)
    wedge = _draw(size, lambda dr, s: dr.polygon([(x * s, y * s) for x, y in jit(
        [(0.07, 0.32), (0.5, 0.2), (0.86, 0.3), (0.74, 0.5), (0.42, 0.78), (0.12, 0.7)])], fill=1.0))
    t = np.where(wedge > 0, 0.62 + 0.03 * tex, t)
    dots = np.zeros(t.shape, bool)
    for _ in range(5):
      vx, vy = jit([rng.uniform([0.2, 0.35], [0.65, 0.6])])[0]
      _stamp(dots, vx, vy, 0.016 * sc, 0.016 * sc)
    t = np.where(dots & (wedge > 0), 0.3, t)
  elif anatomy == 'Retina':
    d = _ellipse(X, Y, 0.5, 0.5, 0.4, 0.4)
    t = _inside(d) * (0.5 + 0.08 * (1 - d) + 0.02 * tex)
    ox, oy = 0.67, 0.5 + rng.uniform(-0.04, 0.04)
    vessels = _draw(size, lambda dr, s: [dr.line([(x * s, y * s) for x, y in jit(_curve(
        rng, ox, oy, ex, ey, rng.uniform(-0.25, 0.25)))], fill=1.0, width=max(1, int(s / 110)))
        for ex, ey in ((0.22, 0.25), (0.2, 0.72), (0.4, 0.14), (0.38, 0.86))])
    t = np.where((vessels > 0) & (d < 1), 0.22, t)
    t = np.where(_ellipse(X, Y, ox, oy, 0.055, 0.06) < 1, 0.95, t)
  elif anatomy == 'Breast':
    edge = 0.12 + 0.72 * np.sqrt(np.clip(1 - ((X - 0.5) / 0.44) ** 2, 0, 1))
    inside = _inside(Y / np.maximum(edge, 1e-3), 0.02) * (np.abs(X - 0.5) < 0.44)
    streak = np.sin(np.arctan2(X - 0.5, Y + 0.15) * 45 + 2 * tex)
    t = inside * (0.5 + 0.07 * streak + 0.03 * tex)
  elif anatomy == 'Skin':
    crease = (np.abs(np.sin(40 * (X + Y) + 3 * tex)) < 0.1) | (np.abs(np.sin(40 * (X - Y) + 2 * tex)) < 0.1)
    t = 0.58 + 0.04 * tex - 0.14 * crease
  elif anatomy == 'Lung':
    t = _inside(_ellipse(X, Y, 0.5, 0.5, 0.47, 0.46)) * (0.58 + 0.02 * tex)
    for cx in (0.3, 0.7):
      t = np.where(_ellipse(X, Y, cx, 0.5, 0.15, 0.34) < 1, 0.2 + 0.04 * tex, t)
  elif anatomy == 'Thyroid':
    t = _inside(_ellipse(X, Y, 0.5, 0.55, 0.45, 0.4)) * (0.34 + 0.02 * tex)
    lobes = (_ellipse(X, Y, 0.36, 0.5, 0.1, 0.17) < 1) | (_ellipse(X, Y, 0.64, 0.5, 0.1, 0.17) < 1)
    lobes |= (np.abs(X - 0.5) < 0.12) & (np.abs(Y - 0.63) < 0.03)
    t = np.where(lobes, 0.64 + 0.03 * tex, t)
    dt = _ellipse(X, Y, 0.5, 0.5, 0.085, 0.085)
    t = np.where(dt < 1, np.where(dt < 0.8, 0.08, 0.82), t)
  elif anatomy == 'Alimentary':
    r = np.sqrt((X - 0.5) ** 2 + (Y - 0.5) ** 2)
    theta = np.arctan2(Y - 0.5, X - 0.5)
    fold = 0.03 * np.sin(12 * theta + tex)
    t = np.where(r < 0.16 + fold, 0.08, np.where(r < 0.42, 0.62 + 0.08 * np.sin(12 * theta), 0.3)) + 0.02 * tex
  elif anatomy == 'Chest':
    body = _inside(np.maximum(np.abs(X - 0.5) / 0.43, np.abs(Y - 0.52) / 0.46), 0.02)  # a rounded box
    t = body * (0.3 + 0.02 * tex)
    ribs = np.zeros_like(t, dtype=bool)
    for k in range(6):
      yk = 0.2 + 0.115 * k + 0.45 * (X - 0.5) ** 2
      ribs |= (np.abs(Y - yk) < 0.018) & (np.abs(X - 0.5) > 0.05) & (np.abs(X - 0.5) < 0.4)
    t = np.where(ribs, 0.8, t)
    t = np.where((np.abs(X - 0.5) < 0.035) & (body > 0.5), 0.86, t)
  elif anatomy == 'Lymph Node':
    d = _ellipse(X, Y, 0.5, 0.48, 0.3, 0.2)
    notch = _ellipse(X, Y, 0.5, 0.7, 0.09, 0.09) < 1
    node = (d < 1) & ~notch
    t = np.where(node, np.where(d > 0.7, 0.76, 0.42), 0.24) + 0.02 * tex
  else:
    raise ValueError(f'unknown anatomy {anatomy!r}')
  return np.clip(t, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------- modality


@functools.lru_cache(maxsize=32)
def field_of_view(modality: str, size: int) -> np.ndarray:
  """``[H, W]`` bool (read-only): pixels the modality shows, and where an unobstructed lesion may be drawn."""
  fov = _field_of_view(modality, size)
  fov.flags.writeable = False
  return fov


def _field_of_view(modality: str, size: int) -> np.ndarray:
  X, Y = _grid(size)
  if modality == 'CT':
    return (_ellipse(X, Y, 0.5, 0.5, 0.47, 0.47) < 1) & (Y < 0.9)  # the table bar sits below 0.9
  if modality == 'OCT':
    return (Y > 0.12) & (Y < 0.88)
  if modality == 'Ultrasound':
    r = np.sqrt((X - 0.5) ** 2 + (Y + 0.1) ** 2)  # apex above the top edge
    return (np.abs(np.arctan2(X - 0.5, Y + 0.1)) < np.deg2rad(55)) & (r > 0.16) & (r < 1.06)
  if modality == 'Dermoscopy':
    return _ellipse(X, Y, 0.5, 0.5, 0.5, 0.5) < 0.95  # beyond this the vignette hides detail
  if modality == 'CE-MRI':
    return (X > 0.1) & (X < 0.9)
  if modality == 'Endoscopy':
    return (np.abs(X - 0.5) + np.abs(Y - 0.5) < 0.66) & (np.abs(X - 0.5) < 0.46) & (np.abs(Y - 0.5) < 0.46)
  if modality == 'Fundus':
    return _ellipse(X, Y, 0.5, 0.5, 0.46, 0.46) < 1
  if modality == 'X-ray':
    return ~((X < 0.12) & (Y < 0.12))  # the corner marker
  if modality in ('MRI', 'Microscopy'):
    return np.ones((size, size), bool)
  raise ValueError(f'unknown modality {modality!r}')


def _lut(stops: list[tuple[float, tuple[float, float, float]]]) -> np.ndarray:
  """256-entry RGB palette interpolated between ``(t, rgb)`` stops."""
  ts = np.linspace(0.0, 1.0, 256)
  xs = [s for s, _ in stops]
  return np.stack([np.interp(ts, xs, [c[i] for _, c in stops]) for i in range(3)], -1).astype(np.float32)


_GREY = _lut([(0.0, (0.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 1.0))])
_PALETTES = {
    'Dermoscopy': _lut([(0.0, (0.3, 0.16, 0.1)), (0.55, (0.86, 0.66, 0.56)), (1.0, (1.0, 0.93, 0.9))]),
    'Endoscopy': _lut([(0.0, (0.3, 0.03, 0.04)), (0.55, (0.85, 0.38, 0.36)), (1.0, (1.0, 0.8, 0.75))]),
    'Fundus': _lut([(0.0, (0.3, 0.05, 0.01)), (0.5, (0.85, 0.36, 0.08)), (1.0, (1.0, 0.9, 0.45))]),
    'Microscopy': _lut([(0.0, (0.97, 0.92, 0.95)), (0.5, (0.9, 0.58, 0.74)), (1.0, (0.42, 0.22, 0.58))]),
}


def _colorize(t: np.ndarray, lut: np.ndarray) -> np.ndarray:
  return lut[np.clip(t * 255.0 + 0.5, 0, 255).astype(np.int32)]


def render_modality(modality: str, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """``[H, W, 3]`` float image in ``[0, 1]`` of tissue map ``t`` in the modality's style (framing included)."""
  size = t.shape[0]
  X, Y = _grid(size)
  fov = field_of_view(modality, size)
  n = lambda: rng.standard_normal((size, size), dtype=np.float32)  # noqa: E731
  if modality == 'MRI':
    ang = rng.uniform(0, 2 * np.pi)
    bias = 0.88 + 0.24 * (np.cos(ang) * (X - 0.5) + np.sin(ang) * (Y - 0.5))
    g = (0.04 + 0.86 * t) * bias + 0.03 * _smooth_noise(rng, size, (8, 8)) * (t > 0.05)
    g = np.where(t > 0.05, g + 0.012 * n(), np.abs(0.035 * n()))  # Rician-like background
    return np.repeat(np.clip(g, 0, 1)[..., None], 3, -1)
  if modality == 'CT':
    g = 0.08 + 0.78 * t + 0.045 * n()
    g = np.where(fov, g, 0.0)
    g = np.where((np.abs(Y - 0.925) < 0.012) & (np.abs(X - 0.5) < 0.36), 0.75, g)
    return np.repeat(np.clip(g, 0, 1)[..., None], 3, -1)
  if modality == 'OCT':
    speckle = np.exp(0.25 * _smooth_noise(rng, size, (size, max(8, size // 8))))
    layers = 0.8 + 0.2 * np.sin(2 * np.pi * 9 * Y)
    g = (0.1 + 0.8 * t * layers) * speckle
    g = np.where(fov, g, 0.02 + 0.01 * np.abs(n()))
    return np.repeat(np.clip(g, 0, 1)[..., None], 3, -1)
  if modality == 'Ultrasound':
    half = max(8, size // 2)
    speckle = np.abs(_smooth_noise(rng, size, (half, half))) * 1.25
    g = (0.06 + 0.85 * t) * (0.55 + 0.45 * speckle)
    return np.repeat(np.clip(np.where(fov, g, 0.0), 0, 1)[..., None], 3, -1)
  if modality == 'CE-MRI':
    vessels = _draw(size, lambda dr, s: [dr.line([(x * s, y * s) for x, y in _curve(
        rng, *rng.uniform(0.15, 0.85, size=4), rng.uniform(-0.3, 0.3))], fill=1.0, width=max(1, int(s / 90)))
        for _ in range(int(rng.integers(3, 6)))])
    t2 = np.where((vessels > 0) & (t > 0.05), 0.97, t)
    g = np.clip(1.25 * t2 - 0.1, 0, 1) + 0.012 * n()
    return np.repeat(np.clip(np.where(fov, g, 0.0), 0, 1)[..., None], 3, -1)
  if modality == 'X-ray':
    g = 0.1 + 0.8 * t + 0.05 * (Y - 0.5) + 0.008 * n()
    g = np.where((X > 0.03) & (X < 0.09) & (Y > 0.03) & (Y < 0.09), 0.97, g)
    return np.repeat(np.clip(g, 0, 1)[..., None], 3, -1)
  # Colour modalities: palette, then texture and framing.
  rgb = _colorize(t, _PALETTES[modality])
  if modality == 'Dermoscopy':
    rgb = rgb * (1.0 + 0.03 * n())[..., None]
    hairs = _draw(size, lambda dr, s: [dr.line([(x * s, y * s) for x, y in _curve(
        rng, *rng.uniform(0.0, 1.0, size=4), rng.uniform(-0.3, 0.3))], fill=1.0, width=1)
        for _ in range(int(rng.integers(2, 5)))])
    rgb = np.where(hairs[..., None] > 0, np.array([0.18, 0.1, 0.06], np.float32), rgb)
    r = _ellipse(X, Y, 0.5, 0.5, 0.5, 0.5)
    rgb = rgb * np.clip(1.0 - (r - 0.95) / 0.35, 0.06, 1.0)[..., None]
  elif modality == 'Endoscopy':
    rgb = rgb * (0.82 + 0.18 * np.clip(1 - _ellipse(X, Y, 0.5, 0.5, 0.6, 0.6), 0, 1))[..., None]
    rgb = rgb * (1.0 + 0.02 * n())[..., None]
    glints = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(3, 7))):
      hx, hy = rng.uniform(0.15, 0.85, size=2)
      _stamp(glints, hx, hy, 0.012, 0.008)
    rgb = np.where(glints[..., None], 1.0, rgb)
    rgb = np.where(fov[..., None], rgb, 0.0)
  elif modality == 'Fundus':
    rgb = rgb * (1.0 + 0.03 * _smooth_noise(rng, size, (12, 12)))[..., None]
    rgb = np.where(fov[..., None], rgb, 0.0)
  elif modality == 'Microscopy':
    rgb = rgb * (1.0 + 0.02 * n())[..., None]
    nuclei = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(50, 90))):
      nx, ny = rng.uniform(0.0, 1.0, size=2)
      rr = rng.uniform(0.008, 0.014)
      _stamp(nuclei, nx, ny, rr, rr * 0.8)
    rgb = np.where(nuclei[..., None], np.array([0.36, 0.2, 0.55], np.float32), rgb)
  else:
    raise ValueError(f'unknown modality {modality!r}')
  return np.clip(rgb, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------- lesions


_LESION_REACH = 0.16  # bound on every lesion footprint's radius (Mass: 0.12 * 1.22 * 1.05; Infiltrate: 0.11 * 1.39)


def lesion_alpha(pathology: str, cx: float, cy: float, X: np.ndarray, Y: np.ndarray, rng: np.random.Generator,
                 scale: float = 1.0):
  """``(alpha, target)`` on the coordinate window ``X, Y``: blending weight and the tissue value ``t`` is pulled to
  (``t <- t * (1 - alpha) + target * alpha``). ``scale``: ``SynthConfig.lesion_scale`` (sizes only; the same random
  draws)."""
  shape = X.shape
  if pathology == 'Mass':
    r = rng.uniform(0.09, 0.12) * scale
    theta = np.arctan2(Y - cy, X - cx)
    ks = np.arange(2, 6)
    amp, ph = rng.uniform(0.3, 1.0, 4), rng.uniform(0, 2 * np.pi, 4)
    wob = np.tensordot(amp / amp.sum(), np.sin(ks[:, None, None] * theta[None] + ph[:, None, None]), 1)
    d = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2) / (r * (1.0 + 0.22 * wob))
    alpha = np.clip((1.0 - d) / 0.1 + 0.5, 0, 1)
    return alpha, 0.88 + 0.1 * _smooth_noise(rng, shape, (8, 8))
  if pathology == 'Cyst':
    r = rng.uniform(0.065, 0.085) * scale
    d = _ellipse(X, Y, cx, cy, r, r * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi))
    alpha = np.clip((1.0 - d) / 0.06 + 0.5, 0, 1)
    return alpha, np.where(d > 0.75, 0.97, 0.03).astype(np.float32)
  if pathology == 'Nodule':
    r = rng.uniform(0.042, 0.055) * scale
    d = _ellipse(X, Y, cx, cy, r, r)
    return np.clip((1.0 - d) / 0.08 + 0.5, 0, 1), np.full(shape, 1.0, np.float32)
  if pathology == 'Calcification':
    alpha = np.zeros(shape, np.float32)
    n = int(rng.integers(5, 9))
    # Dots placed symmetrically in pairs around the centre keep the cluster centroid near (cx, cy).
    for _ in range(n // 2 + n % 2):
      ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.018, 0.05) * scale
      rd = rng.uniform(0.011, 0.015) * scale
      for sgn in (1.0, -1.0):
        d = _ellipse(X, Y, cx + sgn * rad * np.cos(ang), cy + sgn * rad * np.sin(ang), rd, rd)
        alpha = np.maximum(alpha, np.clip((1.0 - d) / 0.15 + 0.5, 0, 1))
    return alpha, np.full(shape, 1.0, np.float32)
  if pathology == 'Infiltrate':
    r = rng.uniform(0.09, 0.11) * scale
    ang = rng.uniform(0, np.pi)
    d = _ellipse(X, Y, cx, cy, r, r * rng.uniform(0.65, 0.85), ang)
    alpha = 0.9 * np.exp(-1.5 * d ** 2)
    alpha = np.where(alpha < 0.05, 0.0, alpha).astype(np.float32)  # a finite footprint (d < ~1.4)
    streak = np.sin(70 * (np.cos(ang) * (X - cx) + np.sin(ang) * (Y - cy)) + _smooth_noise(rng, shape, (6, 6)))
    return alpha, (0.88 + 0.12 * streak).astype(np.float32)
  raise ValueError(f'unknown pathology {pathology!r}')


def apply_lesion(t: np.ndarray, alpha: np.ndarray, target: np.ndarray) -> np.ndarray:
  return (t * (1.0 - alpha) + target * alpha).astype(np.float32)


def mask_centroid(mask: np.ndarray) -> tuple[float, float]:
  """Normalized ``(x, y)`` centroid of the pixel centres in ``mask``."""
  ii, jj = np.nonzero(mask)
  h, w = mask.shape
  return float((jj.mean() + 0.5) / w), float((ii.mean() + 0.5) / h)


def place_lesion(pathology: str, region: str, t: np.ndarray, fov: np.ndarray, rng: np.random.Generator,
                 scale: float = 1.0):
  """Samples a lesion in ``region`` whose whole footprint lies inside ``fov`` and the image; prefers a centre on
  tissue. ``scale``: ``SynthConfig.lesion_scale``. Returns full-size ``(alpha, target)``."""
  size = t.shape[0]
  X, Y = _grid(size)
  inner = fov.copy()
  inner[[0, -1], :] = inner[:, [0, -1]] = False  # a footprint touching the edge would be cut off
  reach = int(np.ceil(_LESION_REACH * scale * size)) + 1
  for attempt in range(1000):
    cx, cy = regions.sample_point(rng, region, margin=0.06)
    i, j = int(cy * size), int(cx * size)
    if not fov[i, j] or (attempt < 500 and t[i, j] < 0.1):
      continue  # outside the field of view, or (at first) on background rather than tissue
    win = (slice(max(0, i - reach), min(size, i + reach + 1)), slice(max(0, j - reach), min(size, j + reach + 1)))
    alpha, target = lesion_alpha(pathology, cx, cy, X[win], Y[win], rng, scale)
    mask = alpha >= 0.5
    if not mask.any() or np.any((alpha > _ALPHA_FOOTPRINT) & ~inner[win]):
      continue
    ii, jj = np.nonzero(mask)
    mx, my = (jj.mean() + win[1].start + 0.5) / size, (ii.mean() + win[0].start + 0.5) / size
    if regions.region_of(mx, my) == region and regions.boundary_distance(mx, my) >= _CENTROID_MARGIN:
      full_alpha = np.zeros((size, size), np.float32)
      full_alpha[win] = alpha
      full_target = np.zeros((size, size), np.float32)
      full_target[win] = target
      return full_alpha, full_target
  raise RuntimeError(f'could not place a {pathology} in {region} inside the field of view ({fov.mean():.2f} '
                     'of the image)')


# ---------------------------------------------------------------------------------------------- plan and records


class SynthPlan:
  """Random-access plan of a synthetic dataset: split, letters, and per-image random streams."""

  def __init__(self, cfg: SynthConfig):
    self.cfg = cfg
    n = cfg.num_images
    n_test = int(round(cfg.test_fraction * n))
    order = np.random.default_rng([cfg.seed, 3]).permutation(n)
    self.is_test = np.zeros(n, bool)
    self.is_test[order[:n_test]] = True
    # Position of each image inside its split (by index): letters are balanced over these positions.
    self.position = np.zeros(n, np.int64)
    for flag in (False, True):
      idx = np.nonzero(self.is_test == flag)[0]
      self.position[idx] = np.arange(len(idx))

  def image_id(self, k: int) -> str:
    return f'synth{self.cfg.seed}-{k:06d}'

  def split(self, k: int) -> str:
    return 'test' if self.is_test[k] else 'train'

  def letter(self, k: int, task: str) -> str:
    pos = int(self.position[k])
    perm = np.random.default_rng([self.cfg.seed, 2, int(self.is_test[k]), TASKS.index(task), pos // 4]).permutation(4)
    return LETTERS[int(perm[pos % 4])]

  def rngs(self, k: int) -> list[np.random.Generator]:
    """Independent streams for: labels, anatomy, lesion, modality texture, text."""
    ss = np.random.SeedSequence([self.cfg.seed, k])
    return [np.random.default_rng(s) for s in ss.spawn(5)]


def encode_png(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format='PNG', compress_level=1)  # level 1: ~same size, much faster
  return buf.getvalue()


def generate_image(plan: SynthPlan, k: int, *, with_lesion: bool = True) -> SynthImage:
  """Image ``k`` of the plan. ``with_lesion=False`` renders the same image with the lesion left out (for tests)."""
  cfg = plan.cfg
  if not 0 <= k < cfg.num_images:
    raise IndexError(f'image index {k} outside [0, {cfg.num_images})')
  r_label, r_anat, r_lesion, r_mod, _ = plan.rngs(k)
  pairs = cfg.pair_list()
  modality, anatomy = pairs[int(r_label.integers(len(pairs)))]
  abnormal = bool(r_label.random() < cfg.abnormal_fraction)
  pathology = PATHOLOGIES[int(r_label.integers(len(PATHOLOGIES)))]
  region = regions.REGIONS[int(r_label.integers(len(regions.REGIONS)))]
  size = cfg.image_size
  t = anatomy_map(anatomy, size, r_anat)
  mask = footprint = np.zeros((size, size), bool)
  centroid = None
  if abnormal:
    alpha, target = place_lesion(pathology, region, t, field_of_view(modality, size), r_lesion, cfg.lesion_scale)
    mask, footprint = alpha >= 0.5, alpha > 0
    centroid = mask_centroid(mask)
    region = regions.region_of(*centroid)  # the label is read off the drawn mask
    if with_lesion:
      t = apply_lesion(t, alpha, target)
  pixels = (render_modality(modality, t, r_mod) * 255.0 + 0.5).astype(np.uint8)
  return SynthImage(index=k, image_id=plan.image_id(k), split=plan.split(k), modality=modality,
                    anatomy=anatomy, pathology=pathology if abnormal else None, region=region if abnormal else None,
                    centroid=centroid, pixels=pixels, lesion_mask=mask, lesion_footprint=footprint,
                    png=encode_png(pixels))


def correct_option(img: SynthImage, task: str) -> str:
  """The true answer text of ``task`` for the drawn image."""
  if task == 'modality_classification':
    return img.modality
  if task == 'anatomy_identification':
    return img.anatomy
  if task == 'anomaly_detection':
    return templates.ABNORMAL_YES if img.pathology else templates.ABNORMAL_NO
  if task == 'pathology_characterization':
    return img.pathology or NO_ABNORMALITY
  if task == 'lesion_localization':
    return img.region or NO_LESION
  raise ValueError(f'unknown task {task!r}')


def image_records(plan: SynthPlan, img: SynthImage, image_ref: str | bytes | None = None) -> list[MedADRecord]:
  """The five VQA records of ``img``; ``image_ref`` is its path (default: the PNG bytes)."""
  rng = plan.rngs(img.index)[4]
  out = []
  for task in TASKS:
    letter = plan.letter(img.index, task)
    correct = correct_option(img, task)
    options = templates.make_options(rng, task, correct, letter)
    question = templates.pick_question(rng, task)
    cot = templates.make_cot(rng, task, modality=img.modality, anatomy=img.anatomy, pathology=img.pathology,
                             region=img.region, answer_text=correct,
                             letter=letter if plan.cfg.cot_letters else None)
    out.append(MedADRecord(
        id=f'{img.image_id}-{task}', image_id=img.image_id, image=img.png if image_ref is None else image_ref,
        modality=img.modality, anatomy=img.anatomy, task=task, question=question, options=options, answer=letter,
        source=SOURCE, split=img.split, cot=cot, region=img.region, pathology=img.pathology,
        abnormal=img.pathology is not None))
  return out


def generate(cfg: SynthConfig, indices=None):
  """Yields ``(SynthImage, records)`` for the given image indices (default: all), records holding PNG bytes."""
  plan = SynthPlan(cfg)
  for k in (range(cfg.num_images) if indices is None else indices):
    img = generate_image(plan, int(k))
    yield img, image_records(plan, img)


# ---------------------------------------------------------------------------------------------- writing a directory


def _write_one(args):
  cfg, out_dir, k = args
  plan = _worker_plan(cfg)
  img = generate_image(plan, k)
  path = os.path.join(out_dir, 'images', f'{img.image_id}.png')
  with open(path, 'wb') as f:
    f.write(img.png)
  return img.split, image_records(plan, img, image_ref=path)


@functools.lru_cache(maxsize=2)
def _worker_plan(cfg: SynthConfig) -> SynthPlan:
  return SynthPlan(cfg)


def write_dir(cfg: SynthConfig, out_dir: str, *, workers: int = 1) -> dict:
  """Writes ``out_dir/images/*.png``, ``train.jsonl``, ``test.jsonl`` and ``synth_config.json``; returns stats."""
  from medad_jax.data.loader import write_jsonl  # local: loader imports nothing from here, keep it one-way
  os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)
  t0 = time.perf_counter()
  jobs = [(cfg, out_dir, k) for k in range(cfg.num_images)]
  by_split: dict[str, list[MedADRecord]] = {'train': [], 'test': []}
  if workers > 1:
    with multiprocessing.get_context('spawn').Pool(workers) as pool:
      results = pool.imap(_write_one, jobs, chunksize=16)
      for split, recs in results:
        by_split[split].extend(recs)
  else:
    for job in jobs:
      split, recs = _write_one(job)
      by_split[split].extend(recs)
  for split, recs in by_split.items():
    write_jsonl(os.path.join(out_dir, f'{split}.jsonl'), recs, out_dir)
  seconds = time.perf_counter() - t0
  with open(os.path.join(out_dir, 'synth_config.json'), 'w') as f:
    json.dump(dataclasses.asdict(cfg), f, indent=1)
  stats = {'images': cfg.num_images, 'records': sum(len(v) for v in by_split.values()), 'seconds': seconds,
           'images_per_s': cfg.num_images / seconds, 'workers': workers}
  log.info('wrote %s: %s', out_dir, stats)
  return stats


def benchmark(cfg: SynthConfig, num_images: int = 200) -> dict:
  """Images/s of ``generate_image`` + ``image_records`` (PNG encoding included) in this process."""
  plan = SynthPlan(cfg)
  n = min(num_images, cfg.num_images)
  generate_image(plan, 0)  # warm caches (grids, palettes)
  t0, c0 = time.perf_counter(), time.process_time()
  for k in range(n):
    image_records(plan, generate_image(plan, k))
  dt, dc = time.perf_counter() - t0, time.process_time() - c0
  # CPU time is the steadier figure on a shared machine; wall time is what a user waits.
  return {'images': n, 'wall_s': dt, 'cpu_s': dc, 'images_per_s': n / dt, 'images_per_cpu_s': n / dc,
          'image_size': cfg.image_size}
