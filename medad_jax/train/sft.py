"""Stage 1, Cognitive Injection: supervised fine-tuning on ``<think>..</think><answer>..</answer>`` (Eq. 1).

    graphdef, state = sft.train(run)        # run = pipeline.setup(config, workdir)

Top to bottom: model (+ LoRA adapters unless ``sft.trainable='all'``) -> optimizer and train state -> the jitted
step (``medad_jax.rl.update.make_sft_step``: masked NLL over the assistant tokens, buffer donation, shardings) ->
the grain input pipeline -> checkpoint restore -> the loop (log, checkpoint, SIGTERM) -> a final checkpoint marked
``done`` that later stages (and a resumed run) restore instead of training again.

Steps: ``sft.epochs * len(epoch) // sft.batch_size`` (batches never straddle a partial remainder: the data repeats
and the step count decides), capped by ``sft.max_steps`` when that is > 0. An epoch is the train split, with the
questions of the tasks in ``sft.task_repeats`` repeated (``pipeline.sft_records``).
"""

from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np

from medad_jax import distributed, rundir
from medad_jax.checkpointing import Checkpointer, PreemptionGuard
from medad_jax.rl import update as U
from medad_jax.train import feed, pipeline as pl, precompile, vision_warmup

log = logging.getLogger(__name__)
STAGE = 'sft'


Result = pl.StageResult


def num_steps(config, num_examples: int) -> int:
  s = config.sft
  return pl.num_steps(s.epochs, num_examples, s.batch_size, s.max_steps)


def init_state(run: pl.Run, total_steps: int, *, warm: bool = False, before_warmup=None):
  """-> ``(graphdef, state, tx, schedule)`` of a fresh SFT run (placed on the mesh). ``warm``: run the vision
  warm-up stage on the base first (``vision_warmup.enabled``; False where a checkpoint replaces the weights).
  ``before_warmup(graphdef, state, tx, schedule)``: called, when the warm-up runs, with a state of the same
  shapes built before it (the values are the unwarmed base's: for compiling ahead, not for training)."""
  config = run.config
  model = vision_warmup.base_model(run, warm=False)
  tx, sched = U.optimizer_from_config(config.sft.optim, total_steps)
  if warm and vision_warmup.enabled(config):
    if before_warmup is not None:
      from flax import nnx
      before_warmup(*_train_state(run, nnx.clone(model), tx), tx, sched)
    vision_warmup.warm_up(run, model)
  return (*_train_state(run, model, tx), tx, sched)


def _train_state(run: pl.Run, model, tx):
  """``model`` (+ LoRA adapters unless ``sft.trainable='all'``) -> ``(graphdef, state)`` placed on the mesh."""
  config = run.config
  if config.sft.trainable == 'lora':
    from medad_jax.model.lora import apply_lora
    from flax import nnx
    lcfg = pl.lora_config(config)
    apply_lora(model, lcfg, rngs=nnx.Rngs(lcfg.seed))
  graphdef, state = U.init_train_state(model, tx, trainable=config.sft.trainable, seed=config.seed)
  mesh = run.mesh_or_none()
  if mesh is not None:
    state = U.place_state(state, mesh)
  return graphdef, state


def likely_buckets(lengths, buckets, batch_size: int, steps: int) -> list[int]:
  """The length buckets at least one of ``steps`` shuffled batches of ``batch_size`` examples is expected to fall
  into: a batch's bucket is its longest example's, and ``P(longest <= T) = F(T) ** batch_size`` with ``F`` the
  share of examples of at most ``T`` tokens (a bucket only long examples reach is rare in batches of 8)."""
  from medad_jax.sampling.prompts import pick_bucket
  n = np.asarray(lengths)
  used = sorted({pick_bucket(int(x), buckets, 'SFT example length (tokens)') for x in set(n.tolist())})
  out, below = [], 0.0
  for T in used:
    at_most = float((n <= T).mean()) ** batch_size
    if steps * (at_most - below) >= 1.0:
      out.append(T)
    below = at_most
  return out


def example_batches(run: pl.Run, records, lengths, steps: int) -> list[tuple[str, dict]]:
  """One batch of ``sft.batch_size`` rows for each length bucket the run's batches are likely to fall into
  (:func:`likely_buckets`; every bucket its examples reach when ``sft.group_by_length`` sorts the batches), padded
  to it: the shapes the step will be called with, to compile them ahead. Each holds the longest examples that fit
  its bucket, so its answer-token bucket is the one long answers give."""
  config = run.config
  B = config.sft.batch_size
  grouped = config.sft.get('group_by_length', 0) > 0
  buckets = likely_buckets(lengths, feed.length_buckets(config), 1 if grouped else B, steps)
  order = sorted(range(len(lengths)), key=lambda i: lengths[i])
  prep = pl.sft_preprocess(run.processor, config.data.answer_format)
  out = []
  for T in buckets:
    examples = [prep(records[i]) for i in [i for i in order if lengths[i] <= T][-B:]]
    out.append((f'T={T}', pl.sft_batch(examples, run.model_cfg, buckets=(T,), patch_buckets=run.patch_buckets,
                                        target_buckets=feed.target_buckets(config))))
  return out


