"""How much of an SFT epoch is padding, and what length grouping and finer buckets save.

    python -m medad_jax.bench sft_padding                                  # the embedded default's data
    python -m medad_jax.bench sft_padding --groups 0,4,8 --buckets 128,144,160,176,192,256 --time

For each ``sft.group_by_length`` value (0 = the default order) and bucket list (the default
``pipeline.SFT_LENGTH_BUCKETS`` and the ones given), reads the batch order the SFT stage would read for
``sft.epochs`` (the same ``distributed.process_dataset``, no training) and prints the mean padded length T, the real
tokens per padded token, and how many sequence buckets (compiled SFT programs per patch bucket) it uses. With
``--time``, the SFT step of the config's model (random weights) is timed at each bucket length that occurs (batches
of the real data padded to that length, best of ``--repeats``), and each setting's epoch time is predicted from
its bucket counts; the ratio is against the default (group 0, default buckets), measured in the same run.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

from medad_jax.bench import common


def _parse(argv):
  p = argparse.ArgumentParser(prog='python -m medad_jax.bench sft_padding', description=__doc__.split('\n')[0],
                              epilog='Run-config flags: --config=<name>[:variants] (default congrpo) and '
                                     '--config.<key>=<value>, as for python -m medad_jax.launch.')
  p.add_argument('--groups', default='0,4,8,16', help='sft.group_by_length values (0 = off), comma-separated')
  p.add_argument('--buckets', default='128,144,160,176,192,256', help='a bucket list besides the default')
  p.add_argument('--time', action='store_true', help='time the SFT step at each bucket length that occurs')
  p.add_argument('--repeats', type=int, default=5, help='timed steps per length (the best counts)')
  p.add_argument('--workdir', default='/tmp/medad_bench_sft_padding', help="the setup's scratch run directory")
  config_argv = [a for a in argv if a.startswith('--config=') or a.startswith('--config.')]
  args = p.parse_args([a for a in argv if a not in config_argv])
  if not any(a.startswith('--config=') for a in config_argv):
    config_argv = ['--config=congrpo', *config_argv]
  return args, config_argv


def main(argv: list[str]) -> int:
  from medad_jax import distributed, launch
  from medad_jax.sampling.prompts import pick_bucket
  from medad_jax.train import pipeline as pl
  common.setup_logging()
  args, config_argv = _parse(argv)
  try:
    config, _ = launch.parse(['sft_padding', *config_argv])
  except launch.ConfigError as e:
    raise SystemExit(f'python -m medad_jax.bench sft_padding: {e}') from None
  run = pl.setup(config, args.workdir)
  lengths = np.asarray(run.data.lengths['train'])
  B, epochs = config.sft.batch_size, config.sft.epochs
  fine = tuple(int(x) for x in args.buckets.split(',') if x.strip())
  common.emit(f'machine: {common.machine_summary()}')
  common.emit(f'sft_padding [{" ".join(config_argv)}]: {len(lengths)} training examples, {lengths.mean():.1f} '
              f'tokens on average (min {lengths.min()}, max {lengths.max()}); batch {B}, {epochs} epoch(s)')
  settings, default_order = [], None
  for group in (int(g) for g in args.groups.split(',')):
    order = distributed.process_dataset(list(range(len(lengths))), name='sft', global_batch=B, shard_index=0,
                                        shard_count=1, preprocess=lambda r: r, seed=config.seed,
                                        num_epochs=epochs, read_threads=1, lengths=lengths,
                                        group_by_length=group)
    batches = [np.asarray(b) for b in order]
    default_order = batches if default_order is None else default_order
    for name, buckets in (('default', pl.SFT_LENGTH_BUCKETS), (args.buckets, fine)):
      Ts = collections.Counter(pick_bucket(int(lengths[b].max()), buckets, 'SFT example length') for b in batches)
      settings.append((group, name, Ts))
  step_s = {}
  if args.time:
    step_s = _time_steps(run, sorted({T for *_, Ts in settings for T in Ts}), default_order, args.repeats)
    common.emit('measured SFT step (s, best of %d) per padded length: %s' % (
        args.repeats, ', '.join(f'T {T}: {s:.3f}' for T, s in sorted(step_s.items()))))
  head = ['group_by_length', 'buckets', 'mean padded T', 'real / padded', 'length buckets used']
  if step_s:
    head += ['predicted SFT s', 'vs default']
  rows, base = [], None
  for group, name, Ts in settings:
    mean_T = sum(T * c for T, c in Ts.items()) / sum(Ts.values())
    row = [str(group), name, f'{mean_T:.1f}', f'{lengths.mean() / mean_T:.2f}', str(len(Ts))]
    if step_s:
      t = sum(step_s[T] * c for T, c in Ts.items())
      base = t if base is None else base
      row += [f'{t:.0f}', f'{base / t:.2f}x']
    rows.append(row)
  widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
  common.emit('\n'.join('  '.join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *rows]))
  run.logger.close()
  return 0


def _time_steps(run, Ts, batches, repeats):
  """Seconds of one SFT step of ``run``'s config (random weights) at each padded length ``T``: a batch of the
  default order whose longest example fits ``T`` (its answers set the LM-head bucket as in training)."""
  import jax

  from medad_jax.rl import update as U
  from medad_jax.train import pipeline as pl, sft
  config = run.config
  lengths = np.asarray(run.data.lengths['train'])
  graphdef, state, tx, sched = sft.init_state(run, 1000, warm=False)
  step_fn = U.make_sft_step(graphdef, tx, U.SFTConfig.from_config(config.sft), lr_schedule=sched)
  prep = pl.sft_preprocess(run.processor, config.data.answer_format)
  out, holder = {}, [state]

  def step(batch):   # the step donates its state: thread it through
    holder[0], metrics = step_fn(holder[0], batch)
    return metrics

  for T in Ts:
    rows = next((b for b in batches if lengths[b].max() <= T), np.argsort(lengths)[:config.sft.batch_size])
    batch = pl.sft_batch([prep(run.data.train[int(i)]) for i in rows], run.model_cfg, buckets=(T,),
                         patch_buckets=run.patch_buckets)
    times = common.time_call(lambda: step(batch), repeats=repeats, warmup=1)
    out[T] = min(times)
  return out
