"""Where the time goes beyond the matmuls: one profiled call of our decode loop or Con-GRPO update, op by op.

    python -m medad_jax.bench opprofile --what update          # small, P 8 x G 8, prompt 64, 32 new tokens
    python -m medad_jax.bench opprofile --what decode --configs small --new-tokens 64

Runs one call under ``jax.profiler`` (after a warm-up call that compiles), reads the per-op events of the trace
(XLA CPU names each executed op after its HLO instruction) and classifies every op by what its HLO contains
(``compile().as_text()``): dot fusions (the matmuls), fusions that write a transposed or copied layout,
other elementwise fusions, reductions, cache writes, gathers. Prints the time share of each class and the
largest non-matmul ops with their HLO line. The model is the ``peers`` benchmark's (text-only prompts, LoRA on the 7
decoder projections, ``lora_b`` non-zero); the update computes its reference forward inside, as in training.

This is a diagnostic, not a comparison: on a shared machine read the shares, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import logging
import os
import re
import tempfile
import time

from medad_jax.bench import common

log = logging.getLogger(__name__)

MATMUL, TRANSPOSE, ELEMENTWISE = 'matmul (dot fusions)', 'fusions writing a transposed / copied layout', \
    'other elementwise fusions'


def parse_hlo(text: str) -> tuple[dict, dict]:
  """Compiled HLO text -> ``({instruction: (opcode, shape, called computation, line)}, {computation: [opcode]})``."""
  comps: dict[str, list[str]] = {}
  instrs: dict[str, tuple] = {}
  cur = None
  for line in text.splitlines():
    head = re.match(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if head and '=' not in line.split('{')[0]:
      cur = head.group(1)
      comps[cur] = []
      continue
    m = re.match(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(', line)
    if m and cur is not None:
      called = re.search(r'calls=%?([\w.\-]+)', line)
      instrs[m.group(1)] = (m.group(3), m.group(2), called.group(1) if called else None, line.strip())
      comps[cur].append(m.group(3))
  return instrs, comps


def category(name: str, instrs: dict, comps: dict) -> str:
  """The class of a profiled op (see the module docstring)."""
  if name not in instrs:
    return 'other (runtime, not an HLO op)'
  op, _, called, _ = instrs[name]
  ops = set(comps.get(called, [])) if called else {op}
  if ops & {'dot', 'convolution'}:
    return MATMUL
  if 'transpose' in ops:   # elementwise work fused with a transposed write
    return TRANSPOSE
  if 'dynamic-update-slice' in ops:
    return 'dynamic-update-slice (cache writes)'
  if ops & {'reduce', 'reduce-window'}:
    return 'reductions (softmax, norms, sampling)'
  if ops & {'gather', 'scatter', 'dynamic-slice'}:
    return 'gather / scatter / dynamic-slice'
  if ops & {'sort'}:
    return 'sort'
  if ops <= {'while', 'conditional', 'call', 'tuple', 'get-tuple-element', 'parameter', 'constant', 'bitcast'}:
    return 'control'
  if 'copy' in ops and ops <= {'copy', 'bitcast', 'parameter', 'broadcast', 'constant', 'reshape', 'slice',
                               'concatenate'}:
    return TRANSPOSE   # a pure layout copy
  return ELEMENTWISE


def op_times(trace_dir: str) -> list[tuple[str, float]]:
  """``(event name, microseconds)`` of every complete event in the newest trace under ``trace_dir``."""
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True))
  if not files:
    raise RuntimeError(f'jax.profiler wrote no *.trace.json.gz under {trace_dir}')
  with gzip.open(files[-1]) as f:
    events = json.load(f)['traceEvents']
  return [(e['name'], float(e['dur'])) for e in events if e.get('ph') == 'X' and 'dur' in e]


def breakdown(events: list[tuple[str, float]], hlo_text: str) -> tuple[dict, list]:
  """-> ``({class: seconds}, [(seconds, calls, class, HLO line) of the non-matmul ops, largest first]``."""
  instrs, comps = parse_hlo(hlo_text)
  per_op, calls = collections.Counter(), collections.Counter()
  for name, dur in events:
    if name in instrs:
      per_op[name] += dur / 1e6
      calls[name] += 1
  by_class: collections.Counter = collections.Counter()
  for name, s in per_op.items():
    by_class[category(name, instrs, comps)] += s
  top = [(s, calls[n], category(n, instrs, comps), instrs[n][3]) for n, s in per_op.most_common()
         if category(n, instrs, comps) != MATMUL]
  return dict(by_class), top


def build(args):
  """(jitted fn, its args, a call) for ``--what``, on the peers benchmark's model."""
  import jax
  import numpy as np
  from flax import nnx
  from medad_jax.bench import peers
  from medad_jax.rl import update as U
  from medad_jax.sampling import SamplingConfig, prepare_prompts
  from medad_jax.sampling import sampler as S

  pargs = peers.parse_args(['--prompts', str(args.prompts), '--group', str(args.group), '--prompt-len',
                            str(args.prompt_len), '--new-tokens', str(args.new_tokens)])
  cfg = peers.PRESETS[args.configs]()
  model = peers.build_ours(cfg, pargs)
  batch = prepare_prompts(cfg, peers.make_prompts(cfg, pargs))
  config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
  if args.what == 'decode':
    graphdef, state = nnx.split(model)
    b = jax.device_put(batch)
    cache, logits = S.prefill(graphdef, state, b.input_ids_PT, b.attention_mask_PT, b.positions_3PT,
                              b.pixel_values_ILC, b.vision_meta_I, b.image_src_PT)
    fargs = (graphdef, state, cache, logits, b.rope_deltas_P, b.done_P, jax.random.key(0))
    kw = dict(config=config, num_samples=args.group)
    return S.decode.lower(*fargs, **kw).compile().as_text(), lambda: S.decode(*fargs, **kw)
  rollout = S.sample(model, batch, key=jax.random.key(0), config=config, num_samples=args.group)
  ub = peers.update_batch(cfg, model, batch, np.asarray(rollout.tokens_BN), pargs)
  ub.pop('ref_logp_BN')   # the reference forward runs inside the update, as in training
  tx, _ = U.make_optimizer(1e-4)
  graphdef, state = U.init_train_state(model, tx)
  step = U.make_congrpo_update(graphdef, tx, U.GRPOConfig(group_size=args.group))
  dev = U.put_batch(ub, None)
  hlo = step.lower(state, dev).compile().as_text()
  holder = {'state': state}

  def call():
    holder['state'], metrics = step(holder['state'], dev)
    return metrics

  return hlo, call


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m medad_jax.bench opprofile', description=__doc__.split('\n')[0])
  p.add_argument('--what', choices=('decode', 'update'), default='update')
  p.add_argument('--configs', default='small', help='one preset of the peers benchmark: tiny, small, mini, base100m')
  p.add_argument('--prompts', type=int, default=8)
  p.add_argument('--group', type=int, default=8)
  p.add_argument('--prompt-len', type=int, default=64)
  p.add_argument('--new-tokens', type=int, default=32)
  p.add_argument('--top', type=int, default=12, help='non-matmul ops listed')
  p.add_argument('--trace-dir', default=None, help='where the trace goes (default: a temporary directory)')
  return p.parse_args(argv)


def main(argv: list[str]) -> int:
  import jax
  from medad_jax.bench import peers

  common.setup_logging()
  args = parse_args(argv)
  if args.configs not in peers.PRESETS:
    raise SystemExit(f'--configs: unknown preset {args.configs!r}; choose from {sorted(peers.PRESETS)}')
  common.emit(f'machine: {common.machine_summary()}')
  hlo, call = build(args)
  jax.block_until_ready(call())   # compiles
  t0 = time.perf_counter()
  jax.block_until_ready(call())
  untraced = time.perf_counter() - t0
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix='opprofile_')
  jax.profiler.start_trace(trace_dir)
  jax.block_until_ready(call())
  jax.profiler.stop_trace()
  by_class, top = breakdown(op_times(trace_dir), hlo)
  total = sum(by_class.values())
  lines = [f'opprofile [{args.configs}, {args.what}] {args.prompts} prompts x G={args.group}, prompt '
           f'{args.prompt_len}, {args.new_tokens} new tokens: one call {untraced:.2f} s untraced; op time '
           f'{total:.2f} s (trace in {trace_dir})']
  for c, s in sorted(by_class.items(), key=lambda kv: -kv[1]):
    lines.append(f'  {100 * s / total:5.1f} %  {s:8.3f} s  {c}')
  lines.append('largest non-matmul ops (seconds, calls, class, HLO):')
  for s, n, c, line in top[:args.top]:
    lines.append(f'  {s:8.3f} s x{n:<4d} [{c}] {line[:160]}')
  common.emit('\n'.join(lines))
  return 0
