r"""Multi-host (multi-process) JAX: start the distributed runtime, shard the input per process, build global batches.

JAX runs one Python process per host (or per accelerator); every process runs the *same* program, sees its own
local devices and all global devices, and feeds only its own part of each batch. :func:`initialize` must run
before anything touches a device (the launcher calls it first thing); it is a no-op for a single process, so the
same command works on a laptop, one GPU box, a TPU pod or a Slurm cluster.

How to run on several hosts (``python -m medad_jax.launch ...`` is the same command on every host)
---------------------------------------------------------------------------------------------------
* **Cloud TPU pod slice**: run the identical command on all workers, e.g.
  ``gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd medad && python -m medad_jax.launch ..."``.
  JAX finds the coordinator, the process count and this worker's id from the TPU metadata (GCE) or the
  ``TPU_WORKER_HOSTNAMES`` / ``TPU_WORKER_ID`` variables (GKE); nothing to set.
* **Slurm**: one task per node, all the node's GPUs visible to it::

      srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 python -m medad_jax.launch --config=congrpo:paper ...

  The coordinator is the first host of ``SLURM_STEP_NODELIST`` on port ``61440 + SLURM_JOB_ID % 4096`` (JAX's
  choice; override with ``MEDAD_COORDINATOR_PORT``), the process id is ``SLURM_PROCID``. One task per GPU
  (``--ntasks-per-node=8``) also works: JAX's own Slurm detection then gives each task the GPU ``SLURM_LOCALID``.
* **Anything else (manual)**: set on every host, then run the command::

      MEDAD_COORDINATOR=10.0.0.1:1234   # host:port of process 0 (JAX_COORDINATOR_ADDRESS is read too)
      MEDAD_NUM_PROCESSES=2
      MEDAD_PROCESS_ID=0                # 0 on the coordinator host, 1 on the other

  or pass the same values as :class:`DistributedConfig` fields. ``JAX_LOCAL_DEVICE_IDS`` (read by JAX) restricts a
  process to some local GPUs. ``MEDAD_DISTRIBUTED=off`` forces a single process; ``=on`` calls
  ``jax.distributed.initialize()`` even where no known environment is detected (e.g. Open MPI, Kubernetes
  indexed jobs, which JAX detects itself).

Precedence: :class:`DistributedConfig` fields > ``MEDAD_*`` variables > ``JAX_COORDINATOR_ADDRESS`` > Slurm / TPU
detection. On CPU the cross-process collectives use gloo (``jax_cpu_collectives_implementation``; TCP through the
coordinator's key-value store), so the multi-process path runs, and is tested, on one CPU machine.

Per-process data
----------------
Every process loads only its part of the global batch: :func:`process_dataset` reads this process's rows of every
*global* batch (shuffled as one sequence, so the batches do not depend on the process count), with
:func:`data_shard` giving the ``(shard_index, shard_count)`` (= ``(process_index, process_count)`` when the mesh's
batch axes run over processes in order, the usual case), and :func:`host_local_to_global` turns the per-process
batches into global ``jax.Array`` s sharded exactly as :func:`medad_jax.rl.state.batch_shardings` expects, so the
jitted steps take them without a reshard. Processes that hold the same batch rows (a mesh whose ``tensor`` axis
spans hosts) get the same shard index and load the same data.

Agreeing across processes: :func:`agree_max` (shapes every process must share), :func:`any_process` (a SIGTERM
seen by one), :func:`broadcast_str` (process 0's run directory), :func:`allgather_objects` /
:func:`gather_shards` (host values such as texts and per-row scores), :func:`local_rows` (this process's rows of a
device array). ``medad_jax/train/feed.py`` uses them to feed the trainers; orbax's JSON items are written by
process 0, so the trainers store every process's data-iterator state in them.
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import importlib.util
import json
import logging
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MODES = ('auto', 'on', 'off')
CPU_COLLECTIVES = ('gloo', 'mpi')
ENV_COORDINATOR = 'MEDAD_COORDINATOR'
ENV_NUM_PROCESSES = 'MEDAD_NUM_PROCESSES'
ENV_PROCESS_ID = 'MEDAD_PROCESS_ID'
ENV_MODE = 'MEDAD_DISTRIBUTED'
ENV_PORT = 'MEDAD_COORDINATOR_PORT'
ENV_HEARTBEAT = 'MEDAD_HEARTBEAT_TIMEOUT_S'
_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
# Sampler-layout index keys: values >= 0 are rows of the flattened per-image features of *this batch*; a process's
# rows must be shifted by the features held by the processes before it (see host_local_to_global).
_IMAGE_INDEX_KEYS, _IMAGE_META_KEY = ('image_src_PT', 'image_src_BT'), 'vision_meta_I'


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Explicit multi-process settings; every field left None falls back to the environment (module docstring).

  Attributes:
    mode: ``'auto'`` (initialise when settings or a known cluster say there are several processes), ``'on'``
      (always call ``jax.distributed.initialize``), ``'off'`` (single process, never initialise).
    coordinator_address: ``host:port`` of process 0.
    num_processes / process_id: the process count and this process's id (``0 .. num_processes - 1``).
    local_device_ids: restrict this process to these local accelerators (GPU ids).
    initialization_timeout_s: how long to wait for every process to connect.
    heartbeat_timeout_s: a process silent this long is declared dead and every process stops (JAX's default
      100 s; ``MEDAD_HEARTBEAT_TIMEOUT_S`` when unset here). Raise it where hosts can stall longer (e.g. a busy
      or paused VM).
    cpu_collectives: cross-process collectives on CPU: ``'gloo'`` or ``'mpi'``.
  """

  mode: str | None = None
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  initialization_timeout_s: int = 300
  heartbeat_timeout_s: int | None = None
  cpu_collectives: str = 'gloo'

  def __post_init__(self):
    if self.mode is not None and self.mode not in MODES:
      raise ValueError(f'DistributedConfig.mode={self.mode!r}: expected one of {MODES}')
    if self.cpu_collectives not in CPU_COLLECTIVES:
      raise ValueError(f'DistributedConfig.cpu_collectives={self.cpu_collectives!r}: expected one of '
                       f'{CPU_COLLECTIVES}')
    if self.initialization_timeout_s <= 0:
      raise ValueError(f'DistributedConfig.initialization_timeout_s={self.initialization_timeout_s}: expected > 0')

  @classmethod
  def from_any(cls, config: 'DistributedConfig | Mapping | None') -> 'DistributedConfig':
    """A DistributedConfig from itself, None, or a mapping / ``ConfigDict`` of its fields (unknown keys fail)."""
    if config is None:
      return cls()
    if isinstance(config, cls):
      return config
    items = dict(config.items()) if hasattr(config, 'items') else None
    if items is None:
      raise TypeError(f'distributed config: expected DistributedConfig, a mapping or None, got {type(config)}')
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(items) - known)
    if bad:
      raise ValueError(f'distributed config: unknown key(s) {bad}; known keys: {sorted(known)}')
    if items.get('local_device_ids') is not None:
      items['local_device_ids'] = tuple(int(i) for i in items['local_device_ids'])
    return cls(**items)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What :func:`initialize` will do: ``kwargs`` for ``jax.distributed.initialize`` or None (single process)."""

  source: str                     # 'single', 'explicit', 'slurm', 'tpu', 'forced'
  kwargs: dict | None


# ------------------------------------------------------------------------------------------------- planning


def _env_int(env: Mapping[str, str], name: str) -> int | None:
  raw = env.get(name)
  if raw is None or raw.strip() == '':
    return None
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f'environment variable {name}={raw!r}: expected an integer') from None


def _timeouts(env: Mapping[str, str], cfg: 'DistributedConfig') -> dict[str, Any]:
  kw: dict[str, Any] = {'initialization_timeout': cfg.initialization_timeout_s}
  beat = cfg.heartbeat_timeout_s if cfg.heartbeat_timeout_s is not None else _env_int(env, ENV_HEARTBEAT)
  if beat is not None:
    if beat <= 0:
      raise ValueError(f'heartbeat timeout {beat}: expected a positive number of seconds')
    kw['heartbeat_timeout_seconds'] = beat
  return kw


def _check_address(addr: str, where: str) -> str:
  host, sep, port = addr.rpartition(':')
  if not sep or not host or not port.isdigit():
    raise ValueError(f'{where}={addr!r}: expected host:port of process 0 (e.g. 10.0.0.1:1234)')
  return addr


def first_slurm_host(nodelist: str) -> str:
  """The first host of a Slurm node list: ``'gpu[003-005,9],cpu1'`` -> ``'gpu003'``, ``'a,b'`` -> ``'a'``."""
  head = nodelist.strip()
  if not head:
    raise ValueError('SLURM_STEP_NODELIST is empty: expected a Slurm node list such as node[001-004]')
  cut = min((i for i in (head.find(','), head.find('[')) if i >= 0), default=len(head))
  if cut == len(head) or head[cut] == ',':
    return head[:cut]
  inner = head[cut + 1:]
  end = min((i for i in (inner.find(','), inner.find('-'), inner.find(']')) if i >= 0), default=-1)
  if end <= 0:
    raise ValueError(f'SLURM_STEP_NODELIST={nodelist!r}: cannot read the first host of the bracket range')
  return head[:cut] + inner[:end]


def _slurm_plan(env: Mapping[str, str], cfg: DistributedConfig, address: str | None) -> Plan | None:
  if not all(k in env for k in _SLURM_VARS):
    return None
  ntasks = _env_int(env, 'SLURM_NTASKS')
  if ntasks is None or ntasks <= 1:
    return None
  nodes = _env_int(env, 'SLURM_STEP_NUM_NODES') or _env_int(env, 'SLURM_NNODES')
  kw: dict[str, Any] = _timeouts(env, cfg)
  if cfg.local_device_ids is not None:
    kw['local_device_ids'] = list(cfg.local_device_ids)
  if nodes == ntasks and cfg.local_device_ids is None:
    # One task per node: JAX's Slurm detection would pin each task to GPU SLURM_LOCALID (= 0), hiding the others,
    # so the settings are given explicitly and detection is switched off (every local device stays visible).
    port = _env_int(env, ENV_PORT) or _env_int(env, 'JAX_COORDINATOR_PORT') or (
        61440 + int(env['SLURM_JOB_ID']) % 4096)
    kw.update(coordinator_address=address or f'{first_slurm_host(env["SLURM_STEP_NODELIST"])}:{port}',
              num_processes=ntasks, process_id=_env_int(env, 'SLURM_PROCID'), cluster_detection_method='deactivate')
  elif address is not None:
    kw['coordinator_address'] = address
  return Plan('slurm', kw)


def _on_cloud_tpu() -> bool:
  """A Cloud TPU VM: libtpu installed and Google TPU chips on the PCI bus (what JAX itself checks)."""
  if importlib.util.find_spec('libtpu') is None:
    return False
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor) as f:
        if f.read().strip() == '0x1ae0':  # Google's PCI vendor id
          return True
    except OSError:
      continue
  return False


def plan(config: DistributedConfig | Mapping | None = None, env: Mapping[str, str] | None = None,
         on_tpu: bool | None = None) -> Plan:
  """Decides how (and whether) to start the runtime, without touching JAX. ``env`` defaults to ``os.environ``."""
  cfg = DistributedConfig.from_any(config)
  env = os.environ if env is None else env
  mode = cfg.mode or (env.get(ENV_MODE) or 'auto').strip().lower()
  if mode not in MODES:
    raise ValueError(f'{ENV_MODE}={env.get(ENV_MODE)!r}: expected one of {MODES}')
  if mode == 'off':
    return Plan('single', None)

  address, where = cfg.coordinator_address, 'DistributedConfig.coordinator_address'
  if address is None and env.get(ENV_COORDINATOR):
    address, where = env[ENV_COORDINATOR], ENV_COORDINATOR
  if address is None and env.get('JAX_COORDINATOR_ADDRESS'):
    address, where = env['JAX_COORDINATOR_ADDRESS'], 'JAX_COORDINATOR_ADDRESS'
  if address is not None:
    address = _check_address(address, where)
  num = cfg.num_processes if cfg.num_processes is not None else _env_int(env, ENV_NUM_PROCESSES)
  pid = cfg.process_id if cfg.process_id is not None else _env_int(env, ENV_PROCESS_ID)
  base: dict[str, Any] = _timeouts(env, cfg)
  if cfg.local_device_ids is not None:
    base['local_device_ids'] = list(cfg.local_device_ids)

  if num is not None or pid is not None:
    if num is None or pid is None or address is None:
      missing = [n for n, v in ((f'coordinator address ({ENV_COORDINATOR})', address),
                                (f'number of processes ({ENV_NUM_PROCESSES})', num),
                                (f'process id ({ENV_PROCESS_ID})', pid)) if v is None]
      raise ValueError('multi-process settings are incomplete: missing ' + ', '.join(missing) +
                       '; give all three (DistributedConfig fields or environment variables) or none')
    if num < 1 or not 0 <= pid < num:
      raise ValueError(f'num_processes={num}, process_id={pid}: expected num_processes >= 1 and '
                       '0 <= process_id < num_processes')
    if num == 1 and mode == 'auto':
      return Plan('single', None)
    return Plan('explicit', {**base, 'coordinator_address': address, 'num_processes': num, 'process_id': pid,
                             # JAX would otherwise run cluster detection for unset local_device_ids.
                             'cluster_detection_method': 'deactivate'})

  slurm = _slurm_plan(env, cfg, address)
  if slurm is not None:
    return slurm
  if on_tpu is None:
    on_tpu = _on_cloud_tpu()
  if on_tpu:
    # Single-host TPU VMs initialise fine too (one process); pods need it for checkpointing and health checks.
    return Plan('tpu', {**base, **({'coordinator_address': address} if address else {})})
  if mode == 'on':
    return Plan('forced', {**base, **({'coordinator_address': address} if address else {})})
  if address is not None:
    raise ValueError(f'{where}={address!r} is set but the number of processes and this process id are not: set '
                     f'{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or DistributedConfig fields), or unset it')
  return Plan('single', None)


# ----------------------------------------------------------------------------------------------- initialize


def initialize(config: DistributedConfig | Mapping | None = None) -> Plan:
  """Starts the JAX distributed runtime when running multi-process (see the module docstring); else a no-op.

  Must be called before any JAX computation or device query. Calling it again after a successful start is a
  no-op. Logs the process index / count and the local and global devices. Returns the :class:`Plan` it followed.
  """
  cfg = DistributedConfig.from_any(config)
  p = plan(cfg)
  if p.kwargs is not None:
    if jax.distributed.is_initialized():
      log.info('jax.distributed is already initialized; not starting it again')
    else:
      # Only the CPU client reads this; harmless on GPU / TPU. gloo is JAX's default, set for clarity.
      jax.config.update('jax_cpu_collectives_implementation', cfg.cpu_collectives)
      shown = {k: v for k, v in p.kwargs.items() if not k.endswith('timeout') and k != 'heartbeat_timeout_seconds'}
      log.info('starting jax.distributed (%s): %s', p.source, shown or 'auto-detected settings')
      try:
        jax.distributed.initialize(**p.kwargs)
      except RuntimeError as e:
        raise RuntimeError(f'jax.distributed.initialize ({p.source}, {shown}) failed: {e}. It must run before any '
                           'JAX computation or device query, and every process must reach the coordinator') from e
  local = jax.local_devices()
  log.info('process %d of %d (%s); %d local device(s) %s; %d global device(s) on %s', jax.process_index(),
           jax.process_count(), p.source, len(local), [d.id for d in local], jax.device_count(),
           jax.default_backend())
  return p


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_main() -> bool:
  """True on process 0 (the one that writes logs, metrics files and exports)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier: returns once every process has reached ``sync(name)`` (same name everywhere); no-op alone."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------- per-process data


