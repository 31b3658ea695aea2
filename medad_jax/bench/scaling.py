"""Con-GRPO update scaling: step time on a faked 1-, 2-, 4- and 8-device CPU mesh for a fixed global batch, and
how the step time grows with the group size G and with the answer length N.

    python -m medad_jax.bench scaling                               # default (~3-5 min on 2 cores)
    python -m medad_jax.bench scaling --devices 1,2,4,8 --groups 2,4,8 --lengths 16,32,64 --json out.json
    python -m medad_jax.bench scaling --preset small --layers 8 --prompts 8 --group 8 --completion-len 64

What is timed: the jitted Con-GRPO update (``medad_jax.rl.update.make_congrpo_update``: teacher-forced policy
forward with the image, reference forward, clipped surrogate + k3 KL, backward, global-norm clipping, AdamW) on a
LoRA policy, one call = one optimizer step on one rollout batch of ``P`` prompts x ``G`` rollouts, all
completions ``N`` tokens long. Wall seconds of a call that ends with the new state on the host, best of
``--repeats`` after a warm-up call that also compiles.

Faked devices: each mesh size runs in its own subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=d``
(the flag must be set before JAX starts). The mesh is ``data=d`` (the batch split over d devices, parameters
replicated), or ``--mesh-axis fsdp`` / ``tensor``. All faked devices share this machine's cores, so the d-device
numbers measure what partitioning costs (collectives, per-device dispatch, smaller matmuls), not a speed-up: on a
real d-accelerator mesh the same program runs d devices' worth of compute in parallel.

FLOPs: model FLOPs of the update (``medad_jax.plan.step_flops``: forward + backward + reference forward), so
achieved FLOP/s / the measured matmul peak reads like an MFU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

log = logging.getLogger(__name__)

WORKER_TIMEOUT_S = 1800


@dataclasses.dataclass(frozen=True)
class Point:
  """One timed update: mesh size and the batch shape."""

  devices: int
  prompts: int
  group: int
  prompt_len: int
  completion_len: int
  sweep: str   # 'mesh' | 'group' | 'length'


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m medad_jax.bench scaling', description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='small', choices=('tiny', 'small'), help='architecture preset')
  p.add_argument('--layers', type=int, default=4, help='decoder layers (overrides the preset; 0 keeps it)')
  p.add_argument('--devices', default='1,2,4,8', help='faked CPU mesh sizes')
  p.add_argument('--mesh-axis', default='data', choices=('data', 'fsdp', 'tensor'), help='axis the devices form')
  p.add_argument('--prompts', type=int, default=8, help='P, global (fixed across mesh sizes)')
  p.add_argument('--group', type=int, default=4, help='G of the mesh sweep and of the length sweep')
  p.add_argument('--prompt-len', type=int, default=40, help='T: image tokens + text tokens')
  p.add_argument('--completion-len', type=int, default=32, help='N of the mesh sweep and of the group sweep')
  p.add_argument('--image-side', type=int, default=4, help='patches per image side (one image per prompt)')
  p.add_argument('--groups', default='2,4,8', help='G values of the group sweep (1 device; empty: skip)')
  p.add_argument('--lengths', default='16,32,64', help='N values of the length sweep (1 device; empty: skip)')
  p.add_argument('--lora-rank', type=int, default=8)
  p.add_argument('--repeats', type=int, default=2)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--peak-size', type=int, default=1024, help='matrix side of the matmul-peak measurement')
  p.add_argument('--json', default=None, help='also write the results to this JSON file')
  p.add_argument('--worker', default=None, help=argparse.SUPPRESS)   # internal: JSON list of points to time
  return p.parse_args(argv)


def _ints(text: str, flag: str) -> list[int]:
  try:
    out = [int(x) for x in text.split(',') if x.strip()]
  except ValueError as e:
    raise SystemExit(f'{flag}: expected comma-separated integers, got {text!r}') from e
  if any(x < 1 for x in out):
    raise SystemExit(f'{flag}: values must be >= 1, got {text!r}')
  return out


def model_config(args):
  from medad_jax.model.config import Qwen25VLConfig
  cfg = Qwen25VLConfig.preset(args.preset)
  if args.layers:
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=args.layers))
  return cfg


def plan_points(args) -> list[Point]:
  """The mesh sweep (every ``--devices``) and, on 1 device, the group and length sweeps."""
  base = dict(prompts=args.prompts, prompt_len=args.prompt_len)
  pts = [Point(d, group=args.group, completion_len=args.completion_len, sweep='mesh', **base)
         for d in _ints(args.devices, '--devices')]
  pts += [Point(1, group=g, completion_len=args.completion_len, sweep='group', **base)
          for g in _ints(args.groups, '--groups')]
  pts += [Point(1, group=args.group, completion_len=n, sweep='length', **base)
          for n in _ints(args.lengths, '--lengths')]
  return pts


# ------------------------------------------------------------------------------------------- worker side


def time_points(args, points: list[Point]) -> list[dict]:
  """Times every point in this process (all with the same device count, which JAX already sees)."""
  import jax
  import numpy as np
  from flax import nnx
  from medad_jax import plan as PL
  from medad_jax.bench import common
  from medad_jax.model.lora import LoraConfig, apply_lora
  from medad_jax.model.qwen25vl import Qwen25VL
  from medad_jax.rl import update as U
  from medad_jax.sharding import make_mesh

  cfg = model_config(args)
  out, built, done = [], {}, {}
  for pt in points:
    shape = (pt.devices, pt.prompts, pt.group, pt.prompt_len, pt.completion_len)
    if shape in done:   # the same update in another sweep: measured once
      out.append(dict(done[shape], sweep=pt.sweep))
      continue
    if jax.device_count() != pt.devices:
      raise RuntimeError(f'worker sees {jax.device_count()} devices, point wants {pt.devices}')
    mesh = None
    if pt.devices > 1:
      sizes = {'data': 1, 'fsdp': 1, 'tensor': 1, args.mesh_axis: pt.devices}
      mesh = make_mesh(**sizes)
    if pt.group not in built:
      model = Qwen25VL(cfg, rngs=nnx.Rngs(args.seed))
      apply_lora(model, LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank))
      tx, _ = U.make_optimizer(1e-4)
      graphdef, state = U.init_train_state(model, tx)
      built[pt.group] = (graphdef, state, tx)
    graphdef, state0, tx = built[pt.group]
    step = U.make_congrpo_update(graphdef, tx, U.GRPOConfig(group_size=pt.group), mesh=mesh)
    batch = U.put_batch(PL.rollout_batch(cfg, pt.prompts, pt.group, pt.prompt_len, pt.completion_len,
                                         args.image_side, seed=args.seed), mesh)
    copy = lambda s: jax.tree.map(lambda x: x.copy(), s)  # noqa: E731  (the step donates its state)
    state = U.place_state(copy(state0), mesh) if mesh is not None else copy(state0)
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t0)
    if not np.isfinite(float(metrics['loss'])):
      raise RuntimeError(f'non-finite loss at {pt}')
    w = PL.Workload(stage='congrpo', prompts=pt.prompts, group_size=pt.group, prompt_len=pt.prompt_len,
                    completion_len=pt.completion_len, image_patches=args.image_side**2, lora_rank=args.lora_rank,
                    dtype='float32', param_dtype='float32')
    flops = PL.step_flops(cfg, w).update
    out.append(dict(**dataclasses.asdict(pt), compile_and_first_s=first_s, step_s=min(times), step_times=times,
                    update_flops=flops, tokens=pt.prompts * pt.prompt_len + pt.prompts * pt.group * pt.completion_len,
                    traces=step.traces, loss=float(metrics['loss']),
                    rollouts_per_device=int(batch['completion_ids_BN'].addressable_shards[0].data.shape[0])))
    done[shape] = out[-1]
    log.info('%s', {k: out[-1][k] for k in ('devices', 'group', 'completion_len', 'step_s', 'compile_and_first_s')})
  out[0]['machine'] = common.machine_summary()
  return out


# ------------------------------------------------------------------------------------------- parent side


def run_worker(argv: list[str], points: list[Point]) -> list[dict]:
  """Runs :func:`time_points` in a subprocess that sees ``points[0].devices`` faked CPU devices."""
  d = points[0].devices
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={d}'])
  env['JAX_PLATFORMS'] = 'cpu'
  cmd = [sys.executable, '-m', 'medad_jax.bench.scaling', *argv,
         '--worker', json.dumps([dataclasses.asdict(p) for p in points])]
  log.info('worker: %d faked device(s), %d point(s)', d, len(points))
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
  if proc.returncode != 0:
    raise RuntimeError(f'scaling worker ({d} devices) failed with exit code {proc.returncode}:\n'
                       f'{proc.stderr[-4000:]}')
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if len(lines) != 1:
    raise RuntimeError(f'scaling worker ({d} devices) printed {len(lines)} RESULT lines; stdout:\n'
                       f'{proc.stdout[-2000:]}')
  return json.loads(lines[0][len('RESULT '):])


def format_table(title: str, rows: list[dict], key: str, label: str, peak: float) -> str:
  """One fixed-width table; ``key`` is the swept field (shown as ``label``), ratios are to the first row."""
  head = [label, 'B', 'tokens', 'compile+1st s', 'step s', 'tokens/s', 'GFLOP/s', 'of peak', 'time vs first']
  body = []
  for r in rows:
    gflops = r['update_flops'] / r['step_s'] / 1e9
    body.append([str(r[key]), str(r['prompts'] * r['group']), str(r['tokens']), f'{r["compile_and_first_s"]:.1f}',
                 f'{r["step_s"]:.3f}', f'{r["tokens"] / r["step_s"]:.0f}', f'{gflops:.1f}',
                 f'{100 * gflops * 1e9 / peak:.0f}%', f'{r["step_s"] / rows[0]["step_s"]:.2f}x'])
  widths = [max(len(x) for x in col) for col in zip(head, *body)]
  fmt = lambda cells: '  '.join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
  sep = '-' * len(fmt(head))
  return '\n'.join([title, sep, fmt(head), sep, *map(fmt, body), sep])


def format_results(results: list[dict], peak: float, mesh_axis: str) -> str:
  """The mesh, group and length sweeps as three tables."""
  blocks = []
  sweep = lambda s: [r for r in results if r['sweep'] == s]  # noqa: E731
  if rows := sweep('mesh'):
    r = rows[0]
    blocks.append(format_table(f'Con-GRPO update vs faked CPU mesh size ({mesh_axis}=devices; fixed global batch '
                               f'P={r["prompts"]} x G={r["group"]}, T={r["prompt_len"]}, N={r["completion_len"]})',
                               rows, 'devices', 'devices', peak))
  if rows := sweep('group'):
    r = rows[0]
    blocks.append(format_table(f'Con-GRPO update vs group size G (1 device; P={r["prompts"]}, T={r["prompt_len"]}, '
                               f'N={r["completion_len"]})', rows, 'group', 'G', peak))
  if rows := sweep('length'):
    r = rows[0]
    blocks.append(format_table(f'Con-GRPO update vs answer length N (1 device; P={r["prompts"]} x G={r["group"]}, '
                               f'T={r["prompt_len"]})', rows, 'completion_len', 'N', peak))
  return '\n\n'.join(blocks)


def main(argv: list[str]) -> int:
  from medad_jax.bench import common
  common.setup_logging()
  args = parse_args(argv)
  if args.worker is not None:
    points = [Point(**p) for p in json.loads(args.worker)]
    sys.stdout.write('RESULT ' + json.dumps(time_points(args, points)) + '\n')
    return 0
  points = plan_points(args)
  cfg = model_config(args)
  worker_argv = [f'--{k.replace("_", "-")}={v}' for k, v in vars(args).items()
                 if k not in ('json', 'worker') and v is not None]
  results = []
  for d in sorted({p.devices for p in points}):
    results += run_worker(worker_argv, [p for p in points if p.devices == d])
  log.info('measuring the matmul peak')
  peak = common.matmul_peak_flops(args.peak_size)
  machine = results[0].get('machine', common.machine_summary())
  common.emit(f'machine: {machine}\nmeasured fp32 matmul peak (jax, 1 device, {args.peak_size}^3): '
              f'{peak / 1e9:.1f} GFLOP/s\nmodel: {args.preset} preset, {cfg.text.num_layers} decoder layers, LoRA '
              f'rank {args.lora_rank}; image {args.image_side}x{args.image_side} patches per prompt; faked devices '
              f'share the cores (partitioning overhead, not speed-up)\n')
  common.emit(format_results(results, peak, args.mesh_axis))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(common.to_jsonable(dict(argv=argv, machine=machine, matmul_peak_flops=peak, results=results)), f,
                indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
