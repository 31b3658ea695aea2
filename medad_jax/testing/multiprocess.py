"""The multi-process Con-GRPO check (``tests/test_distributed_multiprocess.py``): one tiny problem, built the same
way by every process, trained for a few jitted updates on a 4-device mesh, then checkpointed and restored.

Run as a worker, one per process (the test starts two, each with 2 CPU devices)::

    MEDAD_COORDINATOR=127.0.0.1:PORT MEDAD_NUM_PROCESSES=2 MEDAD_PROCESS_ID=i \
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python -m medad_jax.testing.multiprocess --out DIR --ckpt DIR

Each worker loads only the prompts of its data shard (``distributed.data_shard``), builds its own
``PromptBatch`` from them (its own image indices), turns the per-process rows into global arrays with
``distributed.host_local_to_global``, runs :data:`STEPS` updates and writes ``DIR/result_<i>.npz``: the metrics
of every step, the trained LoRA parameters (gathered) and the ones restored from the orbax checkpoint both
processes wrote. The single-process reference (:func:`run`) is the same code on the global batch.

Axis legend: P prompts, G rollouts per prompt, B = P * G, T prompt length, N completion length.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

import numpy as np

P_GLOBAL, G, N, T_BUCKET = 4, 4, 6, 16
STEPS = 3
MESH = {'data': 2, 'fsdp': 2, 'tensor': 1}
SEED = 0
LR = 1e-2

log = logging.getLogger(__name__)


def tiny_cfg():
  from medad_jax.model.config import Qwen25VLConfig
  base = Qwen25VLConfig.tiny()
  return base.replace(text=dataclasses.replace(base.text, num_layers=1),
                      vision=dataclasses.replace(base.vision, depth=1, fullatt_block_indexes=(0,)))


def prompt_batch(cfg, prompts: range) -> dict:
  """The update batch of the given global prompt indices (a data shard): each prompt's tokens, image, completions
  and rewards depend only on its global index, so any shard is a slice of the global batch."""
  from medad_jax.sampling.prompts import prepare_prompts
  rows, pixels, comp, cmask, rewards = [], [], [], [], []
  for p in prompts:
    rng = np.random.default_rng([SEED, p])
    text = rng.integers(0, 200, size=3 + p).tolist()
    rows.append(np.array([cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id] + text,
                         np.int32))
    pixels.append(rng.normal(size=(16, cfg.vision.patch_dim)).astype(np.float32))
    c = rng.integers(0, cfg.text.vocab_size - 10, size=(G, N)).astype(np.int32)
    m = np.ones((G, N), bool)
    m[1, 2 + p % 3:] = False
    c[~m] = cfg.pad_token_id
    comp.append(c)
    cmask.append(m)
    # Prompt 2's group has equal rewards (zero variance); the others are spread.
    rewards.append(np.full(G, 0.5, np.float32) if p == 2 else rng.uniform(size=G).astype(np.float32))
  pb = prepare_prompts(cfg, rows, pixel_values=np.concatenate(pixels), image_grid_thw=np.array([[1, 4, 4]] * len(rows)),
                       length_buckets=(T_BUCKET,), patch_buckets=(16,))
  return {'prompt_ids_PT': pb.input_ids_PT, 'prompt_mask_PT': pb.attention_mask_PT,
          'prompt_positions_3PT': pb.positions_3PT, 'rope_deltas_P': pb.rope_deltas_P,
          'pixel_values_ILC': pb.pixel_values_ILC, 'vision_meta_I': pb.vision_meta_I, 'image_src_PT': pb.image_src_PT,
          'completion_ids_BN': np.concatenate(comp), 'completion_mask_BN': np.concatenate(cmask),
          'old_logp_BN': np.zeros((len(rows) * G, N), np.float32), 'rewards_B': np.concatenate(rewards)}


def build_state(mesh):
  """-> ``(graphdef, state, tx, grpo_cfg)``: the LoRA policy (adapters perturbed off zero) placed on ``mesh``."""
  import jax
  from flax import nnx
  from medad_jax.model.lora import LoraConfig, apply_lora
  from medad_jax.model.qwen25vl import Qwen25VL
  from medad_jax.rl import update as U

  model = Qwen25VL(tiny_cfg(), rngs=nnx.Rngs(SEED))
  apply_lora(model, LoraConfig(rank=4, alpha=8.0))
  key = jax.random.PRNGKey(SEED + 1)
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if path[-1] == 'lora_b':
      key, sub = jax.random.split(key)
      v.set_value(0.05 * jax.random.normal(sub, v.get_value().shape))
  tx, _ = U.make_optimizer(LR, weight_decay=0.01, max_grad_norm=1.0)
  graphdef, state = U.init_train_state(model, tx, seed=SEED)
  # Every process built identical values; host copies make device_put valid across processes.
  state = U.place_state(jax.device_get(state), mesh)
  # ratio_to='sft': the ratio is against the adapters-off reference, so every token carries a gradient.
  return graphdef, state, tx, U.GRPOConfig(group_size=G, beta=0.04, ratio_to='sft')


def run(mesh, batch, steps: int = STEPS):
  """``steps`` jitted updates on ``batch`` (global arrays) -> ``(graphdef, state, metrics per step)``."""
  import jax
  from medad_jax.rl import update as U
  graphdef, state, tx, gcfg = build_state(mesh)
  update = U.make_congrpo_update(graphdef, tx, gcfg, mesh=mesh)
  metrics = []
  for _ in range(steps):
    state, m = update(state, batch)
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  if update.traces != 1:
    raise RuntimeError(f'the update was traced {update.traces} times for {steps} identical-shape steps; expected 1')
  return graphdef, state, metrics


def flat_params(tree) -> dict[str, np.ndarray]:
  """``{'/'-joined path: host array}`` of a (gathered) parameter tree."""
  import jax
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out['/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)] = np.asarray(x)
  return out


# ----------------------------------------------------------------------- running real processes (the tests)


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def log_tail(path: str, n: int = 40) -> str:
  """The last ``n`` lines of a process log, without orbax's absl chatter (which hides the error)."""
  try:
    with open(path, errors='replace') as f:
      lines = [ln for ln in f.read().splitlines() if 'absl:' not in ln]
    return '\n'.join(lines[-n:])
  except OSError as e:
    return f'(no log: {e})'


