"""What each process feeds the stages: its slice of every global batch, turned into global arrays.

Every process runs the same trainer (``python -m medad_jax.launch ...`` on every host). Batch sizes in the config
are global; ``distributed.data_shard(mesh)`` says which rows of each global batch this process holds, and
``distributed.process_dataset`` reads exactly those records (shuffled as one global sequence, so the batches do
not depend on the process count). One process alone reads the whole batch and the functions below reduce to the
single-host path (``pipeline.sft_batch`` / ``pipeline.prompt_batch`` on host arrays).

Shapes every process must share are agreed first (``distributed.agree_max``): the token-length bucket of a batch,
the patch bucket of its images and (SFT) the target-token bucket. Images stay with their rows (the per-image
layout), so every process decodes only its own images.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from medad_jax import distributed
from medad_jax.train import pipeline as pl

log = logging.getLogger(__name__)

# The sampler layout's batch dimensions (``PromptBatch`` fields): rows on 0, M-RoPE positions on 1.
PROMPT_DIMS = {'positions_3PT': 1}


def shard(run: pl.Run) -> tuple[int, int]:
  """``(shard_index, shard_count)`` of this process's rows."""
  return distributed.data_shard(run.mesh_or_none())


def dataset(run: pl.Run, source, *, name: str, global_batch: int, preprocess, seed: int, shuffle: bool = True,
            num_epochs: int | None = None, pad_last: bool = False, lengths=None, group_by_length: int = 0):
  """This process's slice of every global batch of ``source`` (``distributed.process_dataset``)."""
  i, n = shard(run)
  return distributed.process_dataset(source, name=name, global_batch=global_batch, shard_index=i, shard_count=n,
                                     preprocess=preprocess, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                                     pad_last=pad_last, read_threads=run.config.data.read_threads,
                                     lengths=lengths, group_by_length=group_by_length)


