"""Parity demo: ``python -m medad_jax.demo [--workdir DIR] [--preset tiny|small]``.

Builds a random Qwen2.5-VL checkpoint with ``transformers`` (PyTorch, CPU) using the *real* Qwen2 vocabulary and
special-token ids (so the real processor and tokenizer apply), writes it with ``save_pretrained``, loads it with
:class:`medad_jax.api.Policy`, and reports, for a synthetic medical-like image and a question:

* the largest absolute logit difference between Flax and PyTorch over the whole prompt;
* the greedy continuation from both (random weights: the text is noise, but it must be the same noise).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np

log = logging.getLogger('medad_jax.demo')


def _demo_config(preset: str):
  from medad_jax.model.config import Qwen25VLConfig, TextConfig
  base = Qwen25VLConfig.preset(preset)
  # The real tokenizer's vocabulary and special ids (Qwen2.5-VL-3B), on a small body.
  text = TextConfig(**{**base.text.__dict__, 'vocab_size': 151936})
  return Qwen25VLConfig.qwen2_5_vl_3b().replace(text=text, vision=base.vision)


def _image(size: int = 224):
  from PIL import Image, ImageDraw
  rng = np.random.default_rng(0)
  arr = (rng.normal(90, 20, (size, size)).clip(0, 255)).astype(np.uint8)
  img = Image.fromarray(arr).convert('RGB')
  d = ImageDraw.Draw(img)
  d.ellipse([size * 0.1, size * 0.15, size * 0.9, size * 0.85], outline=(200, 200, 200), width=3)
  d.ellipse([size * 0.25, size * 0.25, size * 0.4, size * 0.4], fill=(235, 235, 235))  # a bright lesion
  return img


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--workdir', default=None, help='where the random checkpoint is written (default: a temp dir)')
  ap.add_argument('--preset', default='tiny', choices=['tiny', 'small'])
  ap.add_argument('--max-new-tokens', type=int, default=16)
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stdout)

  import torch
  from medad_jax.api import Policy
  from medad_jax.testing.hf import save_hf_checkpoint

  cfg = _demo_config(args.preset)
  workdir = args.workdir or tempfile.mkdtemp(prefix='medad_demo_')
  ckpt = os.path.join(workdir, 'qwen2_5_vl_random')
  t0 = time.time()
  ref = save_hf_checkpoint(cfg, ckpt, seed=0)
  log.info('[1/4] random %s Qwen2.5-VL checkpoint (%.1fM params) written to %s (%.1fs)', args.preset,
           sum(p.numel() for p in ref.parameters()) / 1e6, ckpt, time.time() - t0)

  t0 = time.time()
  policy = Policy.from_pretrained(ckpt, min_pixels=224 * 224, max_pixels=224 * 224)
  log.info('[2/4] loaded into Flax with the offline Qwen2 tokenizer (%.1fs)', time.time() - t0)

  image, question = _image(), 'Which region of the image contains the lesion?\nA. Left Upper\nB. Right Upper'
  batch = policy.inputs(image, question)
  t0 = time.time()
  ours = policy.logits(image, question)
  with torch.no_grad():
    mm = torch.tensor(policy.processor(image, question)['mm_token_type_ids'][None].astype(np.int64))
    theirs = ref(input_ids=torch.tensor(batch['input_ids'].astype(np.int64)),
                 attention_mask=torch.tensor(batch['attention_mask'].astype(np.int64)),
                 pixel_values=torch.tensor(batch['pixel_values']),
                 image_grid_thw=torch.tensor(batch['image_grid_thw'].astype(np.int64)),
                 mm_token_type_ids=mm).logits[0].numpy()
  diff = float(np.abs(ours - theirs).max())
  log.info('[3/4] prompt of %d tokens (%d image tokens): max |logits_flax - logits_torch| = %.2e (%.1fs)',
           ours.shape[0], int((batch['input_ids'] == cfg.image_token_id).sum()), diff, time.time() - t0)

  t0 = time.time()
  text_ours = policy.answer(image, question, max_new_tokens=args.max_new_tokens)
  with torch.no_grad():
    gen = ref.generate(input_ids=torch.tensor(batch['input_ids'].astype(np.int64)),
                       attention_mask=torch.tensor(batch['attention_mask'].astype(np.int64)),
                       pixel_values=torch.tensor(batch['pixel_values']),
                       image_grid_thw=torch.tensor(batch['image_grid_thw'].astype(np.int64)),
                       mm_token_type_ids=mm, max_new_tokens=args.max_new_tokens, do_sample=False)
  new = gen[0, batch['input_ids'].shape[1]:].tolist()
  eos = set(cfg.eos_token_ids)
  new = new[:next((i for i, t in enumerate(new) if t in eos), len(new))]
  text_theirs = policy.processor.tokenizer.decode(new, skip_special_tokens=True)
  same = text_ours == text_theirs
  log.info('[4/4] greedy %d tokens (%.1fs)\n  flax : %r\n  torch: %r\n  identical: %s', args.max_new_tokens,
           time.time() - t0, text_ours, text_theirs, same)
  ok = diff <= 1e-4 and same
  log.info('PARITY %s', 'OK' if ok else 'FAILED')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
