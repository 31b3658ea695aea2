"""Rollout throughput: our compiled sampler vs transformers ``generate`` on the same weights and inputs.

    python -m medad_jax.bench sampler                      # tiny + medium (~55M), 8 prompts x G=8, 64 new tokens
    python -m medad_jax.bench sampler --configs small --new-tokens 128 --image-size 448

Both sides get the same Qwen2.5-VL config and weights (a random-weight transformers model, loaded into ours with
the checkpoint table), the same batch: ``--prompts`` prompts with one ``--image-size`` image each and
``--text-tokens`` text tokens, ``--group`` samples per prompt, exactly ``--new-tokens`` new tokens per sample
(no stop tokens on our side, ``min_new_tokens = max_new_tokens`` on theirs), plain sampling (temperature 1, no
top-k / top-p), KV cache on. transformers draws the group with ``num_return_sequences`` (it repeats the image and
the prompt G times, as TRL / VLM-R1 rollouts do); ours prefills every prompt once and its G samples share that
cache (each decode step reads a prompt's keys once, not G times: the decoder's shared ``prefix``, ``model/text.py``). Our prompts are
left-padded to the sampler's length bucket and that padding is computed (and counted against us).

Reported: tokens/s of each (``prompts x G x new tokens / wall seconds`` of one whole rollout, best of
``--repeats``, the two sides taking turns, after one warm-up rollout each that also compiles ours), the ratio,
and our prefill / decode achieved FLOP/s against the measured matmul peak (model FLOPs of the real tokens, see
``common.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import jax
import numpy as np
from flax import nnx

from medad_jax.bench import common
from medad_jax.model.config import Qwen25VLConfig, TextConfig
from medad_jax.sampling import SamplingConfig, prepare_prompts
from medad_jax.sampling import sampler as sampler_lib

log = logging.getLogger(__name__)


def medium() -> Qwen25VLConfig:
  """``small`` with 16 decoder layers: ~55M parameters, where matmuls (not dispatch) dominate on a CPU."""
  s = Qwen25VLConfig.small()
  return s.replace(text=TextConfig(**{**s.text.__dict__, 'num_layers': 16}))


PRESETS = {'tiny': Qwen25VLConfig.tiny, 'small': Qwen25VLConfig.small, 'medium': medium}


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m medad_jax.bench sampler', description=__doc__.split('\n')[0])
  p.add_argument('--configs', default='tiny,medium', help=f'comma-separated presets from {sorted(PRESETS)}')
  p.add_argument('--prompts', type=int, default=8)
  p.add_argument('--group', type=int, default=8, help='samples per prompt (G)')
  p.add_argument('--new-tokens', type=int, default=64)
  p.add_argument('--image-size', type=int, default=224, help='square image side in pixels (multiple of 28)')
  p.add_argument('--text-tokens', type=int, default=48, help='text tokens per prompt besides the image')
  p.add_argument('--repeats', type=int, default=2, help='timed rollouts per side (best is reported)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--peak-size', type=int, default=2048, help='matrix side of the matmul-peak measurement')
  p.add_argument('--json', default=None, help='also write the results to this JSON file')
  return p.parse_args(argv)


def make_inputs(cfg: Qwen25VLConfig, prompts: int, image_size: int, text_tokens: int, seed: int) -> dict:
  """``prompts`` equal-length prompts ``<vision_start> image <vision_end> text`` with random pixels (numpy)."""
  unit = cfg.vision.patch_size * cfg.vision.spatial_merge_size
  if image_size % unit:
    raise ValueError(f'--image-size {image_size} must be a multiple of patch_size * merge = {unit}')
  side = image_size // cfg.vision.patch_size
  grid = np.array([[1, side, side]] * prompts, np.int64)
  n_img = side * side // cfg.vision.spatial_merge_size**2
  rng = np.random.default_rng(seed)
  text = rng.integers(0, cfg.text.vocab_size - 8, (prompts, text_tokens))
  ids = np.concatenate([np.full((prompts, 1), cfg.vision_start_token_id), np.full((prompts, n_img), cfg.image_token_id),
                        np.full((prompts, 1), cfg.vision_end_token_id), text], 1).astype(np.int64)
  pixels = rng.normal(size=(prompts * side * side, cfg.vision.patch_dim)).astype(np.float32)
  return dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=pixels, image_grid_thw=grid)


def build_models(cfg: Qwen25VLConfig, seed: int):
  """(transformers model, our model) with identical weights."""
  from medad_jax.model.checkpoint import load_hf_tensors
  from medad_jax.model.qwen25vl import Qwen25VL
  from medad_jax.testing.hf import build_hf_model

  tm = build_hf_model(cfg, seed)
  ours = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  load_hf_tensors(ours, {k: v.detach().numpy() for k, v in tm.state_dict().items()}, where='benchmark model')
  return tm, ours


def ours_rollout(model, cfg: Qwen25VLConfig, inputs: dict, args):
  """``(rollout fn, phase timer)`` for our sampler; the first call compiles."""
  batch = prepare_prompts(cfg, inputs['input_ids'], attention_mask=inputs['attention_mask'],
                          pixel_values=inputs['pixel_values'], image_grid_thw=inputs['image_grid_thw'])
  config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
  key = jax.random.key(args.seed)

  def rollout():
    r = jax.block_until_ready(sampler_lib.sample(model, batch, key=key, config=config, num_samples=args.group))
    lengths = np.asarray(r.lengths_B)
    if not (lengths == args.new_tokens).all():
      raise RuntimeError(f'our rollout lengths {sorted(set(lengths.tolist()))} != --new-tokens {args.new_tokens}')

  def phases() -> dict:
    """Best-of-``repeats`` seconds of the prefill alone and of the decode alone (compiled already)."""
    graphdef, state = nnx.split(model)
    b = jax.device_put(batch)
    prefill = lambda: sampler_lib.prefill(graphdef, state, b.input_ids_PT, b.attention_mask_PT,  # noqa: E731
                                          b.positions_3PT, b.pixel_values_ILC, b.vision_meta_I, b.image_src_PT)
    cache, logits = prefill()
    decode = lambda: sampler_lib.decode(graphdef, state, cache, logits, b.rope_deltas_P, b.done_P, key,  # noqa: E731
                                        config=config, num_samples=args.group)
    return dict(prefill_s=min(common.time_call(prefill, repeats=args.repeats, warmup=0)),
                decode_s=min(common.time_call(decode, repeats=args.repeats, warmup=0)))

  return rollout, phases, batch.prompt_len


def transformers_rollout(tm, cfg: Qwen25VLConfig, inputs: dict, args):
  """A rollout fn for transformers ``generate`` (sampling, KV cache, ``num_return_sequences = G``)."""
  import torch

  kw = {k: torch.from_numpy(v) for k, v in inputs.items()}
  kw['mm_token_type_ids'] = (kw['input_ids'] == cfg.image_token_id).long()
  gen = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=args.group,
             eos_token_id=list(cfg.eos_token_ids), pad_token_id=cfg.pad_token_id, use_cache=True)
  want = (args.prompts * args.group, inputs['input_ids'].shape[1] + args.new_tokens)
  torch.manual_seed(args.seed)

  def rollout():
    with torch.no_grad():
      out = tm.generate(**kw, **gen, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    if tuple(out.shape) != want:
      raise RuntimeError(f'transformers returned {tuple(out.shape)}; expected {want}')

  return rollout


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
  """Best-of-``repeats`` seconds per fn, the fns taking turns so a load burst on the shared CPU hits both."""
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  return {k: min(v) for k, v in times.items()}


def flops(cfg: Qwen25VLConfig, args, prompt_tokens: int) -> tuple[float, float]:
  """Model FLOPs of our prefill (P prompts, once each) and of our decode (``P*G`` rows, ``N - 1`` forwards)."""
  side = args.image_size // cfg.vision.patch_size
  prefill = args.prompts * (common.vision_flops(cfg.vision, side * side)
                            + common.text_flops(cfg.text, prompt_tokens, prompt_tokens, lm_head_tokens=1))
  rows = args.prompts * args.group
  decode = rows * sum(common.text_flops(cfg.text, 1, prompt_tokens + s + 1) for s in range(args.new_tokens - 1))
  return prefill, decode


def bench_config(name: str, cfg: Qwen25VLConfig, args, peak: float) -> dict:
  inputs = make_inputs(cfg, args.prompts, args.image_size, args.text_tokens, args.seed)
  T = inputs['input_ids'].shape[1]
  log.info('%s: %.1fM parameters, prompt %d tokens, building both models', name, common.param_count(cfg) / 1e6, T)
  tm, ours = build_models(cfg, args.seed)
  ours_fn, ours_phases, bucket = ours_rollout(ours, cfg, inputs, args)
  peer_fn = transformers_rollout(tm, cfg, inputs, args)
  log.info('%s: warm-up (compiles ours)', name)
  t0 = time.perf_counter()
  ours_fn()
  compile_s = time.perf_counter() - t0
  peer_fn()
  log.info('%s: %d timed rollouts each, interleaved', name, args.repeats)
  best = interleaved({'ours': ours_fn, 'transformers': peer_fn}, args.repeats)
  o = dict(seconds=best['ours'], compile_and_first_s=compile_s, prompt_bucket=bucket, **ours_phases())
  h = dict(seconds=best['transformers'])
  n_tok = args.prompts * args.group * args.new_tokens
  f_pre, f_dec = flops(cfg, args, T)
  res = dict(config=name, params=common.param_count(cfg), prompt_tokens=T, prompt_bucket=o['prompt_bucket'],
             prompts=args.prompts, group=args.group, new_tokens=args.new_tokens, ours=o, transformers=h,
             ours_tokens_per_s=n_tok / o['seconds'], transformers_tokens_per_s=n_tok / h['seconds'],
             speedup=h['seconds'] / o['seconds'], prefill_flops_per_s=f_pre / o['prefill_s'],
             decode_flops_per_s=f_dec / o['decode_s'], matmul_peak_flops_per_s=peak)
  rows = [
      common.Row('rollout tokens/s', res['ours_tokens_per_s'], res['transformers_tokens_per_s'], 'tok/s'),
      common.Row('rollout wall time', o['seconds'], h['seconds'], 's', higher_is_better=False),
      common.Row('  our prefill (P prompts once)', o['prefill_s'], None, 's'),
      common.Row('  our decode (P*G rows)', o['decode_s'], None, 's'),
      common.Row('  our compile + first rollout', o['compile_and_first_s'], None, 's'),
      common.Row('prefill achieved FLOP/s', res['prefill_flops_per_s'], None, 'FLOP/s'),
      common.Row('  fraction of matmul peak', res['prefill_flops_per_s'] / peak, None, ''),
      common.Row('decode achieved FLOP/s', res['decode_flops_per_s'], None, 'FLOP/s'),
      common.Row('  fraction of matmul peak', res['decode_flops_per_s'] / peak, None, ''),
  ]
  title = (f'sampler [{name}: {res["params"] / 1e6:.1f}M params] {args.prompts} prompts x G={args.group}, '
           f'prompt {T} tokens (bucket {o["prompt_bucket"]}, image {args.image_size}px), {args.new_tokens} new tokens')
  common.emit(common.format_table(title, rows, peer_name='transformers'))
  return res


def main(argv: list[str]) -> int:
  common.setup_logging()
  args = parse_args(argv)
  names = [n.strip() for n in args.configs.split(',') if n.strip()]
  unknown = [n for n in names if n not in PRESETS]
  if unknown:
    raise SystemExit(f'--configs: unknown preset(s) {unknown}; choose from {sorted(PRESETS)}')
  import torch  # noqa: F401  (loaded before the summary so its thread count is shown)
  log.info('measuring the matmul peak')
  peak = common.matmul_peak_flops(args.peak_size)
  common.emit(f'machine: {common.machine_summary()}\nmeasured fp32 matmul peak (jax, {args.peak_size}^3): '
              f'{peak / 1e9:.1f} GFLOP/s')
  results = [bench_config(n, PRESETS[n](), args, peak) for n in names]
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(common.to_jsonable(dict(argv=argv, machine=common.machine_summary(), results=results)), f, indent=2)
  return 0
