"""Decoding a record's image to 8-bit RGB the way a real hospital export needs, and the size limits checked at load.

``to_rgb(image)``:

1. EXIF orientation applied (``PIL.ImageOps.exif_transpose``): a phone or scanner JPEG stored sideways with an
   orientation tag is shown to the model upright, as every viewer shows it.
2. More than 8 bits per sample (16-bit / 32-bit / float grayscale, common for CT, MRI and X-ray PNGs and TIFFs):
   min-max scaled to 8-bit grayscale. PIL's own conversion would clip every value above 255 (a full-range 16-bit
   image becomes nearly all white). The processor (``medad_jax/processor.py``) scales the same way.
3. Transparency (RGBA, LA, a palette with a transparent colour): composited onto white, exactly as
   ``transformers.image_transforms.convert_to_rgb`` does (a test compares the two); other modes (L, P, CMYK,
   YCbCr, ...) are converted by PIL.

Limits (``check_size``): ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`) refuses images so large that decoding
them costs seconds and gigabytes although the processor shrinks them to ``data.image_size`` anyway; the aspect
ratio limit is Qwen2-VL's (``smart_resize`` refuses images more elongated than 200:1). Both read the header only.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_ASPECT_RATIO = 200  # = medad_jax.processor.MAX_ASPECT_RATIO (Qwen2-VL smart_resize)
HIGH_BIT_DEPTH_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')


def open_image(image: str | bytes) -> Image.Image:
  """A lazily decoded PIL image of a path or encoded bytes (the caller closes it)."""
  return Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)


def to_8bit(im: Image.Image) -> Image.Image:
  """A 16-bit / 32-bit / float grayscale image min-max scaled to 8-bit ``L``; any other image unchanged."""
  if im.mode not in HIGH_BIT_DEPTH_MODES:
    return im
  a = np.asarray(im, dtype=np.float64)
  lo, hi = float(a.min()), float(a.max())
  scaled = np.zeros(a.shape, np.uint8) if hi <= lo else np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)
  return Image.fromarray(scaled, mode='L')


def to_rgb(im: Image.Image) -> Image.Image:
  """8-bit RGB (see the module docstring); decodes ``im``."""
  im = to_8bit(ImageOps.exif_transpose(im))
  if im.mode == 'RGB':
    return im
  if 'A' in im.getbands() or im.info.get('transparency') is not None:
    rgba = im.convert('RGBA')
    return Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba).convert('RGB')
  return im.convert('RGB')


def load_rgb(image: str | bytes) -> Image.Image:
  """The image at a path / in encoded bytes as 8-bit RGB (decoded now)."""
  with open_image(image) as im:
    im.load()
    return to_rgb(im)


def size_problem(width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_aspect_ratio: float = MAX_ASPECT_RATIO) -> tuple[str, str] | None:
  """``(reason, what was expected and found)`` when a ``width x height`` image breaks a limit, else None."""
  if width <= 0 or height <= 0:
    return 'corrupt_image', f'a non-empty image, got {width}x{height} pixels'
  if max_pixels > 0 and width * height > max_pixels:
    return 'image_too_large', (f'at most {max_pixels:,} pixels (data.max_image_pixels), got {width}x{height} = '
                               f'{width * height:,}; downscale the image or raise the limit')
  ratio = max(width, height) / min(width, height)
  if ratio > max_aspect_ratio:
    return 'bad_aspect_ratio', (f'an aspect ratio of at most {max_aspect_ratio}:1 (the Qwen2-VL limit), got '
                                f'{width}x{height} = {ratio:.1f}:1')
  return None
