r"""Paper scale without weights: compile the real Qwen2.5-VL-3B steps at the paper's shapes and read XLA's memory.

  python -m medad_jax.bench paper_scale                       # 3B, congrpo:paper, 1 device and a faked 8-device mesh
  python -m medad_jax.bench paper_scale --preset=small        # the same on the small preset
  python -m medad_jax.bench paper_scale --preset=small --jobs=2 --set data.image_size=224 --set sampling.max_new_tokens=256
  python -m medad_jax.bench paper_scale --meshes="data=1" --programs=congrpo --json=out.json   # one program
  python -m medad_jax.bench paper_scale --set rl.num_microbatches=8 --set model.remat=dots

For each mesh (one subprocess each: a faked CPU device count must be set before JAX starts) it builds the model
*abstractly* (``nnx.eval_shape``: no weight is allocated), applies LoRA, builds the train state's shapes, and lowers
and compiles on CPU the three programs a Con-GRPO run executes at the shapes of ``configs/congrpo.py:paper``:

* the SFT step (Cognitive Injection): ``sft.batch_size`` examples of prompt + answer (one 448-px image each),
  ``sft.num_microbatches`` slices;
* the Con-GRPO update: ``rl.prompts_per_step`` prompts x ``rl.group_size`` completions of
  ``sampling.max_new_tokens`` tokens, reference log-probs included (LoRA: adapters off), ``rl.num_microbatches``;
* the rollout sampler (prefill + the ``while_loop`` decode of ``max_new_tokens`` tokens).

Reported per device, from ``compiled.memory_analysis()``: arguments + outputs - donated aliases + temporaries
(what XLA allocates for the program), beside the planner's figure (``medad_jax.plan``: state + update step), their
difference in percent, and the compile time.

XLA:CPU's figure is not a GPU's or a TPU's: the accelerator compilers fuse differently, may rematerialise more or
less, and (GPU) keep a workspace for cuDNN; this is the shapes' and the program's memory as one XLA backend
schedules it. The ``xla`` attention path is what is compiled (cuDNN needs a CUDA plugin to trace).
The last line is machine-readable::

  3B per device: sft <x> GiB, congrpo <y> GiB (1 device); sft <x> GiB, congrpo <y> GiB (8 devices)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

GiB = 2.0**30


def _parse(argv):
  p = argparse.ArgumentParser(prog='python -m medad_jax.bench paper_scale', description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='qwen2_5_vl_3b', help='architecture preset (qwen2_5_vl_3b, small, tiny, ...)')
  p.add_argument('--config', default='congrpo:paper', help='experiment config whose shapes are compiled')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='config override (repeatable)')
  p.add_argument('--meshes', default='data=1;fsdp=4,tensor=2',
                 help='semicolon-separated meshes, e.g. "data=1;fsdp=4,tensor=2" (default: 1 device, 8 devices)')
  p.add_argument('--programs', default='sft,congrpo,sampler', help='which programs to compile')
  p.add_argument('--json', default=None, metavar='PATH', help='also write every figure (bytes, seconds) as JSON')
  p.add_argument('--jobs', type=int, default=1,
                 help='mesh workers compiled at once (default 1: compile times are then not shared-CPU figures)')
  p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------- worker


def _abstract(tree, shardings=None):
  import jax
  import numpy as np
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def _memory(compiled) -> dict:
  ma = compiled.memory_analysis()
  arg, out, alias, temp = (float(ma.argument_size_in_bytes), float(ma.output_size_in_bytes),
                           float(ma.alias_size_in_bytes), float(ma.temp_size_in_bytes))
  return {'argument': arg, 'output': out, 'alias': alias, 'temp': temp, 'total': arg + out - alias + temp}


def run_worker(args) -> dict:
  """Compiles the requested programs on one mesh in this process -> a JSON-able result."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from configs import common as configs_common
  from medad_jax import plan as PL
  from medad_jax.model.config import Qwen25VLConfig
  from medad_jax.model.lora import LoraConfig, apply_lora
  from medad_jax.model.qwen25vl import Qwen25VL
  from medad_jax.rl import update as U
  from medad_jax.sampling import sampler as S
  from medad_jax.sharding import make_mesh

  config = configs_common.load(args.config, args.set)
  mesh_shape = PL.parse_mesh(args.worker)
  jmesh = None
  if mesh_shape.devices > 1:
    jmesh = make_mesh(mesh_shape.data, mesh_shape.fsdp, mesh_shape.tensor, devices=jax.devices()[:mesh_shape.devices])
  mc = config.model
  cfg = Qwen25VLConfig.preset(args.preset).replace(dtype=mc.dtype, param_dtype=mc.param_dtype, remat=mc.remat,
                                                   attention='xla', decode_scan=mc.decode_scan)
  lc = config.lora
  lora = LoraConfig(rank=lc.rank, alpha=lc.alpha, pattern=lc.pattern)

  def make_model():
    m = Qwen25VL(cfg, rngs=nnx.Rngs(0))
    apply_lora(m, lora)
    return m

  graphdef_model, model_state = nnx.split(nnx.eval_shape(make_model))  # the sampler's model, no arrays
  _, w_rl = PL.workload_from_config(config)
  sft_spec = args.config.replace('congrpo', 'sft')
  sft_keys = set(configs_common.load(sft_spec, []).keys())   # the SFT config has no rl / sampling blocks
  sft_config = configs_common.load(sft_spec, [s for s in args.set if s.partition('.')[0] in sft_keys])
  _, w_sft = PL.workload_from_config(sft_config)
  side = int(round(np.sqrt(w_rl.image_patches)))
  out = {'mesh': str(mesh_shape), 'devices': mesh_shape.devices, 'preset': args.preset, 'programs': {},
         'shapes': {'sft': dict(rows=w_sft.prompts, length=w_sft.prompt_len, microbatches=w_sft.num_microbatches),
                    'congrpo': dict(prompts=w_rl.prompts, group=w_rl.group_size, prompt_len=w_rl.prompt_len,
                                    completion_len=w_rl.completion_len, microbatches=w_rl.num_microbatches),
                    'image_patches': w_rl.image_patches, 'remat': mc.remat, 'dtype': mc.dtype,
                    'param_dtype': mc.param_dtype}}

  def compile_step(name, w):
    w = dataclasses.replace(w, remat=mc.remat)
    res = PL.compiled_memory(cfg, w, mesh_shape)   # the real step, abstract weights (medad_jax/plan.py)
    res['planned'] = float(PL.plan(cfg, w, mesh_shape).total('update'))
    out['programs'][name] = res

  programs = args.programs.split(',')
  if 'sft' in programs:
    compile_step('sft', w_sft)
  if 'congrpo' in programs:
    compile_step('congrpo', w_rl)
  if 'sampler' in programs:
    from medad_jax.train import pipeline as pipe
    pb = PL.prompt_batch(cfg, w_rl.prompts, w_rl.prompt_len, side)
    scfg = pipe.sampling_config(config.sampling, cfg)
    msh = None if jmesh is None else U.tree_shardings(model_state, jmesh)
    params_abs = _abstract(model_state, msh)
    pb_abs = _abstract(pb)
    t0 = time.perf_counter()
    pre = S.prefill.lower(graphdef_model, params_abs, pb_abs.input_ids_PT, pb_abs.attention_mask_PT,
                          pb_abs.positions_3PT, pb_abs.pixel_values_ILC, pb_abs.vision_meta_I, pb_abs.image_src_PT
                          ).compile()
    cache_abs, logits_abs = jax.eval_shape(
        lambda *a: S.prefill(graphdef_model, *a), params_abs, pb_abs.input_ids_PT, pb_abs.attention_mask_PT,
        pb_abs.positions_3PT, pb_abs.pixel_values_ILC, pb_abs.vision_meta_I, pb_abs.image_src_PT)
    dec = S.decode.lower(graphdef_model, params_abs, cache_abs, logits_abs, pb_abs.rope_deltas_P, pb_abs.done_P,
                         jax.ShapeDtypeStruct((2,), jnp.uint32), None, config=scfg,
                         num_samples=w_rl.group_size).compile()
    mp, md = _memory(pre), _memory(dec)
    # The decode program's arguments include the prompt cache the prefill produced: its peak is the larger one.
    out['programs']['sampler'] = {'prefill': mp, 'decode': md, 'total': max(mp['total'], md['total']),
                                  'compile_s': time.perf_counter() - t0,
                                  'planned': float(PL.plan(cfg, w_rl, mesh_shape).total('rollout'))}
  return out


