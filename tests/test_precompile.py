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
