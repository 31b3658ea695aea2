r"""The entry point: ``python -m medad_jax.launch --config=<name>[:variants] [--config.a.b=value ...]``.

    python -m medad_jax.launch --config=congrpo                   # embedded miniature: SFT -> Con-GRPO -> eval
    python -m medad_jax.launch --config=congrpo:paper --config.model.checkpoint=/ckpt/Qwen2.5-VL-3B-Instruct \
        --config.data.dir=/data/MedAD-38K --config.judge.url=http://judge:30000
    python -m medad_jax.launch --config=sft --config.sft.epochs=1 --workdir=runs/my-sft
    python -m medad_jax.launch --config=eval --config.workdir=runs/congrpo-20250101-120000

``--config`` takes a short name (``congrpo``, ``sft``, ``eval``; see ``configs/``) or a path to a config file,
then ``:`` and comma-separated variants. Configs are locked: an unknown key or an unparsable value fails while
the flags are parsed, and ``configs.common.validate`` / ``missing_paths`` check values and paths, all before any
work. ``--workdir`` (or ``--config.workdir``) names the run directory; by default a fresh ``runs/<name>-<time>``.
Re-running with the same ``--workdir`` resumes: finished stages are restored from their checkpoints, an
interrupted one continues from its last checkpoint (``kill -9`` included). SIGTERM saves a checkpoint and exits
with status 0. Re-running it with another config is refused before anything is written, listing the differing
keys (``medad_jax/rundir.py`` lists the fields that may change on resume; ``--config.resume=allow`` overrides).

Several hosts run this same command (WORKSPACE.md "Multi-host"): each process reads its rows of every global batch,
process 0 names the run directory and alone writes it (orbax's ``checkpoints/`` excepted), and SIGTERM on any
host stops every process after the same step. A served judge (``judge.backend=sglang|openai``) is checked before
any work -- health, served model, one tiny scoring request -- and a failure exits with status 3 and a message
naming the URL (``--config.judge.check=False`` skips it).

Run directory::

    <workdir>/
      config.json                 the resolved config
      metrics.jsonl, tb/          metrics of every stage (JSONL + TensorBoard events, no TensorFlow needed)
      checkpoints/sft/<step>/     orbax: trainable params, optimizer, step, RNG, data-iterator state, meta
      checkpoints/congrpo/<step>/
      eval/results.json, table.md Table 1 (accuracy per task, overall, format and consistency rates)
      export/                     the merged final policy as a Hugging Face directory (when export is on)
      summary.json                stage wall times, the final table, the data used / skipped by reason
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time

from absl import flags

log = logging.getLogger('medad_jax.launch')


class ConfigError(ValueError):
  """A bad command line (unknown key, bad value, missing path), raised before any work."""


def resolve_config_argv(argv: list[str]) -> list[str]:
  """``--config=congrpo:paper`` -> ``--config=/abs/configs/congrpo.py:paper`` (config_flags wants a path)."""
  from configs import common
  out = []
  for i, a in enumerate(argv):
    if a.startswith('--config=') and i > 0:
      out.append('--config=' + common.config_path(a[len('--config='):]))
    else:
      out.append(a)
  return out


def check_config(config) -> None:
  """Values and paths, before any work; raises ``ValueError`` naming every missing path and its flag."""
  from configs import common
  try:
    common.validate(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  missing = common.missing_paths(config)
  if missing:
    raise ConfigError('cannot start: ' + '; '.join(missing) + ' (set each with --config.<key>=...)')


# --------------------------------------------------------------------------------------------------- stages


def _policy_params(model) -> str:
  import jax
  from flax import nnx
  n = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return f'{n / 1e9:.1f}B' if n >= 1e8 else f'{n / 1e6:.1f}M'


def run_training(config, workdir: str) -> dict:
  """The ``sft`` / ``congrpo`` pipeline in ``workdir``; returns the summary written to ``summary.json``."""
  import jax

  from medad_jax import distributed
  from medad_jax.rl import update as U
  from medad_jax.train import congrpo, evaluate, pipeline as pl, sft, vision_warmup

  t0 = time.time()
  run = pl.setup(config, workdir)
  control = _image_control(run)
  run.timings['setup'] = time.time() - t0
  summary = {'workdir': workdir, 'config': config.name, 'devices': jax.device_count(),
             'platform': jax.devices()[0].platform, 'data': run.data.report}  # used / skipped by reason

  # ------------------------------------------------------------------------------------------------- SFT
  sft_res, sft_hf = None, None
  if config.sft.enabled:
    ckpt = config.sft.checkpoint
    if ckpt and not os.path.isdir(os.path.join(ckpt, 'checkpoints')):
      # an exported SFT policy (a Hugging Face directory): it is the RL starting point and the reference
      from medad_jax.model.checkpoint import load_checkpoint
      sft_hf, _ = load_checkpoint(ckpt, cfg=run.model_cfg)
    elif ckpt:
      sft_res = sft.restore_finished(run, ckpt)
    else:
      sft_res = sft.train(run)
      if sft_res.preempted:
        return {**summary, 'preempted': 'sft'}
  has_sft = sft_res is not None or sft_hf is not None
  # -------------------------------------------------------------------------------------------- Con-GRPO
  rl_res = None
  if config.stage == 'congrpo' and config.rl.enabled:
    if sft_res is not None:
      base = U.merge_model(sft_res.graphdef, sft_res.state)
    else:
      # no SFT stage: the base (the miniature's random model, its tower warmed up when vision_warmup.enabled; a
      # resumed run's checkpoint holds that warmed base, so the warm-up is not repeated)
      base = sft_hf if sft_hf is not None else vision_warmup.base_model(run, warm=not congrpo.resuming(run))
    rl_res = congrpo.train(run, base)
    if rl_res.preempted:
      return {**summary, 'preempted': 'congrpo'}

  # ------------------------------------------------------------------------------------------ evaluation
  if config.eval.enabled:
    t_eval = time.time()
    results, params = [], {}
    if rl_res is not None:
      final = U.merge_model(rl_res.graphdef, rl_res.state)
      weights = lambda: (rl_res.state.params, rl_res.state.frozen)  # noqa: E731
      judge = congrpo.make_judge(run, rl_res.graphdef, weights, adapters=False)
      bs = config.eval.batch_size
      if config.eval.include_sft and config.rl.trainable == 'lora' and has_sft:
        # pi_SFT is exactly the RL model with its adapters off (the SFT weights were merged into the base).
        gen = evaluate.flax_generator(run, final, greedy=config.eval.greedy, batch_size=bs, adapters=False)
        results.append(evaluate.run_eval(run, gen, judge, name='SFT'))
        params['SFT'] = _policy_params(final)
      name = 'SFT + Con-GRPO' if has_sft else 'Con-GRPO (RL-only)'
      gen = evaluate.flax_generator(run, final, greedy=config.eval.greedy, batch_size=bs)
      results += _eval_with_control(run, gen, judge, name, control)
      params[name] = _policy_params(final)
      judge.close()
    elif sft_res is not None:
      from flax import nnx
      model = U.merge_model(sft_res.graphdef, sft_res.state)
      gdef, st = nnx.split(model)
      judge = congrpo.make_judge(run, gdef, lambda: (st,), adapters=True)
      gen = evaluate.flax_generator(run, model, greedy=config.eval.greedy, batch_size=config.eval.batch_size)
      results += _eval_with_control(run, gen, judge, 'SFT', control)
      params['SFT'] = _policy_params(model)
      judge.close()
    if results:
      _add_prior(run, results, params)
      summary['table'] = evaluate.report_text(results, params)
      if distributed.is_main():   # process 0 writes the run directory (orbax's checkpoints/ excepted)
        evaluate.write_report(workdir, results, params)
    run.timings['eval'] = time.time() - t_eval
  if config.export and (rl_res or sft_res) is not None:
    from medad_jax.checkpointing import export_hf
    final_res = rl_res or sft_res
    final_state = _host_state(final_res.state)   # every process takes part in the gather
    path = os.path.join(workdir, 'export')
    if distributed.is_main():
      export_hf(final_res.graphdef, final_state, path)
      run.tokenizer.save_pretrained(path)  # the directory is then a complete baseline for --config=eval:hf
    summary['export'] = path
  run.logger.close()
  run.timings['total'] = time.time() - t0
  from medad_jax.rundir import keep_stage_times
  summary['seconds'] = keep_stage_times(workdir, {k: round(v, 1) for k, v in run.timings.items()})
  if distributed.is_main():
    pl.write_json(os.path.join(workdir, 'summary.json'), summary)
  log.info('done in %.1f s (%s); run directory %s', run.timings['total'],
           ', '.join(f'{k} {v:.0f}s' for k, v in run.timings.items() if k != 'total'), workdir)
  return summary


def _image_control(run):
  """The image-shuffled questions of ``eval.image_control`` (``evaluate.ImageShuffled``; None when off), built once
  after setup so that an evaluation over fewer than two images is refused before any training, not after it."""
  from medad_jax.train import evaluate
  if not (run.config.eval.enabled and run.config.eval.image_control):
    return None
  try:
    return evaluate.ImageShuffled(evaluate.eval_records(run), seed=run.config.seed)
  except ValueError as e:
    raise ConfigError(f'{e} (eval.max_examples={run.config.eval.max_examples}: evaluate more questions, or '
                      'set --config.eval.image_control=False)') from None


def _eval_with_control(run, gen, judge, name: str, control, preprocess=None) -> list:
  """The policy's evaluation and, with ``control`` (from :func:`_image_control`), the same policy on the same
  questions with every question's image swapped for another test image: the row that shows whether the answers
  come from the pixels (it should fall to the blind prior or below on the image-dependent tasks)."""
  from medad_jax.train import evaluate
  out = [evaluate.run_eval(run, gen, judge, name=name, preprocess=preprocess)]
  if control is not None:
    out.append(evaluate.run_eval(run, gen, judge, name=evaluate.control_name(name), preprocess=preprocess,
                                 records=control))
  return out


def _add_prior(run, results: list, params: dict) -> None:
  """Puts the blind baseline every trained row must beat besides chance (answer statistics of the training
  split, no image: ``evaluate.prior_baseline``) at the top of the table."""
  from medad_jax.train import evaluate
  results.insert(0, evaluate.prior_baseline(run.data.train, evaluate.eval_records(run)))
  params[evaluate.PRIOR_NAME] = '0'


def run_eval_stage(config, workdir: str) -> dict:
  """``--config=eval``: a finished run directory, a local HF checkpoint or an endpoint."""
  from medad_jax.train import evaluate, pipeline as pl, restore

  t0 = time.time()
  policy = config.eval.policy
  if policy == 'run':
    config = restore.training_config(workdir, config)
    run = pl.setup(config, workdir, config_name='eval_config.json')
  else:
    run = pl.setup(config, workdir)
  control = _image_control(run)
  if policy == 'endpoint':
    from medad_jax.judge import make_judge
    if config.judge.backend == 'local':
      raise ValueError("config.judge.backend='local' cannot judge an endpoint policy (no local weights); set "
                       "--config.judge.backend=sglang|openai|rule")
    judge = make_judge(pl.judge_config(config))
    gen = evaluate.endpoint_generator(run, url=config.eval.endpoint_url, model=config.eval.endpoint_model,
                                      greedy=config.eval.greedy, api_key_env=config.eval.endpoint_api_key_env)
    results = _eval_with_control(run, gen, judge, config.eval.endpoint_model, control,
                                 preprocess=evaluate.endpoint_preprocess)
    params = {}
  else:
    model, graphdef, weights, adapters_judge, name = restore.policy_for_eval(run)
    from medad_jax.train import congrpo
    judge = congrpo.make_judge(run, graphdef, weights, adapters=adapters_judge)
    gen = evaluate.flax_generator(run, model, greedy=config.eval.greedy, batch_size=config.eval.batch_size)
    results = _eval_with_control(run, gen, judge, name, control)
    params = {name: _policy_params(model)}
  judge.close()
  _add_prior(run, results, params)
  from medad_jax import distributed
  if distributed.is_main():
    evaluate.write_report(workdir, results, params)
  run.logger.close()
  return {'workdir': workdir, 'table': evaluate.report_text(results, params),
          'seconds': round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------------------- before any work


def check_judge(config) -> None:
  """A served judge (``sglang`` / ``openai``) is checked on every process before any data or model is built
  (``medad_jax.judge.remote.check_server``: health, served model, one tiny scoring request); a failure on any
  process stops all of them with its message (:class:`JudgeCheckError`). ``--config.judge.check=False`` skips it."""
  if 'judge' not in config or config.judge.backend not in ('sglang', 'openai') or not config.judge.check:
    return
  if config.stage == 'eval' and not config.eval.enabled:
    return
  from medad_jax import distributed
  from medad_jax.judge.base import JudgeCheckError
  from medad_jax.judge.remote import check_server
  from medad_jax.train import pipeline as pl
  error = ''
  try:
    check_server(pl.judge_config(config), timeout_s=config.judge.check_timeout_s)
  except JudgeCheckError as e:
    error = str(e)
  errors = [(i, e) for i, e in enumerate(distributed.allgather_objects(error)) if e]
  if errors:
    i, e = errors[0]
    raise JudgeCheckError(e if distributed.process_count() == 1 else f'process {i}: {e}')


def run_directory(config, workdir_flag: str | None) -> str:
  """The run directory, the same on every process: ``--workdir`` / ``config.workdir``, else a fresh
  ``runs/<name>-<time>`` named and created by process 0 and broadcast (it must be on a filesystem every host
  sees)."""
  from medad_jax import distributed
  from medad_jax.metrics import make_workdir
  from medad_jax import rundir
  if config.stage == 'eval' and config.eval.policy == 'run':
    return config.workdir  # evaluates that run; results go to <workdir>/eval
  given = workdir_flag or config.workdir
  try:  # a run directory holding another config is refused before anything is written (medad_jax/rundir.py)
    rundir.check(config, given)
  except rundir.RunDirError as e:
    raise ConfigError(str(e)) from None
  path = make_workdir(config.name, workdir=given) if distributed.is_main() else None
  path = distributed.broadcast_str(path)
  distributed.sync('run-directory')   # created before any process writes into it
  return path


def _host_state(state):
  """The policy's weights as host arrays on every process when several hold parts of them (an all-gather every
  process takes part in); the state itself for one process."""
  from medad_jax import distributed
  if distributed.process_count() == 1:
    return state
  return state.replace(params=distributed.gather(state.params), frozen=distributed.gather(state.frozen))


def _unknown_key(argv: list[str]) -> str | None:
  """The first ``--config.a.b=`` override whose key the config lacks, as a message listing the keys there."""
  from configs import common
  spec = next(a[len('--config='):] for a in argv[1:] if a.startswith('--config='))
  try:
    base = common.load(spec)
  except Exception:  # noqa: BLE001 -- the config itself is broken; the original error says how
    return None
  for a in argv[1:]:
    if not a.startswith('--config.'):
      continue
    path = a[len('--config.'):].split('=', 1)[0].split('.')
    if '.'.join(path) in common.REMOVED_KEYS:
      return f'--config.{".".join(path)}: {common.REMOVED_KEYS[".".join(path)]}'
    node = base
    for i, part in enumerate(path):
      if not hasattr(node, 'keys') or part not in node:
        where = '.'.join(path[:i]) or '<top level>'
        known = sorted(node.keys()) if hasattr(node, 'keys') else []
        return f'unknown config key --config.{".".join(path)}: {where} has no {part!r}; known: {known}'
      node = node[part]
  return None


def parse(argv: list[str]):
  """``argv`` (program name first) -> ``(config, workdir flag)``; a bad key, value or path raises ``ValueError``
  naming it, before any work."""
  from ml_collections import config_flags
  try:
    argv = resolve_config_argv(list(argv))
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from None
  if not any(a.startswith('--config=') for a in argv[1:]):
    raise ConfigError('missing --config=<name>[:variants] (e.g. --config=congrpo); see python -m medad_jax.launch '
                     '--help')
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'experiment config: a name in configs/ (e.g. congrpo:paper) or '
                                  'a path', flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string('workdir', None, 'run directory (default: config.workdir, else runs/<name>-<time>)',
                      flag_values=fv)
  try:
    rest = fv(argv)
  except (AttributeError, KeyError, ValueError, flags.Error) as e:  # unknown key, unparsable value, bad variant
    raise ConfigError(f'bad command line: {_unknown_key(argv) or e}') from e
  if len(rest) > 1:
    raise ConfigError(f'unexpected arguments {rest[1:]}; overrides are --config.<key>=<value>')
  config = fv.config
  check_config(config)
  return config, fv.workdir


def main(argv: list[str]) -> dict:
  """Parses ``argv`` and runs the stages the config names; returns the run summary."""
  config, workdir_flag = parse(argv)
  # Multi-host: starts jax.distributed on TPU pods / Slurm / MEDAD_COORDINATOR settings; a no-op for one process.
  # Must run before anything touches the JAX backend.
  from medad_jax import distributed
  distributed.initialize()
  check_judge(config)
  workdir = run_directory(config, workdir_flag)
  log.info('run directory: %s', workdir)
  if config.stage == 'eval':
    return run_eval_stage(config, workdir)
  return run_training(config, workdir)


# glibc's malloc serves every block above 32 MiB (its largest mmap threshold) from a fresh mmap, faulted in 4 KiB page
# by page, and XLA:CPU allocates its temporaries at every program call: the miniature's SFT step took ~42,000 minor
# page faults, and the default run spent ~13 % of its CPU time in the kernel (WORKSPACE.md "The embedded default
# run"). glibc >= 2.35's tunable below makes malloc advise transparent huge pages on those maps (2 MiB faults).
# Tunables are read only at process start, so the launcher re-executes itself once with it (same command line, same
# PID); MEDAD_JAX_HUGEPAGES=0, or GLIBC_TUNABLES already naming the tunable, leaves the process as it is. Chosen
# over an allocator swap (tcmalloc / jemalloc by LD_PRELOAD): those are system packages, not the project's pins.
HUGEPAGE_TUNABLE = 'glibc.malloc.hugetlb=1'


def huge_page_env(environ, libc: tuple[str, str]) -> dict | None:
  """-> the environment to re-execute with (``environ`` plus :data:`HUGEPAGE_TUNABLE` in ``GLIBC_TUNABLES``), or
  None to run as is; ``libc``: ``platform.libc_ver()``."""
  name, version = libc
  try:
    new_enough = name == 'glibc' and tuple(int(v) for v in version.split('.')[:2]) >= (2, 35)
  except ValueError:
    new_enough = False
  tunables = environ.get('GLIBC_TUNABLES', '')
  if (not new_enough or environ.get('MEDAD_JAX_HUGEPAGES', '1') == '0'
      or HUGEPAGE_TUNABLE.partition('=')[0] in tunables):
    return None
  return dict(environ, GLIBC_TUNABLES=':'.join(t for t in (tunables, HUGEPAGE_TUNABLE) if t))


def reexec_with_huge_pages() -> None:
  """Re-executes this process's command line with :func:`huge_page_env`'s environment where it gives one (the
  command-line entry points call it first: ``launch``, ``sweep``)."""
  env = huge_page_env(os.environ, platform.libc_ver()) if platform.system() == 'Linux' else None
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def log_malloc_tunables() -> None:
  log.info('malloc: GLIBC_TUNABLES=%r (the launcher adds %s on glibc >= 2.35 unless MEDAD_JAX_HUGEPAGES=0)',
           os.environ.get('GLIBC_TUNABLES', ''), HUGEPAGE_TUNABLE)


def cli():
  if any(a in ('-h', '--help', '--helpfull') for a in sys.argv[1:]):
    sys.stdout.write(__doc__)
    return
  reexec_with_huge_pages()
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname).1s %(name)s] %(message)s')
  log_malloc_tunables()
  # orbax / TFDS / grain report every step through absl at INFO; keep the progress line readable
  for noisy in ('absl', 'jax', 'orbax', 'tensorflow_datasets', 'etils', 'grain', 'httpx'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from medad_jax.data.schema import RecordError
  from medad_jax.judge.base import JudgeCheckError
  try:
    main(sys.argv)
  except (ConfigError, RecordError) as e:  # a bad command line or record: the message says it all, no traceback
    log.error('%s', e)
    sys.exit(2)
  except JudgeCheckError as e:  # the served judge is down, slow or serves another model: nothing was started
    log.error('%s', e)
    sys.exit(3)


if __name__ == '__main__':
  cli()
