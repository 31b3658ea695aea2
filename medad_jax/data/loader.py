"""Loads a MedAD-style directory: ``*.jsonl`` annotation files next to the image files they reference.

Layout (the most likely MedAD-38K release layout; ``medad-synth`` writes the same)::

  root/train.jsonl  root/test.jsonl  (any ``*.jsonl``; a file named after a split supplies that split as default)
  root/images/...                    (paths in the records are relative to ``root``)

Validation policy: ``strict`` raises ``RecordError`` at the first bad record, naming ``file:line``, the field and
what was expected; ``skip`` keeps going and the returned ``LoadReport`` lists every skipped record with its
reason (and ``counts()`` by reason). Blank lines are counted in the report, never parsed. Nothing is dropped
without a trace.

Text: UTF-8, with or without a byte-order mark. A line that is not valid UTF-8 (a latin-1 byte, a UTF-16 file) is
a ``bad_encoding`` record naming ``file:line`` and the byte, never a bare ``UnicodeDecodeError``. Files are read
line by line and images are decoded one at a time to check them (the records keep paths), so memory grows with the
number of records, not with the images. An empty (0-byte) file loads nothing and is listed in the report.

Images are checked at load: present (``missing_image``), decodable in full (``corrupt_image``), at most
``max_image_pixels`` pixels (``image_too_large``, read from the header before decoding) and at most Qwen2-VL's
200:1 aspect ratio (``bad_aspect_ratio``). A relative image path that leaves the directory is ``bad_path``
(absolute paths and symlinks inside the directory are allowed).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import os
import warnings
from typing import Any, Iterable, Mapping

from PIL import Image

from medad_jax.data import images as images_lib
from medad_jax.data.schema import SPLITS, MedADRecord, RecordError, record_from_dict, record_to_dict

log = logging.getLogger(__name__)
POLICIES = ('strict', 'skip')


@dataclasses.dataclass(frozen=True)
class Skipped:
  where: str  # file:line
  reason: str  # one of schema.REASONS
  message: str


@dataclasses.dataclass
class LoadReport:
  files: list[str] = dataclasses.field(default_factory=list)
  lines: int = 0
  blank_lines: int = 0
  loaded: int = 0
  skipped: list[Skipped] = dataclasses.field(default_factory=list)
  empty_files: list[str] = dataclasses.field(default_factory=list)

  def counts(self) -> dict[str, int]:
    """Number of skipped records per reason."""
    return dict(collections.Counter(s.reason for s in self.skipped))

  def summary(self) -> str:
    s = f'{self.loaded} records loaded from {len(self.files)} file(s), {len(self.skipped)} skipped'
    if self.skipped:
      s += ' (' + ', '.join(f'{r}: {n}' for r, n in sorted(self.counts().items())) + ')'
    return s


def _image_problem(path: str, cache: dict[str, RecordError | None], max_pixels: int,
                   max_aspect_ratio: float) -> RecordError | None:
  if path not in cache:
    cache[path] = _check_image(path, max_pixels, max_aspect_ratio)
  return cache[path]


def _check_image(path: str, max_pixels: int, max_aspect_ratio: float) -> RecordError | None:
  if not os.path.isfile(path):
    return RecordError('missing_image', 'image', 'an existing image file', path)
  try:
    with warnings.catch_warnings():  # Pillow's decompression-bomb warning: our own cap below says it clearly
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      im = Image.open(path)
    with im:
      problem = images_lib.size_problem(*im.size, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
      if problem is not None:
        return RecordError(problem[0], 'image', problem[1], path)
      im.load()  # a full decode: verify() misses truncated pixel data
  except Exception as e:  # noqa: BLE001 -- PIL raises several types for undecodable files
    return RecordError('corrupt_image', 'image', f'a decodable image ({type(e).__name__}: {e})', path)
  return None


_UTF16_32_BOMS = (b'\xff\xfe', b'\xfe\xff')


def _lines(path: str):
  """``(line number, text or RecordError)`` per line of ``path``, decoded as UTF-8 (a leading BOM dropped)."""
  with open(path, 'rb') as f:
    for lineno, raw in enumerate(f, start=1):
      if lineno == 1:
        if raw.startswith(_UTF16_32_BOMS):
          yield lineno, RecordError('bad_encoding', '<file>', 'UTF-8 text (this file starts with a UTF-16/32 '
                                    'byte-order mark: re-save it as UTF-8)', raw[:16])
          return
        raw = raw.removeprefix(b'\xef\xbb\xbf')
      try:
        text = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        yield lineno, RecordError('bad_encoding', '<line>', f'UTF-8 text (byte 0x{raw[e.start]:02x} at column '
                                  f'{e.start + 1} is not; re-save the file as UTF-8)', raw[max(0, e.start - 20):
                                                                                             e.start + 20])
        continue
      if '\x00' in text:
        yield lineno, RecordError('bad_encoding', '<line>', 'UTF-8 text without NUL characters (UTF-16 text?)',
                                  text[:40])
        continue
      yield lineno, text


def load_jsonl_files(paths: Iterable[str], *, base_dir: str, policy: str = 'strict', check_images: bool = True,
                     defaults: Mapping[str, Any] | None = None, max_image_pixels: int = images_lib.DEFAULT_MAX_PIXELS,
                     max_aspect_ratio: float = images_lib.MAX_ASPECT_RATIO) -> tuple[list[MedADRecord], LoadReport]:
  """Parses and validates the given JSONL files; image paths are relative to ``base_dir``.

  ``max_image_pixels <= 0`` disables the pixel cap."""
  if policy not in POLICIES:
    raise ValueError(f'policy must be one of {POLICIES}, got {policy!r}')
  records, report = [], LoadReport()
  seen_ids: dict[str, str] = {}
  image_cache: dict[str, RecordError | None] = {}
  for path in paths:
    report.files.append(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    file_defaults = dict(defaults or {})
    if stem in SPLITS:
      file_defaults.setdefault('split', stem)
    if os.path.getsize(path) == 0:
      report.empty_files.append(path)
      log.warning('%s is empty (0 bytes): no records from it', path)
      continue
    for lineno, line in _lines(path):
      if isinstance(line, str) and not line.strip():
        report.blank_lines += 1
        continue
      report.lines += 1
      where = f'{path}:{lineno}'
      try:
        if isinstance(line, RecordError):
          raise line
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise RecordError('malformed_json', '<line>', f'one JSON object per line ({e.msg} at column {e.colno})',
                            line.strip()) from None
        rec = record_from_dict(obj, base_dir=base_dir, defaults=file_defaults)
        if rec.id in seen_ids:
          raise RecordError('duplicate_id', 'id', f'an id not already used at {seen_ids[rec.id]}', rec.id)
        if check_images and (problem := _image_problem(rec.image, image_cache, max_image_pixels,
                                                       max_aspect_ratio)) is not None:
          raise problem
      except RecordError as e:
        e = e.at(where)
        if policy == 'strict':
          raise e from None
        report.skipped.append(Skipped(where, e.reason, str(e)))
        continue
      seen_ids[rec.id] = where
      records.append(rec)
      report.loaded += 1
  if report.skipped:
    log.warning('skipped records: %s', report.summary())
  else:
    log.info('%s', report.summary())
  return records, report


def load_jsonl_dir(root: str, *, policy: str = 'strict', check_images: bool = True,
                   defaults: Mapping[str, Any] | None = None, **limits) -> tuple[list[MedADRecord], LoadReport]:
  """Loads every ``root/*.jsonl`` (sorted by name). See the module docstring for the layout and policies."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'MedAD directory {root!r} does not exist')
  paths = sorted(glob.glob(os.path.join(root, '*.jsonl')))
  if not paths:
    raise FileNotFoundError(f'no *.jsonl annotation files in {root!r}')
  records, report = load_jsonl_files(paths, base_dir=root, policy=policy, check_images=check_images,
                                     defaults=defaults, **limits)
  if not records and not report.skipped:
    raise FileNotFoundError(f'no records in {root!r}: its *.jsonl file(s) {[os.path.basename(p) for p in paths]} '
                            'hold no JSON lines')
  return records, report


def write_jsonl(path: str, records: Iterable[MedADRecord], root: str) -> int:
  """Writes records whose images are files under ``root`` (stored relative to it). Returns the count."""
  n = 0
  with open(path, 'w', encoding='utf-8') as f:
    for r in records:
      if not isinstance(r.image, str):
        raise ValueError(f'record {r.id!r}: write its image to a file under {root!r} first')
      f.write(json.dumps(record_to_dict(r, image=os.path.relpath(r.image, root)), ensure_ascii=False) + '\n')
      n += 1
  return n
