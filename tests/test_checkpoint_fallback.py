"""A damaged newest checkpoint (a truncated array file or ``_METADATA``) never ends a run: ``restore_latest`` falls
back to the newest step that restores, says which step failed and why, and keeps the damaged step on disk (renamed
aside when training writes that step number again)."""

import gc
import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medad_jax.checkpointing import Checkpointer
from test_checkpointing import build


def _train(tmp_path, steps=(2, 4, 6)):
  graphdef, state, step_fn = build()
  x, y = jnp.ones((4, 8)), jnp.zeros((4,))
  ck = Checkpointer(str(tmp_path / 'ck'), keep=3, async_save=False)
  states = {}
  for s in range(1, max(steps) + 1):
    state, _ = step_fn(state, x, y)
    states[s] = state
    if s in steps:
      ck.save(s, state, data_state={'next': s}, meta={'stage': 'sft'})
  ck.close()
  return states


def _truncate_arrays(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
           if os.path.isfile(f)]
  assert files
  for f in files:
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _truncate_metadata(step_dir):
  f = os.path.join(step_dir, 'state', '_METADATA')
  with open(f, 'r+b') as fh:
    fh.truncate(os.path.getsize(f) // 2)


def _same(a, b):
  for u, v in zip(jax.tree.leaves((a.params, a.opt_state, a.step)), jax.tree.leaves((b.params, b.opt_state, b.step))):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize('damage', [_truncate_arrays, _truncate_metadata], ids=['array_file', 'metadata'])
def test_falls_back_to_newest_clean_step_and_keeps_the_bad_one(tmp_path, caplog, damage):
  states = _train(tmp_path)
  damage(str(tmp_path / 'ck' / '6'))
  _, fresh, _ = build()
  ck = Checkpointer(str(tmp_path / 'ck'), keep=3, async_save=False)
  with caplog.at_level(logging.WARNING, logger='medad_jax.checkpointing'):
    got, data_state, meta = ck.restore_latest(fresh)
    gc.collect()  # orbax's abandoned sibling reads are reported by asyncio when collected: that must not dump either
  _same(got, states[4])
  assert data_state == {'next': 4}
  text = caplog.text
  assert 'step 6' in text and 'resumed from step 4' in text and 'kept on disk' in text
  assert max(len(r.getMessage()) for r in caplog.records) < 1200  # no 160-line TensorStore dump
  assert os.path.isdir(tmp_path / 'ck' / '6')  # never deleted
  # training reaches step 6 again: the damaged step is set aside, the new one written and restorable
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='medad_jax.checkpointing'):
    ck.save(6, states[6], data_state={'next': 6}, meta={'stage': 'sft'})
  ck.close()
  assert os.path.isdir(tmp_path / 'ck' / '6.unreadable-1') and 'kept as' in caplog.text
  ck = Checkpointer(str(tmp_path / 'ck'), keep=3, async_save=False)
  got, data_state, _ = ck.restore_latest(fresh)
  _same(got, states[6])
  assert data_state == {'next': 6} and ck.all_steps() == [2, 4, 6]
  ck.close()


def test_every_step_damaged_raises_one_clear_error(tmp_path):
  _train(tmp_path, steps=(2, 4))
  for s in (2, 4):
    _truncate_arrays(str(tmp_path / 'ck' / str(s)))
  _, fresh, _ = build()
  ck = Checkpointer(str(tmp_path / 'ck'), keep=3, async_save=False)
  with pytest.raises(ValueError, match=r'no checkpoint step restores: step 4: .*older step\(s\) \[2\] failed too'):
    ck.restore_latest(fresh)
  assert sorted(os.listdir(tmp_path / 'ck')) == ['2', '4']
  ck.close()


def test_frozen_base_mismatch_is_not_a_fallback(tmp_path):
  _train(tmp_path)
  _, fresh, _ = build()
  other = fresh.replace(frozen=jax.tree.map(lambda v: v + 1.0, fresh.frozen))
  ck = Checkpointer(str(tmp_path / 'ck'), keep=3, async_save=False)
  with pytest.raises(ValueError, match='frozen base weights differ'):
    ck.restore_latest(other)
  ck.close()


def test_a_saved_frozen_base_is_restored_whatever_was_rebuilt(tmp_path):
  """``save_frozen=True`` (a base no config rebuilds: the miniature's warmed-up tower) writes the frozen base
  into the step, and a restore puts it back over whatever base the caller built -- where the default refuses it."""
  graphdef, state, step_fn = build()
  trained_base = state.replace(frozen=jax.tree.map(lambda v: v * 3.0 + 1.0, state.frozen))
  trained_base, _ = step_fn(trained_base, jnp.ones((4, 8)), jnp.zeros((4,)))
  ck = Checkpointer(str(tmp_path / 'ck'), keep=3, async_save=False, save_frozen=True)
  ck.save(1, trained_base, meta={'stage': 'sft'})
  ck.close()
  _, rebuilt, _ = build()   # the base as a config rebuilds it: not the trained one
  assert not np.allclose(jax.tree.leaves(rebuilt.frozen)[0], jax.tree.leaves(trained_base.frozen)[0])
  ck = Checkpointer(str(tmp_path / 'ck'), keep=3, async_save=False)   # any reader: the step says what it holds
  got, _, meta = ck.restore_latest(rebuilt)
  ck.close()
  assert meta['frozen_saved'] is True
  for a, b in zip(jax.tree.leaves((got.frozen, got.params)), jax.tree.leaves((trained_base.frozen, trained_base.params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # without save_frozen the same rebuilt base is refused (test above): the flag is what makes the difference
  ck = Checkpointer(str(tmp_path / 'ck2'), keep=3, async_save=False)
  ck.save(1, trained_base, meta={'stage': 'sft'})
  with pytest.raises(ValueError, match='frozen base weights differ'):
    ck.restore_latest(rebuilt)
  ck.close()


def _abandoned_failed_read():
  """What orbax leaves behind when one read of a damaged step fails: a sibling task whose error nobody awaits."""
  import asyncio

  async def read():
    raise ValueError('OUT_OF_RANGE: Error reading "step/.zarray" ' + '{"driver": "zarr"} ' * 150)

  async def main():
    task = asyncio.get_running_loop().create_task(read())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    del task

  asyncio.run(main())


def test_abandoned_sibling_reads_of_a_failed_restore_do_not_dump_tensorstore_specs(caplog):
  from medad_jax.checkpointing import _quiet_sibling_reads
  with caplog.at_level(logging.ERROR, logger='asyncio'):
    _abandoned_failed_read()
    gc.collect()
  assert any('never retrieved' in r.getMessage() for r in caplog.records)  # asyncio does dump it, unfiltered
  caplog.clear()
  with caplog.at_level(logging.ERROR, logger='asyncio'):
    with _quiet_sibling_reads():
      _abandoned_failed_read()
    gc.collect()
  assert not caplog.records
