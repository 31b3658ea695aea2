"""``medad_jax.distributed`` in one process: how the settings are resolved (env vars, config, Slurm, TPU), clear
errors for bad settings, and the single-process behaviour of the data-shard and global-batch helpers. The real
two-process run is ``test_distributed_multiprocess.py``."""

import jax
import numpy as np
import pytest

from medad_jax import distributed as D
from medad_jax.rl import update as U
from medad_jax.sharding import make_mesh
from medad_jax.testing import multiprocess as mp

SLURM_4_NODES = {'SLURM_JOB_ID': '123456', 'SLURM_STEP_NODELIST': 'gpu[007-010]', 'SLURM_NTASKS': '4',
                 'SLURM_PROCID': '2', 'SLURM_LOCALID': '0', 'SLURM_STEP_NUM_NODES': '4'}


def plan(env, config=None, on_tpu=False):
  return D.plan(config, env=env, on_tpu=on_tpu)


# ----------------------------------------------------------------------------------------------- planning


def test_no_settings_is_a_single_process():
  assert plan({}) == D.Plan('single', None)
  assert plan({}, on_tpu=False, config={'mode': 'auto'}).kwargs is None


def test_env_vars_give_explicit_settings():
  p = plan({'MEDAD_COORDINATOR': '10.0.0.1:1234', 'MEDAD_NUM_PROCESSES': '4', 'MEDAD_PROCESS_ID': '3'})
  assert p.source == 'explicit'
  assert p.kwargs == {'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 3,
                      'cluster_detection_method': 'deactivate', 'initialization_timeout': 300}


def test_heartbeat_timeout_from_env_or_config():
  env = {'MEDAD_COORDINATOR': 'h:1', 'MEDAD_NUM_PROCESSES': '2', 'MEDAD_PROCESS_ID': '1',
         'MEDAD_HEARTBEAT_TIMEOUT_S': '900'}
  assert plan(env).kwargs['heartbeat_timeout_seconds'] == 900
  assert plan(env, config={'heartbeat_timeout_s': 60}).kwargs['heartbeat_timeout_seconds'] == 60
  with pytest.raises(ValueError, match='heartbeat timeout -1'):
    plan({**env, 'MEDAD_HEARTBEAT_TIMEOUT_S': '-1'})


def test_jax_coordinator_address_is_read_and_config_fields_win_over_env():
  env = {'JAX_COORDINATOR_ADDRESS': 'head:99', 'MEDAD_NUM_PROCESSES': '2', 'MEDAD_PROCESS_ID': '0'}
  assert plan(env).kwargs['coordinator_address'] == 'head:99'
  env['MEDAD_COORDINATOR'] = 'medad:1'   # MEDAD_* before JAX_*
  assert plan(env).kwargs['coordinator_address'] == 'medad:1'
  p = plan(env, D.DistributedConfig(coordinator_address='cfg:7', process_id=1, local_device_ids=(0, 1),
                                    initialization_timeout_s=30))
  assert p.kwargs == {'coordinator_address': 'cfg:7', 'num_processes': 2, 'process_id': 1,
                      'local_device_ids': [0, 1], 'cluster_detection_method': 'deactivate',
                      'initialization_timeout': 30}


def test_one_process_or_mode_off_does_not_initialize():
  env = {'MEDAD_COORDINATOR': 'h:1', 'MEDAD_NUM_PROCESSES': '1', 'MEDAD_PROCESS_ID': '0'}
  assert plan(env).source == 'single'
  assert plan({**SLURM_4_NODES, 'MEDAD_DISTRIBUTED': 'off'}).source == 'single'
  assert plan(SLURM_4_NODES, {'mode': 'off'}).source == 'single'


@pytest.mark.parametrize('env, match', [
    ({'MEDAD_NUM_PROCESSES': '2', 'MEDAD_PROCESS_ID': '0'}, r'missing coordinator address \(MEDAD_COORDINATOR\)'),
    ({'MEDAD_COORDINATOR': 'h:1', 'MEDAD_NUM_PROCESSES': '2'}, r'missing process id \(MEDAD_PROCESS_ID\)'),
    ({'MEDAD_COORDINATOR': 'h:1'}, 'MEDAD_COORDINATOR=.* is set but the number of processes'),
    ({'MEDAD_COORDINATOR': 'h:1', 'MEDAD_NUM_PROCESSES': 'two', 'MEDAD_PROCESS_ID': '0'},
     "MEDAD_NUM_PROCESSES='two': expected an integer"),
    ({'MEDAD_COORDINATOR': 'h:1', 'MEDAD_NUM_PROCESSES': '2', 'MEDAD_PROCESS_ID': '2'}, '0 <= process_id'),
    ({'MEDAD_COORDINATOR': 'no-port', 'MEDAD_NUM_PROCESSES': '2', 'MEDAD_PROCESS_ID': '0'},
     "MEDAD_COORDINATOR='no-port': expected host:port"),
    ({'MEDAD_DISTRIBUTED': 'maybe'}, r"MEDAD_DISTRIBUTED='maybe': expected one of"),
])
def test_bad_settings_fail_naming_the_setting(env, match):
  with pytest.raises(ValueError, match=match):
    plan(env)


def test_bad_config_fails_naming_the_key():
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['coordinator'\]"):
    plan({}, {'coordinator': 'h:1'})
  with pytest.raises(ValueError, match='DistributedConfig.mode'):
    D.DistributedConfig(mode='sometimes')
  with pytest.raises(ValueError, match='cpu_collectives'):
    D.DistributedConfig(cpu_collectives='nccl')


