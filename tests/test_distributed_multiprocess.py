"""Two real JAX processes on localhost (CPU, gloo collectives) train the tiny Con-GRPO problem for 3 jitted updates
on a data=2 x fsdp=2 mesh, each feeding only its own prompts, save one orbax checkpoint together and restore it;
the result equals the single-process run on a 4-device sub-mesh of this process's 8 fake devices.

The workers are ``python -m medad_jax.testing.multiprocess`` (2 CPU devices each); the reference is computed here
while they run. Children are killed on failure or timeout and their log tails are shown.
"""

import json
import time

import jax
import numpy as np
import pytest

from medad_jax.testing import multiprocess as mp

TOL = 1e-5          # multi-process vs single-process (the tolerance; same mesh, same program)
DEADLINE_S = 600    # whole run of both workers; well under a minute on a quiet machine, minutes on a busy one


def _start_workers(tmp_path, n: int = 2):
  return mp.start(['-m', 'medad_jax.testing.multiprocess', '--out', str(tmp_path / 'out'), '--ckpt',
                   str(tmp_path / 'ckpt')], processes=n, devices=2, log_dir=str(tmp_path), tag='worker_')


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('multiprocess')
  start = time.monotonic()
  procs = _start_workers(tmp)
  try:
    # The single-process reference, computed here while the workers run: same mesh shape on 4 of the 8 devices,
    # the global batch put on it by the ordinary single-host path.
    from medad_jax.rl import update as U
    from medad_jax.sharding import make_mesh
    mesh = make_mesh(**mp.MESH, devices=jax.devices()[:4])
    batch = mp.prompt_batch(mp.tiny_cfg(), range(mp.P_GLOBAL))
    _, state, metrics = mp.run(mesh, U.put_batch(batch, mesh))
    _, init, _, _ = mp.build_state(mesh)
    ref = {'metrics': metrics, 'params': mp.flat_params(jax.device_get(state.params)),
           'init': mp.flat_params(jax.device_get(init.params)), 'batch': batch}
  except BaseException:
    for p, _ in procs:
      p.kill()
      p.wait(10)
    raise
  mp.wait(procs, DEADLINE_S - (time.monotonic() - start))
  results = []
  for i in range(len(procs)):
    with np.load(tmp / 'out' / f'result_{i}.npz') as r:
      results.append({'info': json.loads(str(r['info'])),
                      'trained': {k[len('trained/'):]: r[k] for k in r.files if k.startswith('trained/')},
                      'restored': {k[len('restored/'):]: r[k] for k in r.files if k.startswith('restored/')}})
  return results, ref, time.monotonic() - start


def test_two_processes_see_one_4_device_runtime(two_process_run):
  results, _, _ = two_process_run
  for i, r in enumerate(results):
    info = r['info']
    assert info['plan'] == 'explicit'
    assert (info['process_index'], info['process_count'], info['is_main']) == (i, 2, i == 0)
    assert (info['local_devices'], info['global_devices']) == (2, 4)
    assert info['data_shard'] == [i, 2]       # the data axis runs over the processes in order
    assert info['sharded_param_leaves'] > 0   # fsdp really splits the adapters


def test_two_process_updates_equal_single_process(two_process_run):
  results, ref, _ = two_process_run
  b = ref['batch']
  for r in results:
    got = r['info']['metrics']
    assert len(got) == len(ref['metrics']) == mp.STEPS
    for step, (m, m_ref) in enumerate(zip(got, ref['metrics'])):
      assert set(m) == set(m_ref)
      for k in m_ref:
        assert np.isfinite(m[k]), (step, k)
        assert m[k] == pytest.approx(m_ref[k], rel=TOL, abs=TOL), (step, k, m[k], m_ref[k])
      # The global batch holds both processes' rows (a duplicated or missing shard changes these).
      assert m['reward_mean'] == pytest.approx(float(np.mean(b['rewards_B'])), abs=1e-6)
      assert m['completion_tokens'] == float(b['completion_mask_BN'].sum())
      assert m['zero_var_groups'] == 1
    assert set(r['trained']) == set(ref['params'])
    moved = max(float(np.max(np.abs(ref['params'][k] - ref['init'][k]))) for k in ref['params'])
    assert moved > 1e-3   # three AdamW steps at lr 1e-2 move the adapters: the comparison is not of initial values
    for k, v in ref['params'].items():
      np.testing.assert_allclose(r['trained'][k], v, rtol=0, atol=TOL, err_msg=k)
  for k in results[0]['trained']:   # both processes hold the same global parameters
    np.testing.assert_array_equal(results[0]['trained'][k], results[1]['trained'][k], err_msg=k)


def test_multiprocess_checkpoint_round_trip(two_process_run):
  results, _, _ = two_process_run
  for r in results:
    info = r['info']
    assert info['restored_step'] == mp.STEPS
    assert info['data_state'] == {'batches': mp.STEPS} and info['meta_process_count'] == 2
    assert set(r['restored']) == set(r['trained'])
    for k, v in r['trained'].items():
      np.testing.assert_array_equal(r['restored'][k], v, err_msg=k)   # bitwise: orbax stores float32 exactly