def start(argv: list[str], *, processes: int, devices: int, log_dir: str, tag: str = 'p',
          env: dict | None = None, cwd: str | None = None) -> list[tuple]:
  """Starts ``python <argv>`` as ``processes`` JAX processes on localhost (``devices`` fake CPU devices each,
  ``MEDAD_*`` settings for ``distributed.initialize``; one process gets none) -> ``[(Popen, log path)]``."""
  import subprocess
  root = cwd or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  port = free_port()
  out = []
  for i in range(processes):
    e = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'MEDAD_', 'JAX_COORDINATOR'))}
    e.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu',
             JAX_DEFAULT_MATMUL_PRECISION='highest', PYTHONPATH=root + os.pathsep + e.get('PYTHONPATH', ''))
    if processes > 1:
      # a busy CI machine can stall the processes longer than JAX's 100 s heartbeat timeout
      e.update(MEDAD_COORDINATOR=f'127.0.0.1:{port}', MEDAD_NUM_PROCESSES=str(processes), MEDAD_PROCESS_ID=str(i),
               MEDAD_HEARTBEAT_TIMEOUT_S='900')
    e.update({k: v.format(i=i) for k, v in (env or {}).items()})
    log_path = os.path.join(log_dir, f'{tag}{i}.log')
    with open(log_path, 'w') as f:
      p = subprocess.Popen([sys.executable, *argv], cwd=root, env=e, stdout=f, stderr=subprocess.STDOUT)
    out.append((p, log_path))
  return out


