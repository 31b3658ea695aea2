"""Loads a MedAD-style directory: ``*.jsonl`` annotation files next to the image files they reference.

Layout (the most likely MedAD-38K release layout; ``medad-synth`` writes the same)::

  root/train.jsonl  root/test.jsonl  (any ``*.jsonl``; a file named after a split supplies that split as default)
  root/images/...                    (paths in the records are relative to ``root``)

Validation policy: ``strict`` raises ``RecordError`` at the first bad record, naming ``file:line``, the field and
what was expected; ``skip`` keeps going and the returned ``LoadReport`` lists every skipped record with its
reason (and ``counts()`` by reason). Blank lines are counted in the report, never parsed. Nothing is dropped
without a trace.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import os
from typing import Any, Iterable, Mapping

from PIL import Image

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

  def counts(self) -> dict[str, int]:
    """Number of skipped records per reason."""
    return dict(collections.Counter(s.reason for s in self.skipped))

  def summary(self) -> str:
    s = f'{self.loaded} records loaded from {len(self.files)} file(s), {len(self.skipped)} skipped'
    if self.skipped:
      s += ' (' + ', '.join(f'{r}: {n}' for r, n in sorted(self.counts().items())) + ')'
    return s


def _image_problem(path: str, cache: dict[str, RecordError | None]) -> RecordError | None:
  if path not in cache:
    if not os.path.isfile(path):
      cache[path] = RecordError('missing_image', 'image', 'an existing image file', path)
    else:
      try:
        with Image.open(path) as im:
          im.load()  # a full decode: verify() misses truncated pixel data
        cache[path] = None
      except Exception as e:  # PIL raises several types for undecodable files
        cache[path] = RecordError('corrupt_image', 'image', f'a decodable image ({type(e).__name__}: {e})', path)
  return cache[path]


def load_jsonl_files(paths: Iterable[str], *, base_dir: str, policy: str = 'strict', check_images: bool = True,
                     defaults: Mapping[str, Any] | None = None) -> tuple[list[MedADRecord], LoadReport]:
  """Parses and validates the given JSONL files; image paths are relative to ``base_dir``."""
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
    with open(path, encoding='utf-8') as f:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          report.blank_lines += 1
          continue
        report.lines += 1
        where = f'{path}:{lineno}'
        try:
          try:
            obj = json.loads(line)
          except json.JSONDecodeError as e:
            raise RecordError('malformed_json', '<line>', f'one JSON object per line ({e.msg} at column {e.colno})',
                              line.strip()) from None
          rec = record_from_dict(obj, base_dir=base_dir, defaults=file_defaults)
          if rec.id in seen_ids:
            raise RecordError('duplicate_id', 'id', f'an id not already used at {seen_ids[rec.id]}', rec.id)
          if check_images and (problem := _image_problem(rec.image, image_cache)) is not None:
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
                   defaults: Mapping[str, Any] | None = None) -> tuple[list[MedADRecord], LoadReport]:
  """Loads every ``root/*.jsonl`` (sorted by name). See the module docstring for the layout and policies."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'MedAD directory {root!r} does not exist')
  paths = sorted(glob.glob(os.path.join(root, '*.jsonl')))
  if not paths:
    raise FileNotFoundError(f'no *.jsonl annotation files in {root!r}')
  return load_jsonl_files(paths, base_dir=root, policy=policy, check_images=check_images, defaults=defaults)


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
