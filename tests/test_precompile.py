"""Compiling ahead (``medad_jax/train/precompile.py``): a program compiled on the background thread is the one the
later call runs (no second compilation), and SFT, whose step programs compile while the vision warm-up runs, trains
exactly the weights it trains without it."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from medad_jax.train import precompile

_EVENTS: list[tuple[str, str]] = []   # (thread name, program) of every XLA compilation in this process


def _listen(event, secs, **kw):
  if event == '/jax/core/compile/backend_compile_duration':
    _EVENTS.append((threading.current_thread().name, kw.get('fun_name', '')))


monitoring.register_event_duration_secs_listener(_listen)


def _compiles(program: str) -> list[str]:
  return [t for t, f in _EVENTS if f == program]


def test_a_program_compiled_ahead_is_not_compiled_again():
  @jax.jit
  def ahead_fn(x, w):
    return jnp.tanh(x @ w).sum(0)

  x, w = jnp.ones((8, 16)), np.ones((16, 4), np.float32)   # a device array and a host array
  _EVENTS.clear()
  pre = precompile.Precompiler('test')
  pre.submit('f', ahead_fn.lower, precompile.abstract(x), precompile.abstract(w))
  done = pre.join()
  assert list(done) == ['f'] and done['f'] > 0
  assert [t.startswith('precompile-test') for t in _compiles('jit(ahead_fn)')] == [True]
  np.testing.assert_allclose(ahead_fn(x, w), np.tanh(np.ones((8, 16)) @ w).sum(0), rtol=1e-6)
  assert len(_compiles('jit(ahead_fn)')) == 1   # the call found the program compiled ahead


def test_a_failed_compilation_ahead_is_logged_and_left_to_the_caller(caplog):
  def bad(*_):
    raise TypeError('no such shape')

  pre = precompile.Precompiler('test')
  pre.submit('bad', bad)
  assert pre.join() == {}
  assert 'compiling bad ahead failed (TypeError: no such shape)' in caplog.text


def test_likely_buckets_by_hand():
  """7 examples of 10 tokens and one of 20, buckets 16 / 32, batches of 2: a batch's longest example is at most 16
  tokens with probability (7/8)^2 = 0.766, so 4 batches are expected to put 0.94 < 1 into the 32 bucket, 5 put
  1.17."""
  from medad_jax.train.sft import likely_buckets
  lengths = [10] * 7 + [20]
  assert likely_buckets(lengths, (16, 32), 2, 4) == [16]
  assert likely_buckets(lengths, (16, 32), 2, 5) == [16, 32]
  assert likely_buckets(lengths, (16, 32), 1, 8) == [16, 32]   # one example a batch: its own bucket
  assert likely_buckets(lengths, (16, 32, 64), 2, 1000) == [16, 32]   # no example reaches 64


def _sft(tmp_path, name: str, ahead: bool):
  from medad_jax.testing.configs import tiny_miniature
  from medad_jax.train import pipeline as pl, sft
  config = tiny_miniature(str(tmp_path / 'cache'), images=20)
  config.vision_warmup.epochs = 2
  config.vision_warmup.then_epochs = 1
  config.sft.max_steps = 12
  config.sft.batch_size = 4
  config.sft.compile_ahead = ahead
  config.sft.length_buckets = '112,160'   # the examples are 76-141 tokens: two programs
  run = pl.setup(config, str(tmp_path / name))
  _EVENTS.clear()
  state = sft.train(run).state
  threads = _compiles('jit(counted)')
  run.logger.close()
  return jax.device_get(state.params), threads


def test_sft_compiles_its_steps_during_the_warm_up_and_trains_the_same_weights(tmp_path):
  params_ahead, threads_ahead = _sft(tmp_path, 'ahead', True)
  params, threads = _sft(tmp_path, 'plain', False)
  assert threads and all(t == 'MainThread' for t in threads)   # compiled by the loop as its buckets come
  # ahead: both buckets' programs compiled on the background thread, none by the loop
  assert len(threads_ahead) == 2 and all(t.startswith('precompile-sft') for t in threads_ahead)
  for a, b in zip(jax.tree.leaves(params_ahead), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)


if __name__ == '__main__':
  pytest.main([__file__])


def test_con_grpo_compiles_each_program_once(tmp_path, monkeypatch):
  """Con-GRPO from a finished SFT run (``--config.sft.checkpoint``): its rollout sampler and update each compile one
  program for all its steps. The RL state is placed on the device at once; before, the restored weights were and
  the fresh adapters were not, and every program compiled again for the second step, once the update's outputs
  were all placed."""
  from medad_jax import launch
  from medad_jax.train import congrpo
  real, seen = congrpo.train, {}

  def recording(*a, **k):
    _EVENTS.clear()
    out = real(*a, **k)
    seen.update({p: len(_compiles(p)) for p in ('jit(counted)', 'jit(prefill)', 'jit(decode)')})
    return out

  monkeypatch.setattr(congrpo, 'train', recording)
  tiny = ['model.preset=tiny', 'data.synth_images=20', 'data.image_size=56', 'data.read_threads=1',
          'vision_warmup.enabled=False', 'sft.max_steps=2', 'rl.prompts_per_step=2', 'rl.group_size=2',
          'rl.max_steps=3', 'sampling.max_new_tokens=8', 'eval.enabled=False', 'ckpt.async_save=False',
          'mesh.devices=1', 'log.tensorboard=False']
  common = [f'--config.data.cache_dir={tmp_path / "cache"}', *[f'--config.{o}' for o in tiny]]
  launch.main(['launch', '--config=congrpo:sft_only', f'--workdir={tmp_path / "sft"}', *common])
  launch.main(['launch', '--config=congrpo', f'--workdir={tmp_path / "rl"}',
               f'--config.sft.checkpoint={tmp_path / "sft"}', *common])
  assert seen == {'jit(counted)': 1, 'jit(prefill)': 1, 'jit(decode)': 1}
