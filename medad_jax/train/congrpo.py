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
   log (reward parts, KL, clip fractions, ...), checkpoint, stop cleanly on SIGTERM. With ``rl.dynamic_sampling``
   (DAPO; one process) a step draws whole prompt batches until ``rl.prompts_per_step`` groups with non-constant
   rewards are kept (at most ``rl.dynamic_sampling_max_draws`` draws, then zero-variance filler) and updates on the
   batch assembled from them (``_dynamic_sampling_batch``; counts logged as ``dyn_*``).

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

from medad_jax import distributed, rundir
from medad_jax.checkpointing import Checkpointer, PreemptionGuard
from medad_jax.rewards import start_scoring
from medad_jax.rl import update as U
from medad_jax.sampling import ops
from medad_jax.sampling.sampler import sample, trace_counts
from medad_jax.train import feed, pipeline as pl, vision_warmup

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
  else:
    # Every leaf committed to the device, as the update's outputs are. The fresh adapters and moments are not (the
    # base's weights may be), and the first step's programs -- sampler, judge, update -- keyed on that mix would
    # all compile a second time for the next step (~16 s in the miniature; WORKSPACE.md).
    state = jax.device_put(state, jax.devices()[0])
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


def resuming(run: pl.Run) -> bool:
  """Whether this run directory already holds a Con-GRPO checkpoint (the run resumes it)."""
  d = os.path.join(run.workdir, 'checkpoints', STAGE)
  if not os.path.isdir(d):
    return False
  ckpt = Checkpointer(d)
  try:
    return ckpt.latest_step() is not None
  finally:
    ckpt.close()


def checkpointer(run: pl.Run) -> Checkpointer:
  c = run.config.ckpt
  return Checkpointer(os.path.join(run.workdir, 'checkpoints', STAGE), keep=c.keep, every_steps=c.every_steps,
                      async_save=c.async_save,
                      meta_defaults={'config_fingerprint': rundir.fingerprint(run.config)},
                      save_frozen=vision_warmup.enabled(run.config))


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


class Scoring:
  """Who scores which rollouts, across processes.

  Each process decodes its own rows (its prompts' G rollouts). A network or rule judge scores each process's rows
  where they are (the judge's load splits over the hosts; an HTTP judge is a shared server). The ``local`` judge
  is a jitted forward of the frozen policy on the global mesh, which every process must call with the same
  inputs, so with several processes every process scores *all* rows (texts and metadata all-gathered first) and
  keeps its own. Either way the per-row reward parts of every row are then known everywhere, for the metrics.
  """

  def __init__(self, run: pl.Run, judge, weights, group_size: int):
    self.run, self.judge, self.weights, self.G = run, judge, weights, group_size
    self.http = run.config.judge.backend in ('sglang', 'openai')
    self.all_rows = run.config.judge.backend == 'local' and distributed.process_count() > 1
    self.mesh = run.mesh_or_none()
    self._rows = None

  def start(self, texts: list[str], metas: list[dict]):
    """Submits the judge call (``rewards.start_scoring``) for the rows this process scores; returns at once."""
    if self.all_rows:
      got = distributed.gather_shards([texts, metas], self.mesh)
      shard, _ = distributed.data_shard(self.mesh)
      before = sum(len(t) for t, _ in got[:shard])
      self._rows = slice(before, before + len(texts))
      texts = [t for part, _ in got for t in part]
      metas = [m for _, part in got for m in part]
    G = self.G
    return start_scoring(texts, answers=_repeat([m['answer'] for m in metas], G),
                         questions=_repeat([m['question'] for m in metas], G),
                         options=_repeat([m['options'] for m in metas], G), judge=self.judge, weights=self.weights)

  def mine(self, rb) -> dict[str, np.ndarray]:
    """This process's rows of the reward parts (``fmt``, ``acc``, ``con``, ``judged``, ``total``; in the evidence
    mode also ``con_<part>`` for each rubric part)."""
    rows = self._rows or slice(None)
    out = {k: np.asarray(getattr(rb, k))[rows] for k in ('fmt', 'acc', 'con', 'judged', 'total')}
    out.update({f'con_{p}': np.asarray(v)[rows] for p, v in (rb.con_parts or {}).items()})
    return out

  def everyone(self, mine: dict[str, np.ndarray], finish: np.ndarray) -> dict[str, np.ndarray]:
    """Every row's reward parts and finish codes, in global row order (the same on every process)."""
    local = {k: np.asarray(v).astype(float).tolist() for k, v in mine.items()}
    local['finish'] = np.asarray(finish).astype(int).tolist()
    got = distributed.gather_shards(local, self.mesh)
    return {k: np.concatenate([np.asarray(g[k]) for g in got]) for k in local}