def _bucket_list(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(int(x) for x in (text or '').split(',') if x.strip()) or default


def length_buckets(config) -> tuple[int, ...]:
  """The SFT sequence-length buckets: ``config.sft.length_buckets`` (comma-separated, ascending) or the pipeline's
  default :data:`pipeline.SFT_LENGTH_BUCKETS`."""
  return _bucket_list(config.sft.get('length_buckets') if 'sft' in config else '', pl.SFT_LENGTH_BUCKETS)


def target_buckets(config) -> tuple[int, ...]:
  """The SFT answer-token buckets (``M``, the positions the LM head computes per row): ``config.sft.target_buckets``
  or the pipeline's default :data:`pipeline.TARGET_LENGTH_BUCKETS`."""
  return _bucket_list(config.sft.get('target_buckets') if 'sft' in config else '', pl.TARGET_LENGTH_BUCKETS)


def prompt_length_buckets(config) -> tuple[int, ...]:
  """The sampler's prompt-length buckets (rollouts, evaluation): ``config.data.prompt_length_buckets`` or the
  pipeline's default :data:`pipeline.PROMPT_LENGTH_BUCKETS`."""
  return _bucket_list(config.data.get('prompt_length_buckets'), pl.PROMPT_LENGTH_BUCKETS)


# ----------------------------------------------------------------------------------------------------- SFT


def sft_batch(run: pl.Run, examples: list[dict]) -> dict:
  """This process's processor outputs -> the SFT step's batch (global arrays across processes; host arrays for
  one process), equal to ``pipeline.sft_batch`` of the whole global batch: the token, target and patch buckets are
  agreed over the processes first, and each row keeps its own image (``pixel_values_ILC``), so every process
  decodes only its own images."""
  cfg = run.model_cfg
  buckets = run.patch_buckets
  lengths, targets = length_buckets(run.config), target_buckets(run.config)
  if distributed.process_count() == 1:
    return pl.sft_batch(examples, cfg, buckets=lengths, patch_buckets=buckets, target_buckets=targets)
  from medad_jax.sampling.prompts import pick_bucket
  need = distributed.agree_max({
      'tokens': max(len(ex['input_ids']) for ex in examples),
      'targets': max(1, max(int(np.asarray(ex['loss_mask'])[1:].astype(bool).sum()) for ex in examples)),
      'patches': max(int(np.asarray(ex['image_grid_thw']).reshape(-1, 3).prod(-1).max()) for ex in examples)})
  T = pick_bucket(need['tokens'], lengths, 'SFT example length (tokens)')
  M = pick_bucket(need['targets'], targets, 'target tokens of one example')
  L = pick_bucket(need['patches'], buckets, 'image patches per image')
  local = pl.sft_batch(examples, cfg, buckets=(T,), patch_buckets=(L,), target_buckets=(M,))
  for key, fill in (('target_pos_BM', 0), ('target_ids_BM', cfg.pad_token_id), ('target_mask_BM', 0)):
    x = local[key]
    if x.shape[1] < M:   # this process's longest answer fell in a smaller bucket than another's
      local[key] = np.concatenate([x, np.full((x.shape[0], M - x.shape[1]), fill, x.dtype)], axis=1)
  return distributed.to_global(local, run.mesh_or_none())


# ---------------------------------------------------------------------------------------- sampler prompts


def prompt_batch(run: pl.Run, examples: list[dict], num_prompts: int):
  """This process's prompt examples -> the sampler's ``PromptBatch`` of ``num_prompts`` rows per process (global
  arrays across processes, split over the mesh's batch axes; host arrays for one process)."""
  cfg = run.model_cfg
  buckets = run.patch_buckets
  lengths = prompt_length_buckets(run.config)
  if distributed.process_count() == 1:
    return pl.prompt_batch(examples, cfg, num_prompts=num_prompts, patch_buckets=buckets, length_buckets=lengths)
  from medad_jax.sampling.prompts import pick_bucket, prepare_prompts
  grids = [np.asarray(ex['image_grid_thw']).reshape(-1, 3) for ex in examples]
  need = distributed.agree_max({'tokens': max(len(ex['input_ids']) for ex in examples),
                                'patches': max(int(g.prod(-1).max()) for g in grids)})
  T = pick_bucket(need['tokens'], lengths, 'prompt length (tokens)')
  L = pick_bucket(need['patches'], buckets, 'image patches per image')
  pb = prepare_prompts(cfg, [ex['input_ids'] for ex in examples],
                       pixel_values=np.concatenate([ex['pixel_values'] for ex in examples]),
                       image_grid_thw=np.concatenate(grids), length_buckets=(T,), patch_buckets=(L,),
                       num_prompts=num_prompts)
  fields = {f.name: getattr(pb, f.name) for f in dataclasses.fields(pb)}
  return dataclasses.replace(pb, **distributed.to_global(fields, run.mesh_or_none(), PROMPT_DIMS))


# ----------------------------------------------------------------------------------- iterator state, stop


def iterator_state(it) -> dict:
  """Every process's data-iterator state, for the checkpoint (orbax writes JSON items from process 0)."""
  return {'processes': distributed.allgather_objects(it.get_state())}


def restore_iterator(it, data_state: dict, where: str) -> None:
  """Sets ``it`` to this process's saved position (a checkpoint of another process count resumes too: the
  global batch order does not depend on it, and the saved positions agree)."""
  states = data_state.get('processes')
  if states is None:   # a single-process checkpoint of an earlier layout: the state itself
    it.set_state(data_state)
    return
  me, n = distributed.process_index(), distributed.process_count()
  if len(states) == n:
    it.set_state(states[me])
  elif all(s == states[0] for s in states):
    log.info('%s: the checkpoint was written by %d process(es), this run has %d; resuming at the same global batch',
             where, len(states), n)
    it.set_state(states[0])
  else:
    raise ValueError(f'{where}: the checkpoint holds {len(states)} different per-process data positions {states}; '
                     f'this run has {n} processes')


def stop_requested(guard) -> bool:
  """True on every process once any process received SIGTERM (checked at the same step everywhere)."""
  return distributed.any_process(guard.should_stop)