def _batch_axes():
  from medad_jax.sharding import BATCH_AXES
  return BATCH_AXES


def batch_blocks(mesh: Mesh) -> tuple[int, int, int]:
  """-> ``(first, count, total)``: this process's devices hold batch blocks ``first .. first + count - 1`` of
  ``total`` (a block = the rows of one position on the mesh's batch axes, ``data`` x ``fsdp``).

  Raises if this process's blocks are not one contiguous range of the same length on every process (then the
  per-process batch would not be a contiguous slice of the global one).
  """
  axes = _batch_axes()
  names = list(mesh.axis_names)
  sizes = [mesh.shape[a] for a in axes]
  total = math.prod(sizes)
  devs = np.asarray(mesh.devices)
  per_proc: dict[int, set[int]] = {}
  for pos in np.ndindex(devs.shape):
    block = int(np.ravel_multi_index([pos[names.index(a)] for a in axes], sizes)) if axes else 0
    per_proc.setdefault(devs[pos].process_index, set()).add(block)
  mine = sorted(per_proc.get(jax.process_index(), ()))
  if not mine:
    raise ValueError(f'process {jax.process_index()} holds no device of the mesh {dict(mesh.shape)}')
  counts = {len(b) for b in per_proc.values()}
  if mine != list(range(mine[0], mine[0] + len(mine))) or len(counts) != 1:
    raise ValueError(f'mesh {dict(mesh.shape)}: process {jax.process_index()} holds batch blocks {mine} (of '
                     f'{total}); per-process batches need one contiguous, equal-sized range per process: order the '
                     'mesh devices by process along the batch axes (data, fsdp)')
  return mine[0], len(mine), total