# ------------------------------------------------------------------------------------------------- driver


def _label(preset: str) -> str:
  return {'qwen2_5_vl_3b': '3B', 'qwen2_5_vl_7b': '7B'}.get(preset, preset)


def main(argv: list[str]) -> int:
  args = _parse(argv)
  if args.worker:
    sys.stdout.write('RESULT ' + json.dumps(run_worker(args)) + '\n')
    return 0
  from medad_jax import plan as PL
  from medad_jax.bench import common
  specs = [m.strip() for m in args.meshes.split(';') if m.strip()]

  def run_mesh(spec):
    n = PL.parse_mesh(spec).devices
    env = dict(os.environ, XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={n}',
               JAX_PLATFORMS='cpu')
    cmd = [sys.executable, '-m', 'medad_jax.bench', 'paper_scale', f'--worker={spec}', f'--preset={args.preset}',
           f'--config={args.config}', f'--programs={args.programs}'] + [f'--set={s}' for s in args.set]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    if proc.returncode or not lines:
      sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
      raise SystemExit(f'paper_scale: the worker for mesh {spec} failed (exit {proc.returncode})')
    res = json.loads(lines[-1][len('RESULT '):])
    res['wall_s'] = time.perf_counter() - t0
    return res

  from concurrent.futures import ThreadPoolExecutor
  with ThreadPoolExecutor(max(1, args.jobs)) as pool:   # each worker is its own process; threads only wait
    results = list(pool.map(run_mesh, specs))
  sys.stdout.write(f'machine: {common.machine_summary()}\n')
  sys.stdout.write(f'config {args.config} {" ".join(args.set)}; preset {args.preset}\n')
  for r in results:
    sh = r['shapes']
    sys.stdout.write(f"\n-- mesh {r['mesh']} ({r['devices']} device(s)); remat={sh['remat']}, compute {sh['dtype']}, "
                     f"params {sh['param_dtype']}; {sh['image_patches']} patches per image\n")
    sys.stdout.write(f"   sft: {sh['sft']}\n   congrpo: {sh['congrpo']}\n")
    sys.stdout.write(f"   {'program':<9} {'XLA GiB/device':>15} {'planned':>9} {'plan-XLA':>9} {'args':>8} {'temp':>8} "
                     f"{'compile s':>10}\n")
    for name, p in r['programs'].items():
      parts = p if name != 'sampler' else p['decode']
      sys.stdout.write(f"   {name:<9} {p['total'] / GiB:15.2f} {p['planned'] / GiB:9.2f} "
                       f"{100 * (p['planned'] - p['total']) / p['total']:+8.1f}% "
                       f"{parts['argument'] / GiB:8.2f} {parts['temp'] / GiB:8.2f} {p['compile_s']:10.1f}\n")
  label = _label(args.preset)
  per = []
  for r in results:
    g = lambda k: r['programs'].get(k, {}).get('total', float('nan')) / GiB  # noqa: E731
    per.append(f"sft {g('sft'):.2f} GiB, congrpo {g('congrpo'):.2f} GiB ({r['devices']} "
               f"device{'s' if r['devices'] > 1 else ''})")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'config': args.config, 'set': args.set, 'preset': args.preset, 'results': results}, f, indent=1)
  sys.stdout.write(f'{label} per device: ' + '; '.join(per) + '\n')
  return 0
