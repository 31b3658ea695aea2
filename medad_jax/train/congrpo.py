"""Stage 2, Reasoning Reinforcement: Con-GRPO (Eq. 3-8) from the SFT policy.

    graphdef, state = congrpo.train(run, base_model)    # base_model: pi_SFT (or the base model for RL-only)

Top to bottom:

1. **policy** -- with ``rl.trainable='lora'`` the SFT adapters (if any) are merged into the base and fresh RL
   adapters attached (``prepare_rl_policy``); the reference pi_SFT is then the same weights with the adapters
   off, so it costs no second copy. ``'all'`` keeps a frozen copy of the parameters as the reference.
2. **judge** -- ``judge.backend``: ``local`` is the frozen SFT policy (adapters off) scoring the option letters
   after the question and the thought only (``medad_jax.judge.flax_scorer``, ``judge.prompt_format``);
   ``sglang`` / ``openai`` a server; ``rule`` the extractive judge.
3. **step** -- the ONE jitted update (``make_congrpo_update``), with shardings and donation.
4. **data** -- ``rl.prompts_per_step`` training questions per step (grain, repeated; the iterator position is
   checkpointed).
5. **loop** -- per step: sample G completions per prompt (temperature ``sampling.temperature``; the old-policy
   log-probs come from the sampler), score them (format, accuracy, consistency; Eq. 3), run mu =
   ``rl.inner_iterations`` updates on the batch (the reference log-probs computed once per batch when mu > 1),
   log (reward parts, KL, clip fractions, ...), checkpoint, stop cleanly on SIGTERM.

Steps: ``rl.epochs * len(train) // rl.prompts_per_step``, capped by ``rl.max_steps`` when > 0. The step's PRNG key
is ``fold_in(state.rng, step)``: a resumed run draws the same rollouts as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np
from flax import nnx

from medad_jax import rundir
from medad_jax.checkpointing import Checkpointer, PreemptionGuard
from medad_jax.data.pipeline import make_dataset
from medad_jax.rewards import start_scoring
from medad_jax.rl import update as U
from medad_jax.sampling.sampler import sample, trace_counts
from medad_jax.train import pipeline as pl

log = logging.getLogger(__name__)
STAGE = 'congrpo'


Result = pl.StageResult


def num_steps(config, num_examples: int) -> int:
  r = config.rl
  return pl.num_steps(r.epochs, num_examples, r.prompts_per_step, r.max_steps)


def init_state(run: pl.Run, base_model: nnx.Module, total_steps: int):
  """pi_SFT -> ``(graphdef, state, tx, schedule)`` of the RL run (see step 1 of the module docstring)."""
  config = run.config
  trainable = config.rl.trainable
  if trainable == 'lora':
    U.prepare_rl_policy(base_model, pl.lora_config(config))
  tx, sched = U.optimizer_from_config(config.rl.optim, total_steps)
  graphdef, state = U.init_train_state(base_model, tx, trainable=trainable, seed=config.seed,
                                       keep_reference=trainable == 'all')
  mesh = run.mesh_or_none()
  if mesh is not None:
    state = U.place_state(state, mesh)
  return graphdef, state, tx, sched


def make_judge(run: pl.Run, graphdef, weights, *, adapters: bool = False):
  """The consistency judge of ``config.judge``; ``weights()`` gives the states of the local judge's model."""
  from medad_jax.judge import make_judge as _make
  from medad_jax.judge.flax_scorer import FlaxLetterScorer
  jcfg = pl.judge_config(run.config)
  scorer = None
  if jcfg.backend == 'local' or jcfg.on_failure == 'fallback_local':
    fmt = run.config.judge.prompt_format
    # In the policy's own format the judge answers as the policy was taught to (a letter or the option text); the
    # instruction format asks any chat model for one letter.
    scorer = FlaxLetterScorer(graphdef, weights, run.tokenizer, run.model_cfg, adapters=adapters, prompt_format=fmt,
                              answer_format=run.config.data.answer_format if fmt == 'policy' else 'letter')
  return _make(jcfg, local_scorer=scorer)