def data_shard(mesh: Mesh | None = None) -> tuple[int, int]:
  """``(shard_index, shard_count)`` of this process's input for ``make_dataset(..., shard_index, shard_count)``.

  Without a mesh: ``(process_index, process_count)``. With one: the position of this process's batch rows on the
  mesh (processes holding the same rows get the same index).
  """
  if mesh is None:
    return jax.process_index(), jax.process_count()
  first, count, total = batch_blocks(mesh)
  return first // count, total // count


def host_local_to_global(batch: Mapping[str, Any], mesh: Mesh, batch_dims: Mapping[str, int | None] | None = None
                         ) -> dict:
  """Per-process host batches -> global ``jax.Array`` s (``jax.make_array_from_process_local_data``).

  Each process passes the rows of its data shard (:func:`data_shard`); along its batch dimension (0, or
  ``batch_dims[key]``, default ``medad_jax.rl.state.BATCH_DIMS``) the global array is the concatenation of the
  processes' rows in shard order, split over the mesh's (data, fsdp) axes. A key whose batch dimension is None
  (packed ``pixel_values_LC``, ``vision_meta``) and 0-d values are replicated: every process must pass the same
  value. ``image_src_PT`` (the sampler layout's rows into the batch's flattened image features) is shifted by the
  feature rows of the shards before this one, so the global batch indexes the global images.

  The shardings equal :func:`medad_jax.rl.state.batch_shardings` of the global batch. Single process: the same as
  :func:`medad_jax.rl.state.put_batch` (keys whose batch size the mesh does not divide are replicated there; across
  processes that is an error, since the processes hold different rows).
  """
  from medad_jax.rl.state import BATCH_DIMS
  dims = dict(BATCH_DIMS if batch_dims is None else batch_dims)
  first, count, total = batch_blocks(mesh)
  shard, n_shards = first // count, total // count
  replicated = NamedSharding(mesh, P())
  batch = dict(batch)
  index_keys = [k for k in _IMAGE_INDEX_KEYS if k in batch]
  if n_shards > 1 and index_keys and _IMAGE_META_KEY in batch:
    valid = getattr(batch[_IMAGE_META_KEY], 'valid_M', None)
    if valid is None:
      raise ValueError(f'host_local_to_global: {_IMAGE_META_KEY} has no valid_M [I, M]; cannot offset {index_keys}')
    rows = int(np.prod(np.shape(valid)[:2]))  # this shard's I * M feature rows
    for key in index_keys:
      src = np.asarray(batch[key])
      batch[key] = np.where(src >= 0, src + shard * rows, src).astype(src.dtype)

  def one(key, bd, x):
    x = np.asarray(x)
    if bd is None or x.ndim == 0:
      return jax.make_array_from_process_local_data(replicated, x, x.shape)
    if bd >= x.ndim:
      raise ValueError(f'batch key {key!r}: batch dimension {bd} but the value has shape {x.shape}')
    if x.shape[bd] % count:
      if n_shards == 1:  # every process holds all rows: replicate like batch_shardings does
        return jax.make_array_from_process_local_data(replicated, x, x.shape)
      raise ValueError(f'batch key {key!r}: {x.shape[bd]} rows on process {jax.process_index()} along dim {bd} are '
                       f'not divisible by its {count} batch block(s) of mesh {dict(mesh.shape)}')
    spec = [None] * x.ndim
    spec[bd] = _batch_axes()
    shape = list(x.shape)
    shape[bd] = x.shape[bd] * n_shards
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(*spec)), x, tuple(shape))

  return {k: jax.tree.map(lambda x, k=k, bd=dims.get(k, 0): one(k, bd, x), v) for k, v in batch.items()}