def _no_rewards(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if k != 'rewards_B'}


def _reference_fn(graphdef, group_size: int, temperature: float, mesh):
  """The jitted reference pass (adapters off): ``(params, frozen, batch) -> ref_logp_BN``, rows over the mesh's
  batch axes."""
  import functools
  out = None
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec
    from medad_jax.sharding import BATCH_AXES
    out = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))
  fn = functools.partial(U.rollout_logprobs, graphdef, group_size=group_size, temperature=temperature,
                         adapters=False)
  return jax.jit(fn, out_shardings=out)


def _overlapped_reference(ref_fn, state, dev_batch: dict, pending) -> tuple[dict, dict]:
  """Dispatches the reference pass on ``dev_batch`` and times it on a watcher thread (until the device is done)
  while the caller waits on the judge -> ``(batch with ref_logp_BN, {'device_started', 'device_finished'})``."""
  import threading
  t0 = time.monotonic()
  ref = ref_fn(state.params, state.frozen, dev_batch)
  timing = {'device_started': t0}

  def watch():
    jax.block_until_ready(ref)
    timing['device_finished'] = time.monotonic()

  watcher = threading.Thread(target=watch, name='reference-pass', daemon=True)
  watcher.start()
  if pending is not None:
    pending.result()   # the judge's HTTP call runs while the device computes
  watcher.join()
  return {**dev_batch, 'ref_logp_BN': ref}, timing


def _overlap_metrics(pending, timing: dict) -> dict[str, float]:
  """``device_seconds`` (the reference pass, dispatch to done) and ``overlap_frac``: the fraction of the judge's
  wall time during which the device was computing (0 when the two ran one after the other)."""
  if not timing:
    return {'overlap_frac': 0.0}
  d0, d1 = timing['device_started'], timing['device_finished']
  if pending is None:   # the reference pass ran on its own
    return {'device_seconds': d1 - d0, 'overlap_frac': 0.0}
  j0, j1 = pending.started, pending.finished or time.monotonic()
  both = max(0.0, min(j1, d1) - max(j0, d0))
  return {'device_seconds': d1 - d0, 'overlap_frac': both / (j1 - j0) if j1 > j0 else 0.0}


def _draw_rollouts(run: pl.Run, it, graphdef, state, key, scfg, table, num_prompts: int, fields: dict):
  """One draw of a step: the next prompt batch, its G rollouts per prompt from the compiled sampler, and this
  process's rows of ``fields`` (name -> Rollout attribute) on the host, decoded to text ->
  ``(examples, prompts, roll, rows, texts, sample_seconds)``. Used by the plain step and by each draw of dynamic
  sampling."""
  examples = next(it)
  prompts = feed.prompt_batch(run, examples, num_prompts)
  mesh = run.mesh_or_none()
  t0 = time.time()
  roll = sample(U.merge_model(graphdef, state), prompts, key=key, config=scfg, num_samples=run.config.rl.group_size,
                mesh=mesh, stop_table=table)
  # This process's rows (its prompts' G rollouts each) come to the host for decoding and scoring.
  rows = distributed.local_rows({k: getattr(roll, a) for k, a in fields.items()}, mesh)
  t_sample = time.time() - t0
  texts = pl.decode_completions(run.tokenizer, np.asarray(rows['tokens']), np.asarray(rows['lengths']))
  return examples, prompts, roll, rows, texts, t_sample


