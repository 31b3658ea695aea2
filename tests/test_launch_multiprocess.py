"""The launcher itself as two JAX processes on localhost (2 fake CPU devices each) against one process with 4:
``python -m medad_jax.launch --config=congrpo`` with tiny overrides through SFT, Con-GRPO and evaluation.

* the metrics (every logged value but wall times) and the evaluation table agree within 1e-5;
* each process read its own half of every global batch of every stage, and together exactly what one process read
  (a question the epoch repeats can fall to both);
* only process 0 wrote into the run directory outside orbax's ``checkpoints/``;
* SIGTERM to process 1 alone mid-SFT stops both at the same step with one checkpoint (exit 0); the same command
  again resumes and ends where the uninterrupted two-process run did.

What each process read and wrote is recorded by ``medad_jax.testing.audit`` (a ``sitecustomize`` put first on
``PYTHONPATH``), so the launcher runs unchanged.
"""

import collections
import json
import os
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medad_jax.metrics import read_jsonl
from medad_jax.testing import audit, multiprocess as mp

pytestmark = pytest.mark.heavy  # ~15 min on 2 cores: python3 -m pytest -q -m heavy tests

TOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900   # one run of the tiny pipeline; normally a few minutes on 2 busy cores
# Global batches divide over 2 processes x 2 devices: SFT 4, Con-GRPO 4 prompts x G = 2, evaluation 4 (6
# questions: the second batch is padded).
TINY = ['model.preset=tiny', 'data.synth_images=20', 'data.image_size=56', 'data.read_threads=1',
        'sft.batch_size=4', 'sft.max_steps=6', 'sft.optim.warmup_steps=0',
        'rl.prompts_per_step=4', 'rl.group_size=2', 'rl.max_steps=2',
        'sampling.max_new_tokens=8', 'eval.max_new_tokens=8', 'eval.max_examples=6', 'eval.batch_size=4',
        'eval.include_sft=False', 'ckpt.every_steps=2', 'ckpt.async_save=False', 'log.tensorboard=True',
        'export=True']
# Wall times, and per-process bookkeeping (programs compiled by this process: a resumed process compiles anew).
TIMING_KEYS = {'time', 'sample_seconds', 'judge_seconds', 'device_seconds', 'overlap_frac', 'compiled_programs',
               'compiled_programs_sampler'}


def _launch(tmp, name, workdir, cache, *, processes, devices, extra=()):
  site = tmp / 'site'
  site.mkdir(exist_ok=True)
  (site / 'sitecustomize.py').write_text('from medad_jax.testing import audit\naudit.install()\n')
  logs = tmp / 'logs'
  logs.mkdir(exist_ok=True)
  argv = ['-m', 'medad_jax.launch', '--config=congrpo', f'--workdir={workdir}', f'--config.data.cache_dir={cache}',
          *[f'--config.{o}' for o in TINY], *extra]
  # well-formed decoding: the barely trained model's rollouts then earn rewards, so the Con-GRPO updates carry
  # signal (with all rewards 0 the gradients are float round-off, ~1e-9, and Adam's normalised update of them is
  # noise that no two layouts share) and the local judge really scores on the global mesh
  env = {'MEDAD_AUDIT_LOG': str(tmp / f'audit-{name}-{{i}}.jsonl'), 'MEDAD_AUDIT_ROOT': str(workdir),
         'MEDAD_AUDIT_WELL_FORMED': '1',
         'PYTHONPATH': str(site) + os.pathsep + ROOT}
  return mp.start(argv, processes=processes, devices=devices, log_dir=str(logs), tag=f'{name}-', env=env)


def _audit(tmp, name, i):
  return audit.read(str(tmp / f'audit-{name}-{i}.jsonl'))


def _restore_numpy(path):
  """A checkpoint written by several processes, read back in this one process as host arrays (the saved
  shardings name the writers' devices, so restore to numpy instead)."""
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  tree = getattr(meta, 'item_metadata', None) or getattr(meta, 'tree', None) or meta
  tree = getattr(tree, 'tree', tree)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                      is_leaf=lambda x: hasattr(x, 'shape') or x is None)
  return ckptr.restore(path, restore_args=args)


def _values(workdir):
  """{(stage, step): {metric: value}} from metrics.jsonl (a resumed step's last record)."""
  out = {}
  for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl')):
    out[(r['stage'], r['step'])] = {k: v for k, v in r.items() if k not in TIMING_KEYS | {'stage', 'step'}}
  return out