def gather(tree: Any) -> Any:
  """Every leaf as a full host numpy array on every process (an all-gather across processes when sharded)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


# ------------------------------------------------------------------------------------- agreeing across processes


def allgather_objects(obj: Any) -> list:
  """``obj`` (anything JSON can write, numpy arrays included) of every process, in process order; ``[obj]`` alone.

  Host-side Python values (texts, record metadata, per-row scores, iterator states) travel as UTF-8 JSON bytes
  through one ``process_allgather`` of the lengths and one of the zero-padded bytes.
  """
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj, default=_json_array).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
  buf = np.zeros(bucket(int(sizes.max())), np.uint8)
  buf[:data.size] = data
  everything = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [json.loads(bytes(everything[i, :int(n)]).decode(), object_hook=_array_from_json)
          for i, n in enumerate(sizes)]


_ARRAY_KEY = '__medad_ndarray__'


def _json_array(x):
  """``json.dumps`` hook: numpy arrays and scalars travel as base64 bytes with their dtype and shape."""
  if isinstance(x, (np.ndarray, np.generic)):
    a = np.array(x, order='C')   # 0-d for a numpy scalar
    return {_ARRAY_KEY: base64.b64encode(a.tobytes()).decode(), 'dtype': a.dtype.str, 'shape': list(a.shape)}
  raise TypeError(f'{type(x).__name__} cannot be sent to the other processes (JSON values and numpy arrays can)')


def _array_from_json(d: dict):
  if _ARRAY_KEY in d:
    return np.frombuffer(base64.b64decode(d[_ARRAY_KEY]), np.dtype(d['dtype'])).reshape(d['shape']).copy()
  return d


def bucket(n: int, smallest: int = 64) -> int:
  """``n`` rounded up to a power of two (at least ``smallest``): every all-gathered shape compiles one small
  program, so varying sizes are padded to few shapes."""
  return max(smallest, 1 << max(0, int(n) - 1).bit_length())


def gather_shards(obj: Any, mesh: Mesh | None) -> list:
  """``obj`` of every *data shard* (:func:`data_shard`), in shard order: processes that hold the same batch rows (a
  ``tensor`` axis across hosts) pass the same value and it is kept once."""
  if jax.process_count() == 1:
    return [obj]
  shard, n = data_shard(mesh)
  got = allgather_objects([shard, obj])
  out: list = [None] * n
  seen = [False] * n
  for s, o in got:
    if not seen[s]:
      out[s], seen[s] = o, True
  return out


def agree_max(values: Mapping[str, int]) -> dict[str, int]:
  """The largest value of each key over all processes (e.g. padded lengths every process must share)."""
  if jax.process_count() == 1:
    return {k: int(v) for k, v in values.items()}
  from jax.experimental import multihost_utils
  keys = sorted(values)
  arr = np.asarray([int(values[k]) for k in keys], np.int64)
  got = np.asarray(multihost_utils.process_allgather(arr)).reshape(-1, len(keys))
  return {k: int(got[:, i].max()) for i, k in enumerate(keys)}


def any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is True on any one (a collective: call it at the same point everywhere)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(agree_max({'flag': int(bool(flag))})['flag'])


def broadcast_str(text: str | None) -> str:
  """Process 0's ``text`` on every process (``text`` is ignored elsewhere)."""
  if jax.process_count() == 1:
    return str(text)
  from jax.experimental import multihost_utils
  data = np.frombuffer((text or '').encode(), np.uint8) if is_main() else np.zeros(0, np.uint8)
  n = int(multihost_utils.broadcast_one_to_all(np.array(data.size, np.int64)))
  buf = np.zeros(n, np.uint8)
  if is_main():
    buf[:] = data
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode()


