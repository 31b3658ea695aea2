"""The local judge's option scoring: our shared-context scorer vs transformers on the full rows, same weights.

    python -m medad_jax.bench judge                 # the mini preset, 32 prompts x 4 options (one eval batch)
    python -m medad_jax.bench judge --prompts 64 --repeats 5

What is timed is one call of the embedded run's judge (``judge.prompt_format='policy'``, ``data.answer_format=
'option'``): for each of ``--prompts`` (question, thought) pairs -- medad-synth questions and their written
thoughts, option-text format -- the summed log-prob of each option's ``{text}</answer>`` after ``<answer>``.
Ours (:class:`medad_jax.judge.flax_scorer.FlaxLetterScorer`) runs each prompt's context once and scores its K
continuations against it as a shared prefix. The peer is the plain way: transformers' ``Qwen2_5_VLForConditionalGeneration``
(fp32, ``torch.no_grad``) over the N x K full rows ``context + option + </answer>``, left-padded into one batch,
log-softmax at the continuation's positions. Both get the same random weights (the ``mini`` preset built by
transformers and loaded into ours with the checkpoint table) and the same token ids; the two score tables must
agree, or the benchmark fails: the same verdict (argmax) for every prompt, and each score within 1e-5 of its size
(with random weights a score is a sum of ~5 log-probs of ~-20 nats each, so float32 rounding alone is ~1e-4 nats
absolute: transformers on the same rows with other padding moves them by up to 2.3e-4).

Reported: seconds per call (best of ``--repeats``, the two sides taking turns, after one warm-up call each that
also compiles ours), the ratio, and the token-forwards each side computes (padding included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

import numpy as np
from flax import nnx

from medad_jax.bench import common

log = logging.getLogger(__name__)

RTOL = 1e-5  # relative to each summed score (see the module docstring)
LETTERS = ('A', 'B', 'C', 'D')


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m medad_jax.bench judge', description=__doc__.split('\n')[0])
  p.add_argument('--prompts', type=int, default=32, help='(question, thought) pairs per call (eval.batch_size)')
  p.add_argument('--repeats', type=int, default=3, help='timed calls per side (best is reported)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--peak-size', type=int, default=2048, help='matrix side of the matmul-peak measurement')
  p.add_argument('--json', default=None, help='also write the results to this JSON file')
  return p.parse_args(argv)


def judge_inputs(n: int, seed: int):
  """``(tokenizer, judge prompts)``: ``n`` medad-synth questions with their written thoughts (option format) and a
  small tokenizer trained on them, as the embedded run trains its own."""
  from medad_jax.data import synth
  from medad_jax.data.schema import format_question
  from medad_jax.judge import build_judge_prompt
  from medad_jax.tokenizer import train_small_tokenizer
  from medad_jax.train.pipeline import corpus_texts
  cfg = synth.SynthConfig(num_images=-(-n // 5) + 8, seed=seed, image_size=84, cot_letters=False)
  records = [r for _, rs in synth.generate(cfg) for r in rs]
  tok = train_small_tokenizer(corpus_texts(records, 'option'), vocab_size=2048)
  picked = records[:n]
  return tok, [build_judge_prompt(format_question(r), r.cot) for r in picked]


def peer_scorer(tm, scorer, prompts):
  """transformers over the N x K full rows (the ids our scorer would score) -> ``(fn, token-forwards)``."""
  import torch
  from medad_jax.judge.flax_scorer import policy_prompt
  from medad_jax.judge.prompt import parse_options, split_judge_prompt
  from medad_jax.rewards import ANSWER_CLOSE
  tok, cfg = scorer.tokenizer, scorer.cfg
  rows, conts = [], []
  for p in prompts:
    question, thought = split_judge_prompt(p)
    context = policy_prompt(question, thought)
    for option in parse_options(question):
      enc = tok(context + option.strip() + ANSWER_CLOSE, add_special_tokens=False, return_offsets_mapping=True)
      rows.append(list(enc['input_ids']))
      conts.append(sum(1 for _, end in enc['offset_mapping'] if end > len(context)))
  T = max(map(len, rows))
  ids = np.full((len(rows), T), cfg.pad_token_id, np.int64)
  mask = np.zeros((len(rows), T), np.int64)
  for i, r in enumerate(rows):
    ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
  kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            mm_token_type_ids=torch.zeros_like(torch.from_numpy(ids)))
  cont = np.zeros((len(rows), T), bool)
  for i, c in enumerate(conts):
    cont[i, T - c:] = True

  def fn() -> np.ndarray:
    with torch.no_grad():
      logp = torch.log_softmax(tm(**kw).logits[:, :-1].float(), dim=-1)
      tok_lp = torch.gather(logp, 2, kw['input_ids'][:, 1:, None])[..., 0].numpy()
    return np.where(cont[:, 1:], tok_lp, 0.0).sum(1).reshape(len(prompts), len(LETTERS))

  return fn, ids.size


def main(argv: list[str]) -> int:
  common.setup_logging()
  args = parse_args(argv)
  import torch  # noqa: F401  (loaded before the summary so its thread count is shown)
  from medad_jax.judge.flax_scorer import FlaxLetterScorer
  from medad_jax.model.checkpoint import load_hf_tensors
  from medad_jax.model.config import Qwen25VLConfig
  from medad_jax.model.qwen25vl import Qwen25VL
  from medad_jax.testing.hf import build_hf_model
  from medad_jax.tokenizer import config_for_tokenizer
  log.info('measuring the matmul peak')
  peak = common.matmul_peak_flops(args.peak_size)
  common.emit(f'machine: {common.machine_summary()}\nmeasured fp32 matmul peak (jax, {args.peak_size}^3): '
              f'{peak / 1e9:.1f} GFLOP/s')
  log.info('building %d judge prompts and their tokenizer', args.prompts)
  tok, prompts = judge_inputs(args.prompts, args.seed)
  cfg = config_for_tokenizer(Qwen25VLConfig.mini(), tok)
  tm = build_hf_model(cfg, args.seed)
  ours = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  load_hf_tensors(ours, {k: v.detach().numpy() for k, v in tm.state_dict().items()}, where='benchmark model')
  graphdef, state = nnx.split(ours)
  scorer = FlaxLetterScorer(graphdef, lambda: (state,), tok, cfg, adapters=True, prompt_format='policy',
                            answer_format='option')
  enc = scorer.encode_options(prompts, LETTERS)
  our_tokens = enc['ids_NT'].size + enc['own_BC'].size
  peer, peer_tokens = peer_scorer(tm, scorer, prompts)
  log.info('warm-up (compiles ours)')
  t0 = time.perf_counter()
  got = scorer(prompts, LETTERS)
  compile_s = time.perf_counter() - t0
  want = peer()
  err = float(np.max(np.abs(got - want)))
  rel = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0)))
  if not rel <= RTOL or (got.argmax(1) != want.argmax(1)).any():
    raise SystemExit(f'our scores differ from transformers by {rel:.3g} of their size (> {RTOL}) or in a verdict: '
                     'the comparison is void')
  times = {'ours': [], 'transformers': []}
  for _ in range(args.repeats):
    for name, fn in (('ours', lambda: scorer(prompts, LETTERS)), ('transformers', peer)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  o, h = min(times['ours']), min(times['transformers'])
  res = dict(params=common.param_count(cfg), prompts=args.prompts, options=len(LETTERS), ours_s=o,
             transformers_s=h, speedup=h / o, compile_and_first_s=compile_s, max_abs_diff=err, max_rel_diff=rel,
             ours_token_forwards=int(our_tokens), transformers_token_forwards=int(peer_tokens),
             context_bucket=int(enc['ids_NT'].shape[1]), own_tokens=int(enc['own_BC'].shape[1]))
  rows = [
      common.Row('judge call (N prompts x K options)', o, h, 's', higher_is_better=False),
      common.Row('token-forwards computed (padding incl.)', our_tokens, peer_tokens, 'tokens', higher_is_better=False),
      common.Row('  our compile + first call', compile_s, None, 's'),
      common.Row('max |score difference|', err, None, 'nats'),
      common.Row('  relative to the score', rel, None, ''),
  ]
  title = (f'judge [mini: {res["params"] / 1e6:.1f}M params] {args.prompts} prompts x {len(LETTERS)} options; ours: '
           f'context bucket {res["context_bucket"]} once per prompt + {res["own_tokens"]} own tokens per option')
  common.emit(common.format_table(title, rows, peer_name='transformers'))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(common.to_jsonable(dict(argv=argv, machine=common.machine_summary(), result=res)), f, indent=2)
  return 0
