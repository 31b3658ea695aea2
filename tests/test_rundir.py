"""Run-directory integrity: a re-launch with another config is refused before anything is written (listing the
differing keys), resumable fields may change, ``--config.resume=allow`` is the explicit way through, and the config
fingerprint is in every checkpoint."""

import json
import os

import jax.numpy as jnp
import pytest

from configs import common
from medad_jax import launch, rundir
from medad_jax.checkpointing import Checkpointer
from medad_jax.metrics import save_config


def _cfg(*overrides):
  return common.load('congrpo', ['model.preset=tiny', *overrides])


def _snapshot(d):
  return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), 'rb').read()
          for r, _, fs in os.walk(d) for f in fs}


def test_fingerprint_ignores_resumable_fields_only():
  a = _cfg()
  assert rundir.fingerprint(a) == rundir.fingerprint(_cfg('eval.max_examples=7', 'log.every_steps=5', 'mesh.devices=2',
                                                          'judge.url=http://other:1', 'ckpt.keep=9'))
  for o in ('sft.optim.lr=0.5', 'model.preset=small', 'data.image_size=112', 'judge.backend=rule', 'seed=3'):
    assert rundir.fingerprint(a) != rundir.fingerprint(_cfg(o)), o
  diffs = rundir.differences(a, _cfg('sft.optim.lr=0.5', 'rl.beta=0.0', 'eval.max_examples=7'))
  assert [k for k, _, _ in diffs] == ['rl.beta', 'sft.optim.lr']


def test_relaunch_with_another_config_is_refused_before_anything_is_written(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  save_config(str(workdir), _cfg())
  (workdir / 'summary.json').write_text('{"seconds": {"sft": 12.0}}')
  before = _snapshot(workdir)
  with pytest.raises(launch.ConfigError) as e:
    launch.main(['launch', '--config=congrpo', f'--workdir={workdir}', '--config.model.preset=tiny',
                 '--config.sft.optim.lr=0.5'])
  msg = str(e.value)
  assert f'sft.optim.lr: {common.load("congrpo").sft.optim.lr} -> 0.5' in msg and '1 key(s) differ' in msg and '--config.resume=allow' in msg
  assert '\n' not in msg
  assert _snapshot(workdir) == before  # config.json and the summary untouched
  with pytest.raises(launch.ConfigError, match=r"model.preset: \"tiny\" -> \"mini\""):
    launch.main(['launch', '--config=congrpo', f'--workdir={workdir}'])
  assert _snapshot(workdir) == before


def test_resumable_changes_pass_and_allow_keeps_the_old_config(tmp_path):
  save_config(str(tmp_path), _cfg())
  rundir.check(_cfg('eval.max_examples=3', 'log.tensorboard=False'), str(tmp_path))  # a resume: fine
  rundir.check(_cfg(), str(tmp_path))
  old = (tmp_path / 'config.json').read_text()
  rundir.check(_cfg('sft.optim.lr=0.5', 'resume=allow'), str(tmp_path))
  assert (tmp_path / 'config.previous-1.json').read_text() == old and not (tmp_path / 'config.json').exists()
  with pytest.raises(ValueError, match="config.resume = 'maybe'"):
    _cfg('resume=maybe')


def test_checkpoints_carry_the_fingerprint_and_are_checked_without_config_json(tmp_path):
  from test_checkpointing import build
  _, state, _ = build()
  cfg = _cfg()
  ck = Checkpointer(str(tmp_path / 'checkpoints' / 'sft'), async_save=False,
                    meta_defaults={'config_fingerprint': rundir.fingerprint(cfg)})
  ck.save(1, state, meta={'stage': 'sft'})
  assert ck.restore(1, state)[2]['config_fingerprint'] == rundir.fingerprint(cfg)
  ck.close()
  rundir.check(cfg, str(tmp_path))  # no config.json, same fingerprint: a resume
  with pytest.raises(rundir.RunDirError, match='config fingerprint'):
    rundir.check(_cfg('rl.beta=0.5'), str(tmp_path))


def test_new_and_empty_directories_pass(tmp_path):
  rundir.check(_cfg(), str(tmp_path / 'absent'))
  rundir.check(_cfg(), str(tmp_path))
  rundir.check(_cfg(), None)
  assert not os.listdir(tmp_path)


def test_a_resumed_finished_run_keeps_its_stage_times(tmp_path):
  (tmp_path / 'summary.json').write_text(json.dumps({'seconds': {'setup': 3.0, 'sft': 398.0, 'congrpo': 66.0,
                                                                 'eval': 71.0, 'total': 539.0}}))
  got = rundir.keep_stage_times(str(tmp_path), {'setup': 2.0, 'eval': 70.0, 'total': 75.0})
  assert got == {'setup': 2.0, 'sft': 398.0, 'congrpo': 66.0, 'eval': 70.0, 'total': 75.0}
  assert rundir.keep_stage_times(str(tmp_path / 'none'), {'total': 1.0}) == {'total': 1.0}