def local_rows(tree: Any, mesh: Mesh | None) -> Any:
  """This process's rows (dimension 0) of every leaf of batch-major device arrays, as host numpy arrays.

  One process: the whole arrays (``jax.device_get``). Several: each leaf is first laid out with its rows split
  over the mesh's batch axes (a no-op when the sampler already left it so), then this process's addressable
  shards are concatenated in row order -- exactly the rows of its data shard (:func:`data_shard`).
  """
  if jax.process_count() == 1 or mesh is None:
    return jax.device_get(tree)
  axes = _batch_axes()

  def one(x):
    sharding = NamedSharding(mesh, P(axes, *([None] * (x.ndim - 1))))
    if x.sharding != sharding:
      x = jax.jit(lambda a: a, out_shardings=sharding)(x)
    parts = {}
    for s in x.addressable_shards:
      parts.setdefault(s.index[0].start or 0, s)
    return np.concatenate([np.asarray(parts[k].data) for k in sorted(parts)], axis=0)

  return jax.tree.map(one, tree)


def to_global(batch: Mapping[str, Any], mesh: Mesh | None, batch_dims: Mapping[str, int | None] | None = None):
  """Per-process host batches -> global arrays when several processes feed one mesh
  (:func:`host_local_to_global`); with one process the host batch is returned as is (the trainers' ``put_batch``
  places it)."""
  if jax.process_count() == 1 or mesh is None:
    return dict(batch)
  return host_local_to_global(batch, mesh, batch_dims)


