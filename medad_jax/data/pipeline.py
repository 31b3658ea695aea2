"""grain input pipeline: shard -> shuffle -> repeat -> preprocess -> batch (padded to length buckets).

``make_dataset(source, ...)`` takes any random-access sequence of ``MedADRecord`` (a list from
``loader.load_jsonl_dir``, or ``tfds_builders.RecordSource`` over a built split) and returns a
``grain.IterDataset``; ``iter(ds)`` is a ``grain.DatasetIterator`` whose ``get_state()`` / ``set_state()`` checkpoint
the position (a small JSON-able dict; ``save_iterator_state`` / ``restore_iterator_state`` write it to a file, and
``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` do the same inside an orbax ``CheckpointManager``).

Sharding is per process and happens first: process ``i`` of ``n`` keeps source items ``i, i + n, i + 2n, ...``, so
the shards are disjoint, cover the data, differ in size by at most one, and no process reads another's items.
Shuffling is then per shard and per epoch (grain reseeds every epoch), and epochs do not mix.

The processor seam: ``preprocess`` maps one record to a dict of numpy arrays, ``batch_fn`` maps a list of those to
a batch. The defaults (``text_features`` / ``collate``) give decoded pixels and the prompt/target strings of
``schema.format_question`` / ``schema.format_target``. For the policy, pass
``preprocess=processor_preprocess(processor)`` with any callable
``processor(image: PIL.Image, question: str, target: str | None) -> dict[str, np.ndarray]`` (the Qwen2.5-VL
processor of ``medad_jax/processor.py`` has this shape) and ``batch_fn=bucket_batch_fn(buckets, ...)``, or the
processor's own batcher.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from medad_jax.data.schema import LETTERS, TASKS, MedADRecord, format_question, format_target, load_image

Features = dict[str, Any]


# ---------------------------------------------------------------------------------------------- preprocessing seam


def text_features(record: MedADRecord) -> Features:
  """Default ``preprocess``: decoded image ``[H, W, 3] uint8``, prompt / target text (``''`` for a record without
  CoT, e.g. for RL prompts), answer and task ids, record id."""
  return {
      'image': np.asarray(load_image(record), np.uint8),
      'prompt': format_question(record),
      'target': format_target(record) if record.cot is not None else '',
      'answer': np.int32(LETTERS.index(record.answer)),
      'task': np.int32(TASKS.index(record.task)),
      'id': record.id,
  }


def processor_preprocess(processor: Callable[..., Mapping[str, np.ndarray]], *, with_target: bool = True
                         ) -> Callable[[MedADRecord], Features]:
  """Wraps a policy processor ``(PIL image, question, target or None) -> dict of arrays`` as ``preprocess``.

  ``with_target=False`` (RL rollouts) passes ``None`` as the target. The answer index, task index and record id are
  added under ``answer`` / ``task`` / ``id`` for the rewards.
  """

  def preprocess(record: MedADRecord) -> Features:
    out = dict(processor(load_image(record), format_question(record),
                         format_target(record) if with_target else None))
    out.update(answer=np.int32(LETTERS.index(record.answer)), task=np.int32(TASKS.index(record.task)), id=record.id)
    return out

  return preprocess


def _stack_or_list(key: str, values: list) -> Any:
  if isinstance(values[0], str):
    return np.array(values, dtype=object)
  arrays = [np.asarray(v) for v in values]
  if all(a.shape == arrays[0].shape for a in arrays):
    return np.stack(arrays)
  out = np.empty(len(arrays), dtype=object)  # ragged, e.g. images of different sizes
  out[:] = arrays
  return out


def collate(elements: Sequence[Features]) -> Features:
  """Default ``batch_fn``: stacks equal-shaped arrays; strings and ragged arrays become object arrays."""
  return {k: _stack_or_list(k, [e[k] for e in elements]) for k in elements[0]}


_SEQ_KEYS = ('input_ids', 'attention_mask', 'loss_mask', 'mm_token_type_ids', 'labels', 'position_ids')
_CONCAT_KEYS = ('pixel_values', 'image_grid_thw')


def bucket_batch_fn(buckets: Sequence[int], *, length_key: str = 'input_ids', seq_keys: Sequence[str] = _SEQ_KEYS,
                    concat_keys: Sequence[str] = _CONCAT_KEYS, pad_values: Mapping[str, int | float] | None = None
                    ) -> Callable[[Sequence[Features]], Features]:
  """A ``batch_fn`` that pads sequences to the smallest bucket holding the longest one, so jitted steps see only
  ``len(buckets)`` shapes.

  ``seq_keys`` present in the elements are right-padded along their last axis (``[T]``, or ``[3, T]`` for M-RoPE
  positions) with ``pad_values[key]`` (default 0) and stacked to ``[B, ..., T]``. ``concat_keys`` are concatenated
  on axis 0 (the Qwen2.5-VL convention: ``pixel_values [sum L, P]``, ``image_grid_thw [n_images, 3]``). Any other
  key is stacked (strings and ragged arrays become object arrays). A sequence longer than the largest bucket is an
  error, never truncated. (``Qwen25VLProcessor.batch`` is the processor's own batcher, with left padding for
  generation prompts.)
  """
  buckets = sorted(int(b) for b in buckets)
  if not buckets or buckets[0] <= 0:
    raise ValueError(f'buckets must be positive lengths, got {buckets}')
  pads = dict(pad_values or {})

  def batch(elements: Sequence[Features]) -> Features:
    longest = max(np.shape(e[length_key])[-1] for e in elements)
    fit = [b for b in buckets if b >= longest]
    if not fit:
      ids = [e.get('id', '?') for e in elements if np.shape(e[length_key])[-1] > buckets[-1]]
      raise ValueError(f'{length_key} of length {longest} exceeds the largest bucket {buckets[-1]} (records {ids})')
    length = fit[0]
    out = {}
    for k in elements[0]:
      vals = [e[k] for e in elements]
      if k in seq_keys:
        arrs = [np.asarray(v) for v in vals]
        widths = [[(0, 0)] * (a.ndim - 1) + [(0, length - a.shape[-1])] for a in arrs]
        out[k] = np.stack([np.pad(a, w, constant_values=pads.get(k, 0)) for a, w in zip(arrs, widths)])
      elif k in concat_keys:
        out[k] = np.concatenate([np.asarray(v) for v in vals], axis=0)
      else:
        out[k] = _stack_or_list(k, vals)
    return out

  return batch


# ---------------------------------------------------------------------------------------------- the dataset


def _default_shard() -> tuple[int, int]:
  import jax  # local: the data package is usable without initializing a backend until a pipeline is built
  return jax.process_index(), jax.process_count()


def make_dataset(source: Sequence[MedADRecord], *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = 1, shard_index: int | None = None, shard_count: int | None = None,
                 preprocess: Callable[[MedADRecord], Features] = text_features,
                 batch_fn: Callable[[Sequence[Features]], Features] | None = collate,
                 drop_remainder: bool = False, read_threads: int = 4, worker_count: int = 0) -> grain.IterDataset:
  """The input pipeline over ``source`` (see the module docstring).

  Args:
    num_epochs: passes over this process's shard; ``None`` repeats forever.
    shard_index, shard_count: this process's shard; default ``jax.process_index()`` / ``jax.process_count()``.
    read_threads: threads grain uses to read and preprocess; ``worker_count > 0`` adds that many processes.
  """
  if (shard_index is None) != (shard_count is None):
    raise ValueError('give both shard_index and shard_count, or neither')
  if shard_index is None:
    shard_index, shard_count = _default_shard()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} outside [0, {shard_count})')
  if len(source) < shard_count:
    raise ValueError(f'{len(source)} records cannot feed {shard_count} shards')
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.map(preprocess)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * batch_size, 8)))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return ds


def save_iterator_state(iterator: grain.DatasetIterator, path: str) -> None:
  """Writes ``iterator.get_state()`` as JSON (atomically: a crash leaves the previous file)."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(iterator.get_state(), f)
  os.replace(tmp, path)


def restore_iterator_state(iterator: grain.DatasetIterator, path: str) -> grain.DatasetIterator:
  """Sets ``iterator`` to the position saved at ``path``; returns it."""
  with open(path) as f:
    iterator.set_state(json.load(f))
  return iterator