def _assert_same_run(got_dir, want_dir):
  got, want = _values(got_dir), _values(want_dir)
  assert sorted(got) == sorted(want) and len(want) >= 6 + 2 + 1
  for key in want:
    assert got[key].keys() == want[key].keys(), key
    for k, v in want[key].items():
      assert got[key][k] == pytest.approx(v, rel=TOL, abs=TOL), (key, k, got[key][k], v)
  res = [json.load(open(os.path.join(d, 'eval', 'results.json'))) for d in (got_dir, want_dir)]
  assert [p['name'] for p in res[0]['policies']] == [p['name'] for p in res[1]['policies']]
  for a, b in zip(res[0]['policies'], res[1]['policies']):
    assert a['num_questions'] == b['num_questions'] == 6
    for k, v in b['mean'].items():
      assert a['mean'][k] == pytest.approx(v, rel=TOL, abs=TOL, nan_ok=True), (a['name'], k)
  assert open(os.path.join(got_dir, 'eval', 'table.md')).read() == open(os.path.join(want_dir, 'eval',
                                                                                      'table.md')).read()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('launch_mp')
  cache = tmp / 'cache'
  two_dir, one_dir = tmp / 'two', tmp / 'one'
  # The dataset and tokenizer are built here once; then both runs, side by side, share the cache.
  from configs import common
  from medad_jax.train import pipeline as pl
  config = common.load('congrpo', [*TINY, f'data.cache_dir={cache}'])
  pl.build_tokenizer(config, pl.build_data(config))
  _one_and_two(tmp, '', cache)
  return tmp, cache, str(two_dir), str(one_dir)


def _one_and_two(tmp, prefix, cache, extra=()):
  """Launches ``<prefix>one`` (1 process, 4 devices) and ``<prefix>two`` (2 processes, 2 devices) side by side in
  ``tmp`` and waits for both."""
  one = _launch(tmp, f'{prefix}one', tmp / f'{prefix}one', cache, processes=1, devices=4, extra=extra)
  two = _launch(tmp, f'{prefix}two', tmp / f'{prefix}two', cache, processes=2, devices=2, extra=extra)
  try:
    mp.wait(one, TIMEOUT_S)
  except BaseException:
    for p, _ in two:
      p.kill()
    raise
  mp.wait(two, TIMEOUT_S)


def test_two_processes_equal_one_process_of_four_devices(runs):
  tmp, _, two_dir, one_dir = runs
  _assert_same_run(two_dir, one_dir)
  for i in range(2):
    log = open(tmp / 'logs' / f'two-{i}.log').read()
    assert f'process {i} of 2' in log and '4 global device(s)' in log


def test_each_process_reads_a_disjoint_half(runs):
  """Per stage, the first batches each process read (``data.read_threads=1``: in order; grain may read ahead
  past the last step): process p read rows ``[2p, 2p + 2)`` of every global batch of 4 the single process read."""
  tmp, _, _, _ = runs
  reads = {name: [[(e['stage'], e['id']) for e in _audit(tmp, name, i) if e['event'] == 'read'] for i in range(n)]
           for name, n in (('two', 2), ('one', 1))}
  for stage, batches in (('sft', 6), ('congrpo', 2), ('eval', 2)):
    one = [i for s, i in reads['one'][0] if s == stage][:4 * batches]
    two = [[i for s, i in reads['two'][p] if s == stage][:2 * batches] for p in range(2)]
    assert len(one) == 4 * batches and [len(t) for t in two] == [2 * batches] * 2, stage
    joined = [i for k in range(batches) for p in range(2) for i in two[p][2 * k:2 * k + 2]]
    assert joined == one, stage   # the same global batches, split between the processes
    # An id both processes read must be one the single process too read more than once in these batches: a
    # question the epoch repeats (the miniature's ``sft.task_repeats`` / ``rl.task_repeats``) or, in the
    # evaluation, the last question, whose copies pad its last batch (process 1 reads them; dropped).
    counts = collections.Counter(one)
    shared = set(two[0]) & set(two[1])
    assert all(counts[i] > 1 or (stage == 'eval' and i == one[-1]) for i in shared), (stage, shared, counts)


