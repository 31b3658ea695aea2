"""Metrics: lagged JSONL + TensorBoard (read back without TensorFlow), progress line, NaN guard, run dirs."""

import json
import logging
import os
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medad_jax import metrics as M


def test_lagged_writes_jsonl_and_tensorboard(tmp_path):
  lg = M.MetricsLogger(str(tmp_path), total_steps={'congrpo': 4})
  assert lg.log('congrpo', 1, {'loss': jnp.float32(0.5), 'kl': jnp.float32(0.01)}) is None
  # The current step is not pulled to the host yet: nothing is written.
  assert M.read_jsonl(str(tmp_path / 'metrics.jsonl')) == []
  written = lg.log('congrpo', 2, {'loss': jnp.float32(0.25), 'kl': jnp.float32(0.02)})
  assert written == {'loss': 0.5, 'kl': pytest.approx(0.01)}
  recs = M.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert [r['step'] for r in recs] == [1]
  lg.write_now('eval', 2, {'accuracy': np.float64(0.75)})   # flushes the queued step 2 first
  lg.close()
  recs = M.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert [(r['stage'], r['step']) for r in recs] == [('congrpo', 1), ('congrpo', 2), ('eval', 2)]
  assert recs[1]['loss'] == 0.25 and recs[2]['accuracy'] == 0.75
  tb = M.read_tensorboard_scalars(str(tmp_path / 'tb'))
  assert tb['congrpo/loss'] == [(1, 0.5), (2, 0.25)]
  assert [s for s, _ in tb['congrpo/kl']] == [1, 2] and tb['eval/accuracy'] == [(2, 0.75)]


def test_nan_guard_stops_with_a_clear_error_and_keeps_the_record(tmp_path):
  lg = M.MetricsLogger(str(tmp_path), tensorboard=False)
  lg.log('sft', 1, {'loss': jnp.float32(1.0)})
  lg.log('sft', 2, {'loss': jnp.float32(jnp.nan), 'grad_norm': jnp.float32(jnp.inf), 'nll': 1.0})
  with pytest.raises(M.NonFiniteMetricError, match=r'sft step 2: non-finite metrics grad_norm=inf, loss=nan'):
    lg.log('sft', 3, {'loss': jnp.float32(0.9)})
  recs = M.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert recs[-1]['step'] == 2 and np.isnan(recs[-1]['loss'])


def test_progress_line_has_stage_step_rewards_kl_rate_and_eta(tmp_path, caplog):
  line = M.progress_line('congrpo', 12, 40, {'reward_mean': 0.52, 'reward_fmt': 0.9, 'reward_acc': 0.4,
                                             'reward_con': 0.6, 'kl': 0.0031, 'other': 1.0}, rate=2.0)
  assert line == ('[congrpo] step 12/40 30% | reward 0.52 fmt 0.9 acc 0.4 con 0.6 kl 0.0031 | 2 it/s | '
                  'ETA 0:00:14')
  with caplog.at_level(logging.INFO, logger='medad_jax.metrics'):
    lg = M.MetricsLogger(str(tmp_path), total_steps={'sft': 10}, tensorboard=False)
    for s in range(1, 4):
      lg.log('sft', s, {'loss': jnp.float32(1.0 / s)})
    lg.close()
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('[sft]')]
  assert len(lines) == 3 and lines[0].startswith('[sft] step 1/10 10% | loss 1')
  assert re.search(r'it/s \| ETA \d+:\d\d:\d\d$', lines[-1])


def test_progress_rate_is_measured_over_a_window_of_steps(tmp_path, caplog, monkeypatch):
  # One step a second, but step 60 comes after a 10 s pause (a checkpoint) and step 61 right after it: the rate of
  # the last interval alone would read 0.1 it/s, then 100 it/s. The progress line reads the last RATE_WINDOW
  # intervals: one pause moves it a little, not tenfold.
  clock = {'t': 0.0}
  monkeypatch.setattr(M.time, 'time', lambda: clock['t'])
  with caplog.at_level(logging.INFO, logger='medad_jax.metrics'):
    lg = M.MetricsLogger(str(tmp_path), total_steps={'sft': 200}, tensorboard=False)
    for s in range(1, 101):
      clock['t'] += {60: 10.0, 61: 0.01}.get(s, 1.0)
      lg.log('sft', s, {'loss': jnp.float32(1.0)})
    lg.flush()
    clock['t'] += 1.0
    lg.log('sft', 1, {'loss': jnp.float32(1.0)})   # the stage starts again (a resumed run): the window restarts
    clock['t'] += 1.0
    lg.log('sft', 2, {'loss': jnp.float32(1.0)})
    lg.close()
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('[sft]')]
  rates = [float(re.search(r'\| ([\d.]+) it/s', x).group(1)) if 'it/s' in x else None for x in lines]
  assert rates[0] is None and len(rates) == 102
  assert all(0.8 <= r <= 1.0 for r in rates[1:100]), rates
  assert rates[58] == 1.0 and rates[59] < 0.9 and rates[60] < 0.9    # steps 60, 61 (the window holds the pause)
  assert rates[100] is None and rates[101] == 1.0                    # after the restart
  eta = re.search(r'ETA (\d+):(\d\d):(\d\d)$', lines[98]).groups()  # step 99 of 200: ~101 s left
  assert 95 <= int(eta[1]) * 60 + int(eta[2]) <= 126


def test_non_scalar_metric_is_refused(tmp_path):
  lg = M.MetricsLogger(str(tmp_path), tensorboard=False)
  lg.log('sft', 1, {'loss': jnp.zeros(3)})
  with pytest.raises(ValueError, match=r"metric 'loss' has shape \(3,\)"):
    lg.flush()


def test_workdir_and_config(tmp_path):
  a = M.make_workdir('congrpo', root=str(tmp_path))
  b = M.make_workdir('congrpo', root=str(tmp_path))
  assert a != b and os.path.isdir(a) and os.path.isdir(b)
  assert re.fullmatch(r'congrpo-\d{8}-\d{6}(-\d+)?', os.path.basename(a))
  assert M.make_workdir('x', root=str(tmp_path), workdir=str(tmp_path / 'given')) == str(tmp_path / 'given')
  cfg = ml_collections.ConfigDict({'rl': {'beta': 0.04, 'group_size': 8}, 'name': 'congrpo'})
  with open(M.save_config(a, cfg)) as f:
    assert json.load(f) == {'name': 'congrpo', 'rl': {'beta': 0.04, 'group_size': 8}}


def test_read_jsonl_names_the_bad_line(tmp_path):
  p = tmp_path / 'metrics.jsonl'
  p.write_text('{"step": 1}\n{oops\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl:2: not a JSON object'):
    M.read_jsonl(str(p))
