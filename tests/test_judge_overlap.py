"""With an HTTP judge the device computes the reference log-probs while the judge scores the rollouts: against a
slow fake SGLang judge the metrics show a non-zero overlap fraction, and the rewards and updates equal those of
the loop that runs the two one after the other (``--config.judge.overlap=False``, the reference pass inside the
update)."""

import os

import pytest

from medad_jax import launch
from medad_jax.testing.fake_server import FakeSGLangServer
from medad_jax.metrics import read_jsonl
from medad_jax.testing.audit import well_formed
from medad_jax.train import pipeline as pl

TOL = 1e-5
# Con-GRPO only (rl_only: from the randomly initialised tiny model), 2 steps of 2 prompts x G = 2, one device.
TINY = ['model.preset=tiny', 'data.synth_images=20', 'data.image_size=56', 'data.read_threads=1',
        'rl.prompts_per_step=2', 'rl.group_size=2', 'rl.max_steps=2', 'sampling.max_new_tokens=8',
        'eval.enabled=False', 'ckpt.async_save=False', 'mesh.devices=1', 'log.tensorboard=False']


def _run(tmp_path, cache, server, name, overlap):
  workdir = str(tmp_path / name)
  launch.main(['launch', '--config=congrpo:rl_only', f'--workdir={workdir}', f'--config.data.cache_dir={cache}',
               '--config.judge.backend=sglang', f'--config.judge.url={server.url}',
               f'--config.judge.overlap={overlap}', *[f'--config.{o}' for o in TINY]])
  return [r for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if r['stage'] == 'congrpo']


@pytest.mark.heavy
def test_overlapped_reference_pass_equals_the_sequential_loop(tmp_path, monkeypatch):
  # the untrained model's rollouts made well formed, so that they earn rewards and reach the judge
  monkeypatch.setattr(pl, 'decode_completions', well_formed(pl.decode_completions))
  cache = str(tmp_path / 'cache')
  with FakeSGLangServer(delay_s=1.0) as server:   # every judge request takes a second
    seq = _run(tmp_path, cache, server, 'sequential', False)
    n_seq = len([s for s in server.seen if s.path == '/generate'])
    ovl = _run(tmp_path, cache, server, 'overlapped', True)
  assert len(seq) == len(ovl) == 2
  assert n_seq >= 3   # the startup probe and a real judge call per step
  for a, b in zip(ovl, seq):
    assert a['judged_frac'] > 0 and a['judge_seconds'] >= 1.0
    # overlapped: the reference pass ran while the judge was busy; sequential: one after the other
    assert 0 < a['overlap_frac'] <= 1 and a['device_seconds'] > 0
    assert b['overlap_frac'] == 0 and 'device_seconds' not in b
    for k in ('reward_fmt', 'reward_acc', 'reward_con', 'reward_mean', 'judged_frac', 'group_reward_std'):
      assert a[k] == b[k], (a['step'], k)
    for k in ('loss', 'kl', 'grad_norm', 'update_norm', 'ratio_mean', 'entropy'):
      assert a[k] == pytest.approx(b[k], rel=TOL, abs=TOL), (a['step'], k, a[k], b[k])