def checkpointer(run: pl.Run) -> Checkpointer:
  c = run.config.ckpt
  return Checkpointer(os.path.join(run.workdir, 'checkpoints', STAGE), keep=c.keep, every_steps=c.every_steps,
                      async_save=c.async_save,
                      meta_defaults={'config_fingerprint': rundir.fingerprint(run.config)})


def _rollout_logprobs_for_variants(batch: dict, roll, gcfg: U.GRPOConfig, graphdef, state, mesh) -> None:
  """The old-policy log-probs the update's ratio needs (in place):

  * ``sampling.temperature`` T != 1: the sampler's log-probs under the distribution it sampled from
    (``softmax(z / T)``), the update's ``GRPOConfig.temperature`` being T too (see its docstring);
  * ``rl.tis_cap`` > 0: those become ``sampler_logp_BN`` and ``old_logp_BN`` is recomputed by the update's own
    forward at the rollout parameters, so truncated importance sampling corrects for any rollout-update mismatch.
  """
  if gcfg.temperature != 1.0:
    batch['old_logp_BN'] = roll.sampling_logprobs_BN
  if gcfg.tis_cap > 0:
    batch['sampler_logp_BN'] = batch['old_logp_BN']
    batch['old_logp_BN'] = U.rollout_logprobs(graphdef, state.params, state.frozen, U.put_batch(batch, mesh),
                                              group_size=gcfg.group_size, temperature=gcfg.temperature)


def _repeat(xs, g):
  return [x for x in xs for _ in range(g)]


