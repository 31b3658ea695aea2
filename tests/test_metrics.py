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
