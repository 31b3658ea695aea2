"""MedAD VQA record schema, label vocabularies, and the prompt/target text shared with the trainer and rewards.

One ``MedADRecord`` is one multiple-choice question about one image (paper §3.1): an image gets one record per
task, and records of the same image share ``image_id``. JSON form (one object per line of a ``*.jsonl`` file)::

  {"id": "bratsXYZ-loc", "image_id": "bratsXYZ", "image": "images/bratsXYZ.png", "modality": "MRI",
   "anatomy": "Brain", "task": "lesion_localization", "question": "Where is the lesion?",
   "options": ["Left Upper", "Center Region", "Right Lower", "No lesion"], "answer": "B",
   "cot": "...", "region": "Center Region", "pathology": "Mass", "abnormal": true,
   "source": "BraTS2021", "split": "train"}

``options`` may also be an object ``{"A": ..., "B": ..., "C": ..., "D": ...}``; ``answer`` may be the letter or the
exact text of one option. ``image`` is a path relative to the dataset directory (or absolute). ``cot``, ``region``,
``pathology``, ``abnormal`` and ``image_id`` are optional (``image_id`` defaults to the image path).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Mapping

from PIL import Image

from medad_jax.data.regions import REGIONS

MODALITIES: tuple[str, ...] = ('MRI', 'CT', 'OCT', 'Ultrasound', 'Dermoscopy', 'CE-MRI', 'Endoscopy', 'Fundus',
                               'X-ray', 'Microscopy')
ANATOMIES: tuple[str, ...] = ('Brain', 'Liver', 'Retina', 'Breast', 'Skin', 'Lung', 'Thyroid', 'Alimentary', 'Chest',
                              'Lymph Node')
TASKS: tuple[str, ...] = ('anatomy_identification', 'modality_classification', 'anomaly_detection',
                          'pathology_characterization', 'lesion_localization')
TASK_TITLES: dict[str, str] = {t: t.replace('_', ' ').title() for t in TASKS}
LETTERS: tuple[str, ...] = ('A', 'B', 'C', 'D')
SPLITS: tuple[str, ...] = ('train', 'validation', 'test')


def parse_task_repeats(text: str) -> dict[str, float]:
  """``'anomaly_detection=3,anatomy_identification=0.5'`` -> ``{task: weight}`` (a task's weight in a data mixture:
  its questions appear that many times per epoch, a fractional part meaning that share of them once more --
  ``pipeline.task_mixture``; tasks not named, once). Raises ``ValueError`` naming the item."""
  out = {}
  for item in (x.strip() for x in (text or '').split(',')):
    if not item:
      continue
    task, sep, value = (x.strip() for x in item.partition('='))
    if not sep or task not in TASKS:
      raise ValueError(f'{item!r} is not TASK=WEIGHT with TASK one of {", ".join(TASKS)}')
    if not re.fullmatch(r'\d+(\.\d*)?|\.\d+', value) or float(value) <= 0:
      raise ValueError(f'the weight of {task!r} is {value!r}; expected a number > 0 (e.g. 2 or 0.5)')
    if task in out:
      raise ValueError(f'{task!r} is named twice')
    out[task] = float(value)
  return out


@functools.lru_cache(maxsize=4096)  # label strings repeat across records
def _key(s: str) -> str:
  return re.sub(r'[^a-z0-9]', '', s.casefold())


def _vocab(names, aliases=()) -> dict[str, str]:
  table = {_key(n): n for n in names}
  table.update({_key(a): n for a, n in aliases})
  return table


_MODALITY = _vocab(MODALITIES, [('contrast-enhanced MRI', 'CE-MRI'), ('X ray', 'X-ray'), ('radiograph', 'X-ray')])
_ANATOMY = _vocab(ANATOMIES, [('lymph', 'Lymph Node'), ('gastrointestinal', 'Alimentary'), ('GI tract', 'Alimentary')])
_TASK = _vocab(TASKS)
_REGION = _vocab(REGIONS, [('Upper Left', 'Left Upper'), ('Upper Right', 'Right Upper'), ('Lower Left', 'Left Lower'),
                           ('Lower Right', 'Right Lower'), ('Center', 'Center Region'), ('Centre', 'Center Region'),
                           ('Centre Region', 'Center Region'), ('Central', 'Center Region')])
_SPLIT = _vocab(SPLITS, [('val', 'validation'), ('valid', 'validation'), ('dev', 'validation')])

# Why each record was rejected; the loader's skip report counts records by these codes.
REASONS: tuple[str, ...] = ('malformed_json', 'missing_field', 'bad_type', 'bad_options', 'bad_answer',
                            'unknown_task', 'unknown_modality', 'unknown_anatomy', 'unknown_region', 'bad_split',
                            'inconsistent_labels', 'missing_image', 'corrupt_image', 'duplicate_id',
                            'bad_encoding', 'bad_path', 'reserved_text', 'image_too_large', 'bad_aspect_ratio',
                            'prompt_too_long', 'target_too_long')

# Text that would forge the chat or answer structure if it reached the tokenizer: the think/answer tags the rewards
# parse, and control tokens of the ``<|im_end|>`` kind. Refused in questions, options and thoughts.
_RESERVED = re.compile(r'</?\s*(?:think|answer)\s*>|<\|[^<>|\s]{1,40}\|>', re.IGNORECASE)


class RecordError(ValueError):
  """A record that breaks the schema. ``where`` is ``file:line`` once the loader knows it."""

  def __init__(self, reason: str, field: str, expected: str, got: Any, where: str = ''):
    assert reason in REASONS, reason
    self.reason, self.field, self.expected, self.got, self.where = reason, field, expected, got, where
    super().__init__(self._message())

  def _message(self) -> str:
    got = repr(self.got)
    got = got if len(got) <= 120 else got[:117] + '...'
    prefix = f'{self.where}: ' if self.where else ''
    return f"{prefix}[{self.reason}] field '{self.field}': expected {self.expected}, got {got}"

  def at(self, where: str) -> 'RecordError':
    return RecordError(self.reason, self.field, self.expected, self.got, where)


@dataclasses.dataclass(frozen=True)
class MedADRecord:
  """One four-option VQA item. ``image`` is a file path or encoded image bytes (PNG/JPEG)."""
  id: str
  image_id: str
  image: str | bytes
  modality: str
  anatomy: str
  task: str
  question: str
  options: tuple[str, str, str, str]
  answer: str  # 'A'..'D'
  source: str
  split: str
  cot: str | None = None
  region: str | None = None  # lesion region (one of REGIONS) when the image has a localized lesion
  pathology: str | None = None
  abnormal: bool | None = None

  @property
  def answer_index(self) -> int:
    return LETTERS.index(self.answer)

  @property
  def answer_text(self) -> str:
    return self.options[self.answer_index]


def format_question(record: MedADRecord) -> str:
  """The user turn shown to the policy: the question, then one ``L. option`` line per option."""
  lines = [record.question.strip()] + [f'{l}. {o}' for l, o in zip(LETTERS, record.options)]
  return '\n'.join(lines)


# What the answer block of an SFT target holds: 'letter' (the paper: ``<answer>C</answer>``) or 'option' (the
# option text, ``<answer>Chest</answer>``). Both are read by ``medad_jax.rewards.parse_answer``, which maps an
# option text back to its letter, so accuracy and consistency are scored the same way. 'option' spares a model
# trained from scratch the text-to-letter lookup in the prompt (the embedded CPU miniature; WORKSPACE.md).
ANSWER_FORMATS = ('letter', 'option')


def format_target(record: MedADRecord, answer_format: str = 'letter') -> str:
  """The SFT target ``<think>{cot}</think><answer>{letter or option text}</answer>``; a record without CoT
  cannot be one."""
  if record.cot is None:
    raise ValueError(f'record {record.id!r} has no cot, so it has no think-then-answer SFT target')
  if answer_format not in ANSWER_FORMATS:
    raise ValueError(f'answer_format={answer_format!r}: expected one of {ANSWER_FORMATS}')
  answer = record.answer if answer_format == 'letter' else record.answer_text
  return f'<think>{record.cot.strip()}</think><answer>{answer}</answer>'


def load_image(record: MedADRecord) -> Image.Image:
  """The record's image as 8-bit RGB (decoded now; raises on a missing or corrupt image). EXIF orientation,
  16-bit scaling and alpha on white as ``medad_jax.data.images.to_rgb`` describes."""
  from medad_jax.data.images import load_rgb
  return load_rgb(record.image)


# ---------------------------------------------------------------------------------------------- JSON parsing


def _text(obj: Mapping[str, Any], field: str, *, required: bool = True) -> str | None:
  v = obj.get(field)
  if v is None:
    if required:
      raise RecordError('missing_field', field, 'a non-empty string', v)
    return None
  if not isinstance(v, str) or (required and not v.strip()):
    raise RecordError('bad_type' if not isinstance(v, str) else 'missing_field', field, 'a non-empty string', v)
  return v


def _no_reserved(field: str, v: str) -> str:
  m = _RESERVED.search(v)
  if m:
    raise RecordError('reserved_text', field, f'plain text without prompt-format tags or control tokens '
                      f'(found {m.group(0)!r})', v)
  return v


@functools.lru_cache(maxsize=64)
def _abspath(d: str) -> str:
  return os.path.abspath(d)


def _image_path(image: str, base_dir: str | None) -> str:
  """``image`` made absolute against ``base_dir``; a relative path may not leave the dataset directory."""
  if base_dir is None or os.path.isabs(image):
    return image
  root = _abspath(base_dir)
  path = os.path.normpath(os.path.join(root, image))
  if not path.startswith(root.rstrip(os.sep) + os.sep):
    raise RecordError('bad_path', 'image', f'a path inside the dataset directory {base_dir!r} (or an absolute path)',
                      image)
  return path


def _lookup(table: dict[str, str], v: Any, field: str, reason: str, names) -> str:
  if not isinstance(v, str) or _key(v) not in table:
    raise RecordError(reason, field, f'one of {list(names)}', v)
  return table[_key(v)]


def _options(v: Any) -> tuple[str, str, str, str]:
  if isinstance(v, Mapping):
    if sorted(v) != list(LETTERS):
      raise RecordError('bad_options', 'options', 'exactly the keys A, B, C, D', sorted(v))
    v = [v[l] for l in LETTERS]
  if not isinstance(v, (list, tuple)):
    raise RecordError('bad_options', 'options', 'a list of exactly 4 strings', v)
  if len(v) != 4:
    raise RecordError('bad_options', 'options', f'exactly 4 options, found {len(v)}', v)
  if not all(isinstance(o, str) and o.strip() for o in v):
    raise RecordError('bad_options', 'options', '4 non-empty strings', v)
  if len({o.strip().casefold() for o in v}) != 4:
    raise RecordError('bad_options', 'options', '4 distinct options', v)
  return tuple(o.strip() for o in v)


def _answer(v: Any, options: tuple[str, ...]) -> str:
  if isinstance(v, str) and v.strip().upper() in LETTERS:
    return v.strip().upper()
  if isinstance(v, str):
    for l, o in zip(LETTERS, options):
      if v.strip().casefold() == o.casefold():
        return l
  raise RecordError('bad_answer', 'answer', f'a letter A-D or the text of one of the options {list(options)}', v)


def record_from_dict(obj: Any, *, base_dir: str | None = None,
                     defaults: Mapping[str, Any] | None = None) -> MedADRecord:
  """Validates one JSON object and returns the record.

  Image paths are made absolute against ``base_dir``; ``defaults`` fills fields the object lacks (e.g. the split
  named by the file, or ``source`` for a release that does not carry it).
  """
  if not isinstance(obj, Mapping):
    raise RecordError('bad_type', '<record>', 'a JSON object', obj)
  obj = {**(defaults or {}), **obj}
  rid = _text(obj, 'id')
  image = _image_path(_text(obj, 'image'), base_dir)
  task = _lookup(_TASK, obj.get('task'), 'task', 'unknown_task', TASKS)
  modality = _lookup(_MODALITY, obj.get('modality'), 'modality', 'unknown_modality', MODALITIES)
  anatomy = _lookup(_ANATOMY, obj.get('anatomy'), 'anatomy', 'unknown_anatomy', ANATOMIES)
  question = _no_reserved('question', _text(obj, 'question'))
  options = _options(obj.get('options'))
  for o in options:
    _no_reserved('options', o)
  answer = _answer(obj.get('answer'), options)
  split_v = obj.get('split')
  if split_v is None:
    raise RecordError('missing_field', 'split', f'one of {list(SPLITS)} (or a file named <split>.jsonl)', None)
  split = _lookup(_SPLIT, split_v, 'split', 'bad_split', SPLITS)
  region_v = obj.get('region')
  region = None if region_v in (None, '') else _lookup(_REGION, region_v, 'region', 'unknown_region', REGIONS)
  abnormal = obj.get('abnormal')
  if abnormal is not None and not isinstance(abnormal, bool):
    raise RecordError('bad_type', 'abnormal', 'true, false or null', abnormal)
  if abnormal is False and region is not None:
    raise RecordError('inconsistent_labels', 'region', 'no lesion region for an image labelled abnormal=false', region)
  cot = _text(obj, 'cot', required=False)
  if cot:
    _no_reserved('cot', cot)
  return MedADRecord(
      id=rid, image_id=_text(obj, 'image_id', required=False) or _text(obj, 'image'), image=image,
      modality=modality, anatomy=anatomy, task=task, question=question, options=options, answer=answer,
      source=_text(obj, 'source'), split=split, cot=cot if cot and cot.strip() else None, region=region,
      pathology=_text(obj, 'pathology', required=False) or None, abnormal=abnormal)


def record_to_dict(record: MedADRecord, image: str | None = None) -> dict[str, Any]:
  """JSON form of ``record``; ``image`` replaces the image field (records holding bytes need a path to be saved)."""
  d = dataclasses.asdict(record)
  d['options'] = list(record.options)
  d['image'] = image if image is not None else record.image
  if not isinstance(d['image'], str):
    raise ValueError(f'record {record.id!r} holds image bytes; pass the path they were written to')
  return d