_STEP_FIELDS = {'tokens': 'tokens_BN', 'lengths': 'lengths_B', 'finish': 'finish_reason_B'}


def _dynamic_sampling_batch(run: pl.Run, it, scoring: Scoring, holder: dict, graphdef, state, step: int, scfg, table,
                            num_prompts: int):
  """DAPO dynamic sampling for one optimizer step -> ``(batch, parts, sample_s, judge_s, extra)``.

  Each draw is a whole step's batch as without dynamic sampling: the next ``num_prompts`` questions, G rollouts
  each (draw 0 with the step's key ``fold_in(state.rng, step)``, draw d > 0 with ``fold_in(that key, d)``), decoded
  and scored. ``rl.algo.dynamic_sampling_refill`` keeps the informative groups (G rewards not all equal) and draws
  again while fewer than ``num_prompts`` are kept, at most ``rl.dynamic_sampling_max_draws`` draws; zero-variance
  groups complete the batch at the cap. The update's batch is then assembled from the kept groups: their questions
  give a new ``PromptBatch`` (the same ``num_prompts`` rows, so the same shapes as a normal step), and their G
  rollout rows (tokens, masks, the sampler's log-probs, rewards) are taken from the draws they came from.

  Several processes: each draw's questions, rollout rows and rewards of every data shard are all-gathered, so
  every process takes the same keep / refill decision over the global groups (target ``rl.prompts_per_step``) and
  builds its shard's rows of the kept batch (``num_prompts`` = this process's prompts per step), wherever a kept
  group was drawn.

  ``parts`` are the kept rows' reward parts and finish codes (the metrics describe the batch the update saw);
  ``extra`` holds the counts ``dyn_drawn``, ``dyn_dropped``, ``dyn_filler``, ``dyn_surplus``, ``dyn_draws``
  (``dyn_drawn = num_prompts + dyn_dropped + dyn_surplus``), ``reward_drawn`` (the mean reward of every rollout
  drawn) and ``roll`` (the kept rows' sampler log-probs, for ``_rollout_logprobs_for_variants``).
  """
  import types
  from medad_jax.rl import algo
  rl = run.config.rl
  G = rl.group_size
  key = jax.random.fold_in(state.rng, step)
  shard, n_shards = feed.shard(run)
  mesh = run.mesh_or_none()
  draws, clock = [], {'sample': 0.0, 'judge': 0.0}

  fields = {**_STEP_FIELDS, 'mask': 'completion_mask_BN', 'logp': 'policy_logprobs_BN',
            'sampling_logp': 'sampling_logprobs_BN'}

  def draw(n):   # n (the groups still missing) is ignored: every draw is a whole batch (static shapes)
    d = len(draws)
    examples, _, _, rows, texts, t_sample = _draw_rollouts(
        run, it, graphdef, state, jax.random.fold_in(key, d) if d else key, scfg, table, num_prompts, fields)
    clock['sample'] += t_sample
    holder['state'] = state
    pending = scoring.start(texts, [ex['meta'] for ex in examples])
    rb = pending.result()
    clock['judge'] += (pending.finished or time.monotonic()) - pending.started
    mine = {**scoring.mine(rb), 'finish': np.asarray(rows['finish'])}
    # Every data shard's questions, rollout rows and rewards, in global order (the same on every process): the
    # keep / refill decision is global, and a kept group may have been drawn on another process.
    got = distributed.gather_shards([examples, {k: np.asarray(v) for k, v in rows.items()}, mine], mesh)
    everyone = ([e for ex, _, _ in got for e in ex],
                {k: np.concatenate([r[k] for _, r, _ in got]) for k in rows},
                {k: np.concatenate([p[k] for _, _, p in got]) for k in mine})
    draws.append(everyone)
    return [(d, p) for p in range(len(everyone[0]))], everyone[2]['total'].reshape(-1, G)

  res = algo.dynamic_sampling_refill(draw, num_prompts * n_shards, max_draws=rl.dynamic_sampling_max_draws)
  # This process's share of the kept groups: the global batch's rows of its data shard, as in a normal step.
  own = res.groups[shard * num_prompts:(shard + 1) * num_prompts]

  def pick(groups, i: int, name: str) -> np.ndarray:   # the groups' G rows of draws[*][i][name], in kept order
    return np.concatenate([np.asarray(draws[d][i][name])[p * G:(p + 1) * G] for d, p in groups])

  prompts = feed.prompt_batch(run, [draws[d][0][p] for d, p in own], num_prompts)
  parts = {k: pick(res.groups, 2, k) for k in draws[0][2]}   # every kept row: the metrics describe the update
  # This process's rows -> global arrays across processes (host arrays as they are for one process).
  rows = distributed.to_global({'tokens_BN': pick(own, 1, 'tokens'), 'completion_mask_BN': pick(own, 1, 'mask'),
                                'policy_logprobs_BN': pick(own, 1, 'logp'),
                                'sampling_logprobs_BN': pick(own, 1, 'sampling_logp'),
                                'rewards_B': pick(own, 2, 'total').astype(np.float32)}, mesh)
  rewards_B = rows.pop('rewards_B')
  roll = types.SimpleNamespace(**rows)
  batch = {**_no_rewards(U.rollout_batch(prompts, roll, np.zeros(0, np.float32))), 'rewards_B': rewards_B}
  extra = {f'dyn_{k}': float(getattr(res, k)) for k in ('drawn', 'dropped', 'filler', 'surplus', 'draws')}
  extra['reward_drawn'] = float(np.mean([np.mean(x[2]['total']) for x in draws]))
  extra['roll'] = roll
  return batch, parts, clock['sample'], clock['judge'], extra