# ------------------------------------------------------------------------------------------ per-process input


@dataclasses.dataclass(frozen=True)
class Slot:
  """One element of a global batch as this process reads it: the record and whether it is padding (a copy of the
  split's last record filling the last, undropped batch; its results are dropped)."""
  record: Any
  pad: bool


def length_grouped(order, lengths, *, global_batch: int, group: int, seed: int):
  """``order`` (a grain ``MapDataset`` of record indices, already shuffled) regrouped by length, as
  Hugging Face's ``LengthGroupedSampler`` does: each run of ``group`` global batches' indices is sorted by
  ``lengths[index]`` (stably), cut into its ``group`` batches, and those batches are put in a seeded random order
  (so the steps do not climb from short to long within a run). A batch then holds examples of similar length and
  is padded to a smaller bucket. A pure function of the position: the iterator state stays "global batches read",
  and the order does not depend on the process count. A last, shorter run (finite ``order``) is sorted as a whole.

  Hand-written (grain has no length grouping): ~20 lines of index arithmetic over grain's own ``MapDataset``.
  """
  import functools

  import grain
  lengths = np.asarray(lengths)
  run = group * global_batch
  total = len(order)

  @functools.lru_cache(maxsize=8)   # grain's read threads ask for positions of the same run
  def run_order(r: int) -> np.ndarray:
    lo = r * run
    idx = np.asarray([order[p] for p in range(lo, min(lo + run, total))], np.int64)
    idx = idx[np.argsort(lengths[idx], kind='stable')]
    full = len(idx) // global_batch
    perm = np.random.default_rng([seed, r]).permutation(full)
    head = idx[:full * global_batch].reshape(full, global_batch)[perm].reshape(-1)
    return np.concatenate([head, idx[full * global_batch:]])

  return grain.MapDataset.range(total).map(lambda p: int(run_order(p // run)[p % run]))


def process_dataset(source, *, name: str, global_batch: int, shard_index: int, shard_count: int, preprocess,
                    seed: int = 0, shuffle: bool = True, num_epochs: int | None = 1, pad_last: bool = False,
                    read_threads: int = 4, lengths=None, group_by_length: int = 0):
  """This process's slice of every *global* batch of ``source``, as a grain ``IterDataset`` of lists.

  The global order does not depend on the process count: the records are shuffled (``seed``) and repeated
  (``num_epochs``; None = forever) as one sequence, cut into batches of ``global_batch``, and process shard ``i``
  of ``n`` reads rows ``[i * b, (i + 1) * b)`` of each, ``b = global_batch / n``. Concatenating the shards' lists
  in shard order gives the batch one process would read alone. (``medad_jax.data.pipeline.make_dataset`` shards
  the records first and shuffles each shard, which changes the batches with the process count.)

  A last partial batch is dropped, unless ``pad_last``: then it is filled with copies of the last record whose
  elements carry ``'pad': True`` (every other element ``'pad': False``), so every process runs the same number of
  batches. The iterator's state (``get_state`` / ``set_state``) is the number of global batches read, the same
  on every process.

  ``group_by_length`` > 0 (with ``lengths``, tokens per record of ``source``): every ``group_by_length`` global
  batches of the shuffled order hold the same examples, regrouped by length (:func:`length_grouped`).
  """
  import grain
  if global_batch % shard_count:
    raise ValueError(f'{name}: the global batch of {global_batch} does not split into {shard_count} equal '
                     'per-process parts; make it a multiple of the number of data shards')
  per = global_batch // shard_count
  n = len(source)
  if n == 0:
    raise ValueError(f'{name}: no records to read')
  ds = grain.MapDataset.range(n)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if group_by_length:
    if lengths is None or len(lengths) != n:
      raise ValueError(f'{name}: grouping by length needs one length per record ({n}), got '
                       f'{None if lengths is None else len(lengths)}')
    ds = length_grouped(ds, lengths, global_batch=global_batch, group=group_by_length, seed=seed)
  total = len(ds) if num_epochs is not None else None
  if pad_last and total is not None and total % global_batch:
    padded = -(-total // global_batch) * global_batch
    order = ds
    ds = grain.MapDataset.range(padded).map(lambda i: (order[i], False) if i < total else (order[total - 1], True))
  else:
    ds = ds.map(lambda i: (i, False))

  def read(item):
    index, pad = item
    out = preprocess(source[int(index)])
    if pad_last:
      out = dict(out)
      out['pad'] = pad
    return out

  ds = ds.map(read).batch(per, drop_remainder=True, batch_fn=list)[shard_index::shard_count]
  log.info('%s data: process %d reads shard %d of %d (%d of every %d examples)', name, jax.process_index(),
           shard_index, shard_count, per, global_batch)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2, read_threads)))
