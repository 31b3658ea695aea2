"""Per-record length limits (``data.max_prompt_len`` / ``data.max_target_len``) and the data report of a run.

A record's prompt length is what the processor feeds the model before the answer: the chat template with the
question and options, plus the image's tokens (its merged patches after the processor's resize between
``min_pixels`` and ``max_pixels``, computed from the image header without decoding it). Its target length is the
SFT answer ``<think>..</think><answer>..</answer><|im_end|>``. Prompt and target are tokenized separately (the
processor tokenizes them as one string; the two counts can differ by a token at the seam).

A record over either limit is never truncated -- a cut target loses ``</answer>`` and would teach a broken format:
under ``data.policy='skip'`` it is dropped and counted (``prompt_too_long`` / ``target_too_long``), under
``'strict'`` it is refused with a ``RecordError`` naming the record and both numbers.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
from typing import Any, Sequence

from medad_jax.data import images as images_lib
from medad_jax.data.loader import POLICIES, Skipped
from medad_jax.data.schema import MedADRecord, RecordError, format_question, format_target

log = logging.getLogger(__name__)


class Subset(Sequence):
  """Items ``indices`` of a random-access ``source`` (picklable when the source is, so grain workers can use it)."""

  def __init__(self, source: Sequence, indices: Sequence[int]):
    self.source, self.indices = source, list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return self.source[self.indices[int(i)]]


def image_tokens(width: int, height: int, processor) -> int:
  """Placeholder tokens of a ``width x height`` image after Qwen2-VL's ``smart_resize`` (the processor's own
  resize bounds and patch geometry)."""
  v = processor.vision_cfg
  factor = v.patch_size * v.spatial_merge_size
  h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
  if h_bar * w_bar > processor.max_pixels:
    beta = math.sqrt(height * width / processor.max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < processor.min_pixels:
    beta = math.sqrt(processor.min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return (h_bar // v.patch_size) * (w_bar // v.patch_size) // v.spatial_merge_size ** 2


def record_lengths(records: Sequence[MedADRecord], processor, answer_format: str = 'letter'
                   ) -> tuple[list[int], list[int]]:
  """``(prompt lengths, target lengths)`` in tokens (see the module docstring; 0 target tokens without a CoT)."""
  from medad_jax.processor import render_prompt, render_target
  tok = processor.tokenizer
  prompts = [render_prompt(format_question(r), processor.system_prompt) for r in records]
  p_ids = tok(prompts, add_special_tokens=False)['input_ids']
  with_cot = [i for i, r in enumerate(records) if r.cot is not None]
  t_ids = tok([render_target(format_target(records[i], answer_format)) for i in with_cot],
              add_special_tokens=False)['input_ids'] if with_cot else []
  targets = [0] * len(records)
  for i, ids in zip(with_cot, t_ids):
    targets[i] = len(ids)
  out = []
  for r, ids in zip(records, p_ids):
    with images_lib.open_image(r.image) as im:
      w, h = im.size
    out.append(len(ids) - 1 + image_tokens(w, h, processor))  # the one <|image_pad|> becomes the image's tokens
  return out, targets


def enforce(source: Sequence[MedADRecord], processor, *, max_prompt_len: int, max_target_len: int,
            policy: str = 'strict', answer_format: str = 'letter', split: str = '',
            lengths_out: list[int] | None = None) -> tuple[Sequence, list[Skipped]]:
  """``source`` without the records over a limit, and one ``Skipped`` per dropped record (``policy='skip'``);
  under ``'strict'`` the first such record raises ``RecordError``. ``lengths_out``: gets each kept record's
  prompt + target tokens, in the order of the returned sequence (what ``sft.group_by_length`` sorts by)."""
  if policy not in POLICIES:
    raise ValueError(f'policy must be one of {POLICIES}, got {policy!r}')
  it = source.iter_records() if hasattr(source, 'iter_records') else (source[i] for i in range(len(source)))
  keep, skipped, base = [], [], 0
  while chunk := list(itertools.islice(it, 512)):  # bounded memory: records of a built dataset carry image bytes
    prompts, targets = record_lengths(chunk, processor, answer_format)
    for k, (r, p, t) in enumerate(zip(chunk, prompts, targets)):
      err = None
      if p > max_prompt_len:
        err = RecordError('prompt_too_long', 'question', f'at most data.max_prompt_len = {max_prompt_len} prompt '
                          'tokens (image tokens included)', f'{p} tokens')
      elif t > max_target_len:
        err = RecordError('target_too_long', 'cot', f'at most data.max_target_len = {max_target_len} target '
                          'tokens (never truncated: a cut target loses </answer>)', f'{t} tokens')
      if err is None:
        keep.append(base + k)
        if lengths_out is not None:
          lengths_out.append(p + t)
        continue
      err = err.at(f'{split} record {r.id!r}'.strip())
      if policy == 'strict':
        raise err
      skipped.append(Skipped(err.where, err.reason, str(err)))
    base += len(chunk)
  if skipped:
    log.warning('data: %d %s record(s) over the length limits skipped (%s)', len(skipped), split or 'the',
                dict(collections.Counter(s.reason for s in skipped)))
  return (source if len(keep) == len(source) else Subset(source, keep)), skipped


def data_report(load_report: dict[str, Any] | None, length_skips: Sequence[Skipped], kept: dict[str, int]
                ) -> dict[str, Any]:
  """What the run summary says about its data: questions used per split and skipped records counted by reason
  (at load, from the build's metadata, and over the length limits)."""
  counts = collections.Counter((load_report or {}).get('skipped', {}))
  counts.update(s.reason for s in length_skips)
  examples = list((load_report or {}).get('skipped_records', []))[:20] + [
      {'where': s.where, 'reason': s.reason, 'message': s.message} for s in length_skips[:20]]
  return {'used': dict(kept), 'skipped': dict(sorted(counts.items())), 'skipped_total': sum(counts.values()),
          'skipped_examples': examples, 'empty_files': (load_report or {}).get('empty_files', [])}


def apply_limits(data_config, data, processor) -> dict[str, Any]:
  """The length limits of ``data_config`` (``config.data``) on a built dataset's ``train`` / ``test`` splits ->
  ``{'train': ..., 'test': ..., 'report': data_report(...), 'lengths': {split: tokens per kept record}}`` for the
  trainer's ``Data``."""
  import tensorflow_datasets as tfds
  meta = tfds.builder_from_directory(data.builder_dir).info.metadata or {}
  policy = data_config.get('policy', 'strict')
  out, skipped, lengths = {}, [], {}
  for split in ('train', 'test'):
    lengths[split] = []
    out[split], sk = enforce(getattr(data, split), processor, max_prompt_len=data_config.max_prompt_len,
                             max_target_len=data_config.max_target_len, policy=policy,
                             answer_format=data_config.answer_format, split=split, lengths_out=lengths[split])
    skipped += sk
  out['report'] = data_report(meta.get('load_report'), skipped, {s: len(out[s]) for s in ('train', 'test')})
  out['lengths'] = lengths
  return out