def train(run: pl.Run, base_model: nnx.Module) -> Result:
  config, logger = run.config, run.logger
  t_start = time.time()
  rl, G = config.rl, config.rl.group_size
  records = pl.rl_records(run)
  total = num_steps(config, len(records))
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
  update = U.make_congrpo_update(graphdef, tx, gcfg, mesh=mesh, lr_schedule=sched)
  scfg = pl.sampling_config(config.sampling, run.model_cfg)
  table = pl.stop_table(run.tokenizer, run.model_cfg)
  weights = pl.reward_weights(config)

  # ------------------------------------------------------------------------------------------------ data
  # This process's prompts of every global batch of rl.prompts_per_step (medad_jax/train/feed.py).
  shard, n_shards = feed.shard(run)
  per_process = rl.prompts_per_step // n_shards
  ds = feed.dataset(run, records, name=STAGE, global_batch=rl.prompts_per_step, seed=config.seed + 1,
                    preprocess=pl.prompt_preprocess(run.processor))
  it = iter(ds)
  scoring = Scoring(run, judge, weights, G)
  overlap = scoring.http and config.judge.overlap
  # The reference log-probs leave the update when they can overlap the judge's HTTP call (or serve mu > 1
  # updates); ``update.rollout_logprobs`` is the update's own code path, so the result is the same.
  ref_outside = gcfg.needs_reference and rl.trainable == 'lora' and (overlap or rl.inner_iterations > 1)
  ref_fn = _reference_fn(graphdef, G, gcfg.temperature, mesh) if ref_outside else None

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
    feed.restore_iterator(it, data_state, STAGE)
  start = int(meta['rollout_step']) if restored is not None else 0
  if start:
    log.info('congrpo: resuming at rollout step %d of %d', start, total)
  logger.total_steps[STAGE] = total

  # ------------------------------------------------------------------------------------------------ loop
  preempted = False
  with PreemptionGuard() as guard:
    for step in range(start, total):
      extra = {}
      if rl.dynamic_sampling:
        batch, parts, t_sample, judge_s, extra = _dynamic_sampling_batch(run, it, scoring, holder, graphdef, state,
                                                                         step, scfg, table, per_process)
        _rollout_logprobs_for_variants(batch, extra.pop('roll'), gcfg, graphdef, state, mesh)
        pending, timing = None, {}
        if ref_outside:
          rewards_B = batch.pop('rewards_B')
          batch, timing = _overlapped_reference(ref_fn, state, U.put_batch(batch, mesh), None)
          batch['rewards_B'] = rewards_B
        batch = U.put_batch(batch, mesh)
      else:
        examples, prompts, roll, mine, texts, t_sample = _draw_rollouts(
            run, it, graphdef, state, jax.random.fold_in(state.rng, step), scfg, table, per_process, _STEP_FIELDS)
        holder['state'] = state
        pending = scoring.start(texts, [ex['meta'] for ex in examples])
        batch = _no_rewards(U.rollout_batch(prompts, roll, np.zeros(len(texts), np.float32)))
        _rollout_logprobs_for_variants(batch, roll, gcfg, graphdef, state, mesh)
        timing = {}
        if overlap and ref_outside:
          # While the judge scores this step's rollouts over HTTP, the device computes the reference log-probs.
          batch, timing = _overlapped_reference(ref_fn, state, U.put_batch(batch, mesh), pending)
          rb = pending.result()
        else:
          rb = pending.result()
          if ref_outside:
            batch, timing = _overlapped_reference(ref_fn, state, U.put_batch(batch, mesh), None)
        judge_s = (pending.finished or time.monotonic()) - pending.started
        rewards = scoring.mine(rb)
        batch['rewards_B'] = distributed.to_global({'rewards_B': rewards['total']}, mesh)['rewards_B']
        batch = U.put_batch(batch, mesh)
      for _ in range(rl.inner_iterations):
        state, metrics = update(state, batch)
      holder['state'] = state
      if not rl.dynamic_sampling:
        parts = scoring.everyone(rewards, np.asarray(mine['finish']))
      r_PG = parts['total'].reshape(-1, G)
      host = {'reward_fmt': float(parts['fmt'].mean()), 'reward_acc': float(parts['acc'].mean()),
              'reward_con': float(parts['con'].mean()), 'judged_frac': float(parts['judged'].mean()),
              'group_reward_std': float(r_PG.std(axis=1).mean()), 'sample_seconds': t_sample,
              'finish_stop': float(np.mean([ops.FINISH_REASONS[int(c)] != 'length' for c in parts['finish']])),
              # programs compiled so far: the update's and the sampler's (prefill + decode), one per shape bucket
              'compiled_programs': update.traces, 'compiled_programs_sampler': sum(trace_counts().values()),
              'judge_seconds': judge_s, **_overlap_metrics(pending, timing),
              **{f'reward_{k}': float(v.mean()) for k, v in parts.items() if k.startswith('con_')}, **extra}
      if (step + 1) % config.log.every_steps == 0 or step + 1 == total:
        logger.log(STAGE, step + 1, {**metrics, **host})
      meta = {'stage': STAGE, 'rollout_step': step + 1}
      if feed.stop_requested(guard):   # SIGTERM on any host stops every process after this same step
        logger.flush()
        ckpt.save(step + 1, state, data_state=feed.iterator_state(it), meta=meta, force=True)
        ckpt.close()
        judge.close()
        log.warning('congrpo: stopped by SIGTERM at step %d; checkpoint saved', step + 1)
        return Result(graphdef, state, preempted=True)
      if step + 1 < total and (step + 1) % ckpt.every_steps == 0:
        ckpt.save(step + 1, state, data_state=feed.iterator_state(it), meta=meta)
  logger.flush()
  ckpt.save(total, state, data_state=feed.iterator_state(it), meta={'stage': STAGE, 'rollout_step': total, 'done': True},
            force=True)
  ckpt.close()
  judge.close()
  run.timings[STAGE] = time.time() - t_start
  log.info('congrpo: %d rollout steps in %.1f s', total - start, run.timings[STAGE])
  return Result(graphdef, state, preempted)