def checkpointer(run: pl.Run) -> Checkpointer:
  c = run.config.ckpt
  return Checkpointer(os.path.join(run.workdir, 'checkpoints', STAGE), keep=c.keep, every_steps=c.every_steps,
                      async_save=c.async_save,
                      meta_defaults={'config_fingerprint': rundir.fingerprint(run.config)},
                      save_frozen=vision_warmup.enabled(run.config))


def train(run: pl.Run) -> Result:
  config, logger = run.config, run.logger
  t_start = time.time()
  records, lengths = pl.sft_records(run)
  total = num_steps(config, len(records))
  ckpt = checkpointer(run)
  mesh = run.mesh_or_none()

  def make_step(graphdef, tx, sched):
    return U.make_sft_step(graphdef, tx, U.SFTConfig.from_config(config.sft), mesh=mesh, lr_schedule=sched)

  ahead = {}

  def compile_ahead(graphdef, state, tx, sched):
    """The step's programs for the length buckets the batches are likely to fall into, compiled while the warm-up
    runs (train/precompile.py)."""
    if not config.sft.get('compile_ahead', True) or lengths is None or distributed.process_count() > 1:
      return   # (several processes: the example batches are this process's rows; the step sees global batches)
    ahead.update(graphdef=graphdef, step_fn=make_step(graphdef, tx, sched), pre=precompile.Precompiler(STAGE))
    for name, batch in example_batches(run, records, lengths, total):
      ahead['pre'].submit(name, ahead['step_fn'].lower, precompile.abstract(state),
                          precompile.abstract(U.put_batch(batch, mesh)))

  # A run resuming its SFT checkpoint has its warmed-up tower in it: the warm-up runs only on a fresh start.
  graphdef, state, tx, sched = init_state(run, total, warm=ckpt.latest_step() is None, before_warmup=compile_ahead)
  if ahead:
    ahead['pre'].join()
  step_fn = ahead['step_fn'] if ahead and ahead['graphdef'] == graphdef else make_step(graphdef, tx, sched)

  # ---------------------------------------------------------------------------------------------- data
  # This process's rows of every global batch (the same batches for any process count; medad_jax/train/feed.py).
  ds = feed.dataset(run, records, name=STAGE, global_batch=config.sft.batch_size, seed=config.seed,
                    preprocess=pl.sft_preprocess(run.processor, config.data.answer_format),
                    lengths=lengths, group_by_length=config.sft.get('group_by_length', 0))
  it = iter(ds)

  # ------------------------------------------------------------------------------------ checkpoint restore
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, data_state, meta = restored
    if meta.get('done'):
      log.info('sft: finished checkpoint found (step %d); not training again', int(state.step))
      ckpt.close()
      return Result(graphdef, state)
    feed.restore_iterator(it, data_state, STAGE)
    log.info('sft: resuming at step %d of %d', int(state.step), total)
  start = int(jax.device_get(state.step))
  logger.total_steps[STAGE] = total

  # ------------------------------------------------------------------------------------------------ loop
  preempted = False
  with PreemptionGuard() as guard:
    for step in range(start, total):
      batch = U.put_batch(feed.sft_batch(run, next(it)), mesh)
      state, metrics = step_fn(state, batch)
      if (step + 1) % config.log.every_steps == 0 or step + 1 == total:
        # compiled_programs: SFT step programs so far (one per batch shape: length bucket x patch buckets)
        logger.log(STAGE, step + 1, {**metrics, 'compiled_programs': step_fn.traces})
      if feed.stop_requested(guard):   # SIGTERM on any host stops every process after this same step
        logger.flush()
        ckpt.save(step + 1, state, data_state=feed.iterator_state(it), meta={'stage': STAGE}, force=True)
        ckpt.close()
        log.warning('sft: stopped by SIGTERM at step %d; checkpoint saved', step + 1)
        return Result(graphdef, state, preempted=True)
      if step + 1 < total:
        if (step + 1) % ckpt.every_steps == 0:
          ckpt.save(step + 1, state, data_state=feed.iterator_state(it), meta={'stage': STAGE})
  logger.flush()
  ckpt.save(total, state, data_state=feed.iterator_state(it), meta={'stage': STAGE, 'done': True}, force=True)
  ckpt.close()
  # the vision warm-up ran inside init_state: it has its own entry (vision_warmup.STAGE)
  run.timings[STAGE] = time.time() - t_start - run.timings.get(vision_warmup.STAGE, 0.0)
  log.info('sft: %d steps in %.1f s', total - start, run.timings[STAGE])
  return Result(graphdef, state, preempted)


def restore_finished(run: pl.Run, run_dir: str) -> Result:
  """The finished SFT policy of another run directory (``sft.checkpoint``), rebuilt exactly as it was trained."""
  d = os.path.join(run_dir, 'checkpoints', STAGE)
  if not os.path.isdir(d):
    raise FileNotFoundError(f'config.sft.checkpoint = {run_dir!r}: no SFT checkpoints under {d}')
  total = num_steps(run.config, len(pl.sft_records(run)[0]))
  graphdef, state, _, _ = init_state(run, total)
  ckpt = Checkpointer(d, keep=run.config.ckpt.keep)
  try:
    out = ckpt.restore_latest(state)
  finally:
    ckpt.close()
  if out is None or not out[2].get('done'):
    raise ValueError(f'config.sft.checkpoint = {run_dir!r}: the SFT run there has not finished (no checkpoint '
                     'marked done)')
  return Result(graphdef, out[0])