def wait(procs: list[tuple], timeout_s: float, *, ok=(0,)) -> list[int]:
  """Waits for every process; when one exits with a code outside ``ok`` or the time is up, kills the others and
  raises ``RuntimeError`` with every log's tail. Returns the exit codes."""
  deadline = time.monotonic() + timeout_s
  try:
    while True:
      codes = [p.poll() for p, _ in procs]
      failed = [i for i, c in enumerate(codes) if c is not None and c not in ok]
      if failed or time.monotonic() > deadline:
        why = (f'process(es) {failed} exited with {[codes[i] for i in failed]}' if failed
               else f'still running after {timeout_s:.0f} s (exit codes {codes})')
        logs = '\n'.join(f'--- process {i} ({path}) ---\n{log_tail(path)}' for i, (_, path) in enumerate(procs))
        raise RuntimeError(f'{why}\n{logs}')
      if all(c is not None for c in codes):
        return codes
      time.sleep(0.2)
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait(10)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', required=True, help='directory for result_<process>.npz')
  ap.add_argument('--ckpt', required=True, help='checkpoint directory shared by the processes')
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  times = {}
  logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                      format=f'[worker {os.environ.get("MEDAD_PROCESS_ID", "?")}] %(name)s: %(message)s')

  from medad_jax import distributed
  plan = distributed.initialize(distributed.DistributedConfig(initialization_timeout_s=60))
  times['initialize'] = time.perf_counter() - t0
  import jax
  jax.config.update('jax_default_matmul_precision', 'highest')  # as tests/conftest.py, for the reference
  from medad_jax.checkpointing import Checkpointer
  from medad_jax.sharding import make_mesh

  mesh = make_mesh(**MESH)
  shard, n_shards = distributed.data_shard(mesh)
  per = P_GLOBAL // n_shards
  local = prompt_batch(tiny_cfg(), range(shard * per, (shard + 1) * per))
  batch = distributed.host_local_to_global(local, mesh)
  graphdef, state, metrics = run(mesh, batch)
  trained = distributed.gather(state.params)
  times['build_and_train'] = time.perf_counter() - t0 - times['initialize']

  # Both processes write their shards of one checkpoint, then restore it onto a freshly built state.
  ckpt = Checkpointer(args.ckpt, keep=1, async_save=False)
  ckpt.save(STEPS, state, data_state={'batches': STEPS}, meta={'process_count': jax.process_count()})
  ckpt.wait()
  distributed.sync('saved')
  _, fresh, _, _ = build_state(mesh)
  restored, data_state, meta = ckpt.restore(STEPS, fresh)
  ckpt.close()
  restored_params = distributed.gather(restored.params)
  distributed.sync('done')
  times['checkpoint'] = time.perf_counter() - t0 - times['initialize'] - times['build_and_train']

  info = {'plan': plan.source, 'process_index': distributed.process_index(),
          'process_count': distributed.process_count(), 'is_main': distributed.is_main(),
          'local_devices': jax.local_device_count(), 'global_devices': jax.device_count(),
          'data_shard': [shard, n_shards], 'restored_step': int(distributed.gather(restored.step)),
          'data_state': data_state, 'meta_process_count': meta.get('process_count'), 'metrics': metrics,
          'sharded_param_leaves': sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params)),
          'cpu_collectives': jax.config.jax_cpu_collectives_implementation, 'seconds': times}
  arrays = {f'trained/{k}': v for k, v in flat_params(trained).items()}
  arrays.update({f'restored/{k}': v for k, v in flat_params(restored_params).items()})
  os.makedirs(args.out, exist_ok=True)
  np.savez(os.path.join(args.out, f'result_{jax.process_index()}.npz'), info=json.dumps(info), **arrays)
  log.info('wrote %s', os.path.join(args.out, f'result_{jax.process_index()}.npz'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
