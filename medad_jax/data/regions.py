"""The five lesion-localization regions (paper Figure 4), defined once and used everywhere.

Geometry, in normalized image coordinates ``x`` (left -> right) and ``y`` (top -> bottom), both in ``[0, 1)``:

    +-----------+-----------+        Center Region: the square [0.3, 0.7) x [0.3, 0.7) (side 0.4).
    |   Left    |   Right   |        Quadrants: the rest of the image, split at x = 0.5 and y = 0.5.
    |   Upper   |   Upper   |        "Left"/"Right" are as the viewer sees the image (image coordinates),
    |     +-----+-----+     |        not the patient's side: radiological left-right flips are the
    |-----|  Center   |-----|        dataset's business, the grid is a property of the picture.
    |     +-----+-----+     |
    |   Left    |   Right   |        A point on a boundary belongs to the region on its right / below
    |   Lower   |   Lower   |        (half-open intervals), so every point has exactly one region.
    +-----------+-----------+

The synthetic generator places lesions with ``sample_point`` (at least ``margin`` away from every boundary),
labels them with ``region_of`` on the centroid of the drawn lesion mask, the tests validate labels with the same
``region_of``, and the contact sheet draws the grid from ``boundary_segments``.
"""

from __future__ import annotations

import numpy as np

REGIONS: tuple[str, ...] = ('Left Upper', 'Right Upper', 'Left Lower', 'Right Lower', 'Center Region')
CENTER_BOX: tuple[float, float, float, float] = (0.3, 0.3, 0.7, 0.7)  # x0, y0, x1, y1
MID: float = 0.5


def region_of(x: float, y: float) -> str:
  """Region name of the normalized point ``(x, y)``."""
  if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
    raise ValueError(f'point ({x}, {y}) is outside the unit square')
  x0, y0, x1, y1 = CENTER_BOX
  if x0 <= x < x1 and y0 <= y < y1:
    return 'Center Region'
  side = 'Left' if x < MID else 'Right'
  level = 'Upper' if y < MID else 'Lower'
  return f'{side} {level}'


def boundary_segments() -> list[tuple[tuple[float, float], tuple[float, float]]]:
  """Every region boundary as ``((xa, ya), (xb, yb))`` segments: the center box and four half mid-lines."""
  x0, y0, x1, y1 = CENTER_BOX
  box = [((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))]
  mids = [((MID, 0.0), (MID, y0)), ((MID, y1), (MID, 1.0)), ((0.0, MID), (x0, MID)), ((x1, MID), (1.0, MID))]
  return box + mids


def boundary_distance(x: float, y: float) -> float:
  """Euclidean distance from ``(x, y)`` to the nearest region boundary (normalized units)."""
  p = np.array([x, y], np.float64)
  best = np.inf
  for a, b in boundary_segments():
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    t = np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0.0, 1.0)
    best = min(best, float(np.linalg.norm(p - (a + t * (b - a)))))
  return best


def sample_point(rng: np.random.Generator, region: str, margin: float, max_tries: int = 10_000) -> tuple[float, float]:
  """Uniform point of ``region`` at least ``margin`` from every region boundary and from the image edge."""
  if region not in REGIONS:
    raise ValueError(f'unknown region {region!r}; expected one of {REGIONS}')
  for _ in range(max_tries):
    x, y = rng.uniform(margin, 1.0 - margin, size=2)
    if region_of(x, y) == region and boundary_distance(x, y) >= margin:
      return float(x), float(y)
  raise ValueError(f'no point of {region!r} is {margin} away from every boundary')


def region_map(height: int, width: int) -> np.ndarray:
  """``[H, W]`` int map: index into ``REGIONS`` of each pixel centre."""
  ys = (np.arange(height) + 0.5) / height
  xs = (np.arange(width) + 0.5) / width
  x0, y0, x1, y1 = CENTER_BOX
  left = xs[None, :] < MID
  upper = ys[:, None] < MID
  out = np.where(upper, np.where(left, 0, 1), np.where(left, 2, 3))
  center = (xs[None, :] >= x0) & (xs[None, :] < x1) & (ys[:, None] >= y0) & (ys[:, None] < y1)
  return np.where(center, 4, out).astype(np.int32)
