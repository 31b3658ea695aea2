"""Forward throughput: our jitted Qwen2.5-VL forward vs transformers (PyTorch eager) on the same weights.

    python -m medad_jax.bench forward                       # tiny + small presets, 8 prompts, one 224 px image each
    python -m medad_jax.bench forward --configs small --batch 16 --image-size 448

Both sides get the same config and weights (a random-weight transformers model written with ``save_pretrained``
and loaded into ours through the checkpoint table), and the same batch: ``--batch`` prompts, each with one
``--image-size`` image and ``--text-tokens`` text tokens (rows of different lengths, left-padded), fp32, full
logits over every position. PyTorch runs in eval mode under ``torch.inference_mode()`` with its default thread
count; ours is one ``jax.jit`` program (vision tower + decoder + head) compiled in the warm-up.

Reported: prompt tokens/s of each (real, non-pad tokens / wall seconds of one forward, best of ``--repeats``), the
ratio, the max |logits difference| on real positions (so the two sides demonstrably computed the same thing), and
our achieved FLOP/s against the measured matmul peak (model FLOPs, see ``common.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile

import jax
import numpy as np
from flax import nnx

from medad_jax.bench import common
from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.inputs import model_inputs
from medad_jax.testing.inputs import prompt_batch

log = logging.getLogger(__name__)

PRESETS = {'tiny': Qwen25VLConfig.tiny, 'small': Qwen25VLConfig.small}


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m medad_jax.bench forward', description=__doc__.split('\n')[0])
  p.add_argument('--configs', default='tiny,small', help=f'comma-separated presets from {sorted(PRESETS)}')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--image-size', type=int, default=224, help='square image side in pixels (multiple of 28)')
  p.add_argument('--text-tokens', type=int, default=48, help='text tokens per prompt (rows vary by up to 25%%)')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--peak-size', type=int, default=2048)
  p.add_argument('--json', default=None, help='also write the results to this JSON file')
  return p.parse_args(argv)


def _batch(cfg: Qwen25VLConfig, args) -> dict:
  if args.image_size % 28:
    raise SystemExit(f'--image-size {args.image_size} must be a multiple of 28 (patch 14 x merge 2)')
  g = args.image_size // 14
  rows = [[('t', 4), ('img', (1, g, g)), ('t', max(1, args.text_tokens - (i % 4) * args.text_tokens // 16))]
          for i in range(args.batch)]
  return prompt_batch(cfg, rows, seed=0)


def run_one(name: str, args, peak: float) -> dict:
  import torch
  from medad_jax.model.checkpoint import load_checkpoint
  from medad_jax.testing.hf import save_hf_checkpoint

  cfg = PRESETS[name]()
  with tempfile.TemporaryDirectory() as d:
    ref = save_hf_checkpoint(cfg, d, seed=0)
    model, cfg = load_checkpoint(d)
  batch = _batch(cfg, args)
  inputs = model_inputs(cfg, batch)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(**inputs)[0])
  t_ours = min(common.time_call(lambda: fwd(state, inputs), repeats=args.repeats, warmup=1))
  ours = np.asarray(fwd(state, inputs))

  mm = (batch['input_ids'] == cfg.image_token_id).astype(np.int64)
  tin = dict(input_ids=torch.tensor(batch['input_ids']), attention_mask=torch.tensor(batch['attention_mask']),
             pixel_values=torch.tensor(batch['pixel_values']), image_grid_thw=torch.tensor(batch['image_grid_thw']),
             mm_token_type_ids=torch.tensor(mm))
  with torch.inference_mode():
    ref(**tin)  # warm-up
    t_peer = min(common.time_call(lambda: ref(**tin).logits, repeats=args.repeats, warmup=0))
    theirs = ref(**tin).logits.numpy()
  real = batch['attention_mask'].astype(bool)
  diff = float(np.abs(ours - theirs)[real].max())
  scale = float(np.abs(theirs)[real].max())
  n_tok = int(real.sum())
  patches = int(np.prod(batch['image_grid_thw'], axis=-1).sum())
  lens = real.sum(1)
  flops = sum(common.text_flops(cfg.text, int(n), int(n)) for n in lens)
  flops += args.batch * common.vision_flops(cfg.vision, patches // args.batch)
  log.info('%s: %d real tokens, %d patches, ours %.3fs, torch %.3fs, max|dlogits| %.2e', name, n_tok, patches,
           t_ours, t_peer, diff)
  return dict(config=name, params=common.param_count(cfg), batch=args.batch, tokens=n_tok, patches=patches,
              ours_s=t_ours, torch_s=t_peer, ours_tok_s=n_tok / t_ours, torch_tok_s=n_tok / t_peer,
              ratio=t_peer / t_ours, max_abs_logit_diff=diff, max_abs_logit=scale, ours_flops=flops / t_ours, peak_flops=peak,
              mfu=flops / t_ours / peak)


def main(argv) -> int:
  args = parse_args(argv)
  common.setup_logging()
  names = [n.strip() for n in args.configs.split(',') if n.strip()]
  bad = [n for n in names if n not in PRESETS]
  if bad:
    raise SystemExit(f'unknown preset(s) {bad}; choose from {sorted(PRESETS)}')
  import torch
  peak = common.matmul_peak_flops(args.peak_size)
  log.info('machine: %s; matmul peak %.1f GFLOP/s (fp32, %d^3)', common.machine_summary(), peak / 1e9,
           args.peak_size)
  results = []
  for name in names:
    r = run_one(name, args, peak)
    results.append(r)
    rows = [common.Row('prompt tokens/s', r['ours_tok_s'], r['torch_tok_s'], 'tok/s'),
            common.Row('forward wall time', r['ours_s'], r['torch_s'], 's', higher_is_better=False),
            common.Row('achieved FLOP/s (ours)', r['ours_flops'], None, 'FLOP/s'),
            common.Row('fraction of matmul peak (ours)', r['mfu'], None, ''),
            common.Row('max |logits ours - torch|', r['max_abs_logit_diff'], None, ''),
            common.Row('max |logits| (scale)', r['max_abs_logit'], None, '')]
    common.emit(common.format_table(
        f'forward [{name}: {r["params"] / 1e6:.1f}M params, batch {r["batch"]}, {r["tokens"]} tokens, '
        f'{r["patches"]} patches; torch {torch.__version__} eager, {torch.get_num_threads()} threads]', rows,
        'transformers'))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(common.to_jsonable(results), f, indent=2)
  return 0