@pytest.mark.parametrize('nodelist, host', [
    ('node001', 'node001'), ('node001,host2', 'node001'), ('node[001-015],host2', 'node001'),
    ('node[007,009-015]', 'node007'), ('gpu[3]', 'gpu3')])
def test_first_slurm_host(nodelist, host):
  assert D.first_slurm_host(nodelist) == host


def test_slurm_one_task_per_node_keeps_all_local_devices():
  p = plan(SLURM_4_NODES)
  assert p.source == 'slurm'
  # JAX's port choice for the job; detection off so the task is not pinned to GPU SLURM_LOCALID.
  assert p.kwargs == {'coordinator_address': f'gpu007:{61440 + 123456 % 4096}', 'num_processes': 4, 'process_id': 2,
                      'cluster_detection_method': 'deactivate', 'initialization_timeout': 300}
  assert plan({**SLURM_4_NODES, 'MEDAD_COORDINATOR_PORT': '5000'}).kwargs['coordinator_address'] == 'gpu007:5000'


def test_slurm_one_task_per_gpu_and_single_task():
  per_gpu = {**SLURM_4_NODES, 'SLURM_NTASKS': '16'}   # 4 tasks on each of 4 nodes: JAX's own detection
  assert plan(per_gpu) == D.Plan('slurm', {'initialization_timeout': 300})
  assert plan({**SLURM_4_NODES, 'SLURM_NTASKS': '1'}).source == 'single'   # an interactive srun / sbatch shell


def test_tpu_and_forced_modes_leave_detection_to_jax():
  assert plan({}, on_tpu=True) == D.Plan('tpu', {'initialization_timeout': 300})
  assert plan({'MEDAD_DISTRIBUTED': 'on'}) == D.Plan('forced', {'initialization_timeout': 300})


# ------------------------------------------------------------------------------------------- initialize


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
  for k in list(D.os.environ):
    if k.startswith(('MEDAD_', 'SLURM_', 'JAX_COORDINATOR')):
      monkeypatch.delenv(k)
  monkeypatch.setattr(D, '_on_cloud_tpu', lambda: False)
  assert D.initialize() == D.Plan('single', None)
  assert not jax.distributed.is_initialized()
  assert (D.process_index(), D.process_count(), D.is_main()) == (0, 1, True)
  D.sync('single-process barrier')   # returns at once


def test_initialize_after_jax_started_fails_clearly():
  jax.devices()   # this test process's backend is up (as it would be after any computation)
  with pytest.raises(RuntimeError, match='must run before any JAX computation'):
    D.initialize({'coordinator_address': '127.0.0.1:1', 'num_processes': 2, 'process_id': 1})
  assert not jax.distributed.is_initialized()


# ------------------------------------------------------------------------------------ single-process data


def test_data_shard_and_batch_blocks_single_process():
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  assert D.data_shard() == (0, 1)
  assert D.data_shard(mesh) == (0, 1)
  assert D.batch_blocks(mesh) == (0, 4, 4)


def test_host_local_to_global_equals_put_batch_in_one_process():
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  batch = mp.prompt_batch(mp.tiny_cfg(), range(mp.P_GLOBAL))
  batch['odd_rows'] = np.arange(6, dtype=np.float32)   # 6 rows on 4 batch shards: replicated, as put_batch does
  got, want = D.host_local_to_global(batch, mesh), U.put_batch(batch, mesh)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.sharding.is_equivalent_to(w.sharding, g.ndim), (g.sharding, w.sharding)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  assert got['image_src_PT'].sharding.spec[0] == ('data', 'fsdp')   # not replicated: really per-row sharded
  assert got['prompt_positions_3PT'].sharding.spec[1] == ('data', 'fsdp')


def test_host_local_to_global_rejects_a_bad_batch_dim():
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  with pytest.raises(ValueError, match="batch key 'x': batch dimension 2 but the value has shape"):
    D.host_local_to_global({'x': np.zeros((4, 3))}, mesh, batch_dims={'x': 2})


def test_gather_returns_host_arrays():
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  x = D.host_local_to_global({'a': np.arange(8.0)}, mesh)['a']
  np.testing.assert_array_equal(D.gather({'a': x})['a'], np.arange(8.0))


def test_objects_sent_between_processes_carry_numpy_arrays_exactly():
  """``allgather_objects`` encodes with these hooks: arrays (any dtype, 0-d and empty too) come back equal."""
  import json
  obj = {'ids': np.arange(6, dtype=np.int32).reshape(2, 3), 'x': [np.float32(1.5), {'s': 'text'}],
         'img': np.random.default_rng(0).integers(0, 255, (4, 4, 3)).astype(np.uint8), 'e': np.zeros((0, 4), bool)}
  back = json.loads(json.dumps(obj, default=D._json_array), object_hook=D._array_from_json)
  for k in ('ids', 'img', 'e'):
    assert back[k].dtype == obj[k].dtype and back[k].shape == obj[k].shape
    np.testing.assert_array_equal(back[k], obj[k])
  assert back['x'][0].shape == () and back['x'][0] == np.float32(1.5) and back['x'][1] == {'s': 'text'}
  with pytest.raises(TypeError, match='cannot be sent to the other processes'):
    json.dumps({'f': object()}, default=D._json_array)