def test_only_process_zero_writes_the_run_directory(runs):
  tmp, _, two_dir, _ = runs
  writes = [{os.path.relpath(e['path'], two_dir) for e in _audit(tmp, 'two', i) if e['event'] == 'write'}
            for i in range(2)]
  outside = sorted(p for p in writes[1] if p != '.' and not p.startswith('checkpoints'))
  assert outside == [], outside
  for f in ('config.json', 'metrics.jsonl', 'summary.json', 'eval/results.json', 'eval/table.md',
            'export/config.json'):
    assert f in writes[0] or any(w.startswith(f) for w in writes[0]), f
  assert any(w.startswith('tb') for w in writes[0])
  assert sorted(os.listdir(os.path.join(two_dir, 'checkpoints'))) == ['congrpo', 'sft']


def test_sigterm_on_one_process_stops_both_then_resume_equals_uninterrupted(runs):
  """SFT only (``rl.enabled=False``, no evaluation), compared with the warm-up and SFT stages of the uninterrupted
  run."""
  tmp, cache, two_dir, _ = runs
  workdir = tmp / 'preempted'
  sft_only = ['--config.rl.enabled=False', '--config.eval.enabled=False', '--config.export=False']
  procs = _launch(tmp, 'pre', workdir, cache, processes=2, devices=2, extra=sft_only)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while not (metrics.exists() and any(r['stage'] == 'sft' for r in read_jsonl(str(metrics)))):
      assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), 'no SFT step logged'
      time.sleep(0.05)
    procs[1][0].send_signal(signal.SIGTERM)   # one host is preempted
  except BaseException:
    for p, _ in procs:
      p.kill()
    raise
  assert mp.wait(procs, TIMEOUT_S) == [0, 0]
  steps = sorted(int(s) for s in os.listdir(workdir / 'checkpoints' / 'sft'))
  assert steps and steps[-1] < 6, steps   # stopped mid-SFT, with a checkpoint of the stop step
  for i in range(2):
    assert f'sft: stopped by SIGTERM at step {steps[-1]}' in open(tmp / 'logs' / f'pre-{i}.log').read()
  mp.wait(_launch(tmp, 'resume', workdir, cache, processes=2, devices=2, extra=sft_only), TIMEOUT_S)
  got, want = _values(str(workdir)), _values(two_dir)
  # the vision warm-up (the miniature's stage 0) ran once, before the stop; the resume starts from the checkpoint
  trained = sorted(k for k in want if k[0] in ('vision_warmup', 'sft'))
  assert sorted(got) == trained and sum(k[0] == 'sft' for k in trained) == 6
  for key in trained:
    for k, v in want[key].items():
      assert got[key][k] == pytest.approx(v, rel=TOL, abs=TOL), (key, k)
  final = [_flat(_restore_numpy(os.path.join(d, 'checkpoints', 'sft', '6', 'state')))
           for d in (str(workdir), two_dir)]
  assert final[0].keys() == final[1].keys() and len(final[0]) > 10
  for k, v in final[1].items():
    np.testing.assert_allclose(final[0][k], v, rtol=0, atol=TOL, err_msg=k)


def _flat(tree, prefix=''):
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_flat(v, f'{prefix}/{k}'))
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      out.update(_flat(v, f'{prefix}/{i}'))
  elif tree is not None:
    out[prefix] = np.asarray(tree)
  return out


DAPO = ['--config.rl.dynamic_sampling=True', '--config.rl.dynamic_sampling_max_draws=3']


@pytest.fixture(scope='module')
def dapo_runs(runs):
  """The same tiny launch with DAPO dynamic sampling: two processes of 2 devices and one of 4."""
  tmp, cache, _, _ = runs
  _one_and_two(tmp, 'dapo-', cache, DAPO)
  return str(tmp / 'dapo-two'), str(tmp / 'dapo-one')


def test_dynamic_sampling_across_processes_equals_one_process(dapo_runs):
  """The keep / refill decision is global (every shard's groups all-gathered) and each process assembles its
  shard of the kept batch wherever a group was drawn: two processes equal one, counts and metrics included."""
  two_dir, one_dir = dapo_runs
  _assert_same_run(two_dir, one_dir)
  recs = [v for (stage, _), v in sorted(_values(one_dir).items()) if stage == 'congrpo']
  assert recs and all(r['dyn_drawn'] == 4 + r['dyn_dropped'] + r['dyn_surplus'] for r in recs)
  # the refill path ran: some step drew more than one batch
  assert max(r['dyn_draws'] for r in recs) > 1, [r['dyn_draws'] for r in recs]