def train(run: pl.Run, base_model: nnx.Module) -> Result:
  config, logger = run.config, run.logger
  t_start = time.time()
  rl, G = config.rl, config.rl.group_size
  total = num_steps(config, len(run.data.train))
  mesh = run.mesh_or_none()

  # ------------------------------------------------------------------------------------ policy and judge
  if rl.trainable == 'all' and config.judge.backend == 'local':
    raise ValueError("config.judge.backend='local' with config.rl.trainable='all': the local judge is the frozen "
                     'SFT policy, which full fine-tuning does not keep as adapters-off weights; use LoRA for RL')
  graphdef, state, tx, sched = init_state(run, base_model, total)
  holder = {'state': state}  # the judge reads the current state's buffers (the update donates the old ones)
  judge = make_judge(run, graphdef, lambda: (holder['state'].params, holder['state'].frozen), adapters=False)

  # ------------------------------------------------------------------------------------------------ step
  gcfg = U.GRPOConfig.from_config(rl, config.sampling)
  if rl.dynamic_sampling:
    raise ValueError('config.rl.dynamic_sampling=True: the refill is not wired into this loop yet (the tested '
                     'host function is medad_jax.rl.algo.dynamic_sampling_refill); use rl.filter_zero_variance')
  update = U.make_congrpo_update(graphdef, tx, gcfg, mesh=mesh, lr_schedule=sched)
  scfg = pl.sampling_config(config.sampling, run.model_cfg)
  table = pl.stop_table(run.tokenizer, run.model_cfg)
  weights = pl.reward_weights(config)

  # ------------------------------------------------------------------------------------------------ data
  ds = make_dataset(run.data.train, batch_size=rl.prompts_per_step, seed=config.seed + 1, num_epochs=None,
                    shard_index=0, shard_count=1, preprocess=pl.prompt_preprocess(run.processor),
                    batch_fn=pl.list_batch, drop_remainder=True, read_threads=config.data.read_threads)
  it = iter(ds)

  # ------------------------------------------------------------------------------------ checkpoint restore
  ckpt = checkpointer(run)
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, data_state, meta = restored
    if meta.get('done'):
      log.info('congrpo: finished checkpoint found (step %d); not training again', int(state.step) // rl.inner_iterations)
      ckpt.close()
      judge.close()
      return Result(graphdef, state)
    it.set_state(data_state)
  start = int(meta['rollout_step']) if restored is not None else 0
  if start:
    log.info('congrpo: resuming at rollout step %d of %d', start, total)
  logger.total_steps[STAGE] = total

  # ------------------------------------------------------------------------------------------------ loop
  preempted = False
  with PreemptionGuard() as guard:
    for step in range(start, total):
      examples = next(it)
      metas = [ex['meta'] for ex in examples]
      prompts = pl.prompt_batch(examples, run.model_cfg, num_prompts=rl.prompts_per_step,
                                patch_buckets=run.patch_buckets)
      key = jax.random.fold_in(state.rng, step)
      t0 = time.time()
      roll = jax.device_get(sample(U.merge_model(graphdef, state), prompts, key=key, config=scfg, num_samples=G,
                                   mesh=mesh, stop_table=table))
      t_sample = time.time() - t0
      texts = pl.decode_completions(run.tokenizer, np.asarray(roll.tokens_BN), np.asarray(roll.lengths_B))
      holder['state'] = state
      pending = start_scoring(texts, answers=_repeat([m['answer'] for m in metas], G),
                              questions=_repeat([m['question'] for m in metas], G),
                              options=_repeat([m['options'] for m in metas], G), judge=judge, weights=weights)
      rb = pending.result()
      batch = U.rollout_batch(prompts, roll, rb.total)
      _rollout_logprobs_for_variants(batch, roll, gcfg, graphdef, state, mesh)
      if rl.inner_iterations > 1 and gcfg.needs_reference and rl.trainable == 'lora':
        batch['ref_logp_BN'] = U.rollout_logprobs(graphdef, state.params, state.frozen, U.put_batch(batch, mesh),
                                                  group_size=G, temperature=gcfg.temperature, adapters=False)
      batch = U.put_batch(batch, mesh)
      for _ in range(rl.inner_iterations):
        state, metrics = update(state, batch)
      holder['state'] = state
      r_PG = rb.total.reshape(-1, G)
      host = {'reward_fmt': float(rb.fmt.mean()), 'reward_acc': float(rb.acc.mean()),
              'reward_con': float(rb.con.mean()), 'judged_frac': float(rb.judged.mean()),
              'group_reward_std': float(r_PG.std(axis=1).mean()), 'sample_seconds': t_sample,
              'finish_stop': float(np.mean([r != 'length' for r in roll.finish_reasons()])),
              # programs compiled so far: the update's and the sampler's (prefill + decode), one per shape bucket
              'compiled_programs': update.traces, 'compiled_programs_sampler': sum(trace_counts().values()),
              **rb.con_part_metrics()}
      if (step + 1) % config.log.every_steps == 0 or step + 1 == total:
        logger.log(STAGE, step + 1, {**metrics, **host})
      meta = {'stage': STAGE, 'rollout_step': step + 1}
      if guard.should_stop:
        logger.flush()
        ckpt.save(step + 1, state, data_state=it.get_state(), meta=meta, force=True)
        ckpt.close()
        judge.close()
        log.warning('congrpo: stopped by signal %s at step %d; checkpoint saved', guard.received, step + 1)
        return Result(graphdef, state, preempted=True)
      if step + 1 < total:
        ckpt.maybe_save(step + 1, state, data_state=it.get_state(), meta=meta)
  logger.flush()
  ckpt.save(total, state, data_state=it.get_state(), meta={'stage': STAGE, 'rollout_step': total, 'done': True},
            force=True)
  ckpt.close()
  judge.close()
  run.timings[STAGE] = time.time() - t_start
  log.info('congrpo: %d rollout steps in %.1f s', total - start, run.timings[STAGE])
  return Result(graphdef, state, preempted)
