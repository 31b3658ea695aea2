"""Rebuilding a policy to evaluate (``--config=eval``): a finished run directory or a local HF checkpoint.

A run directory is rebuilt exactly as it was trained, from its own ``config.json``: the base model (preset or
checkpoint), the finished SFT checkpoint (``checkpoints/sft``, marked done) and, for a Con-GRPO run, the latest
``checkpoints/congrpo`` step on top of the merged SFT weights. The frozen-base fingerprint stored in every
checkpoint makes a mismatch (another dataset, tokenizer or preset) fail loudly.
"""

from __future__ import annotations

import json
import logging
import os

import ml_collections
from flax import nnx

from medad_jax.rl import update as U
from medad_jax.train import pipeline as pl

log = logging.getLogger(__name__)

# Blocks of the eval config that replace the trained run's when a run directory is evaluated.
EVAL_BLOCKS = ('eval', 'judge', 'mesh', 'sampling')


def training_config(workdir: str, eval_config) -> ml_collections.ConfigDict:
  """The run's own ``config.json`` with the evaluation settings (``EVAL_BLOCKS``) of ``eval_config``."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'config.workdir = {workdir!r}: no config.json (not a run directory of medad_jax.launch)')
  with open(path) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  if cfg.get('stage') not in ('sft', 'congrpo'):
    raise ValueError(f'{path}: stage {cfg.get("stage")!r} is not a training run (expected sft or congrpo)')
  for k in EVAL_BLOCKS:
    if k in eval_config:
      cfg[k] = eval_config[k]
  return cfg


def policy_from_run(run: pl.Run):
  """-> ``(model, graphdef, weights, judge_adapters, name)`` of the run in ``run.workdir``."""
  from medad_jax.checkpointing import Checkpointer
  from medad_jax.train import congrpo, sft
  config = run.config
  sft_res = sft.restore_finished(run, run.workdir) if config.sft.enabled else None
  rl_dir = os.path.join(run.workdir, 'checkpoints', congrpo.STAGE)
  if config.stage == 'congrpo' and config.rl.enabled and os.path.isdir(rl_dir):
    base = U.merge_model(sft_res.graphdef, sft_res.state) if sft_res else pl.build_model(config, run.model_cfg,
                                                                                         config.seed)
    graphdef, state, _, _ = congrpo.init_state(run, base, congrpo.num_steps(config, len(pl.rl_records(run))))
    ckpt = Checkpointer(rl_dir, keep=config.ckpt.keep)
    try:
      out = ckpt.restore_latest(state)
    finally:
      ckpt.close()
    if out is None:
      raise ValueError(f'{rl_dir}: no Con-GRPO checkpoint to evaluate')
    state, _, meta = out
    if not meta.get('done'):
      log.warning('%s: evaluating an unfinished Con-GRPO run (rollout step %s)', rl_dir, meta.get('rollout_step'))
    model = U.merge_model(graphdef, state)
    name = 'SFT + Con-GRPO' if sft_res else 'Con-GRPO (RL-only)'
    return model, graphdef, (lambda: (state.params, state.frozen)), False, name
  if sft_res is None:
    raise ValueError(f'{run.workdir}: neither a finished SFT nor a Con-GRPO checkpoint to evaluate')
  model = U.merge_model(sft_res.graphdef, sft_res.state)
  graphdef, st = nnx.split(model)
  return model, graphdef, (lambda: (st,)), True, 'SFT'


def policy_from_hf(run: pl.Run):
  """A local HF Qwen2.5-VL directory (``eval.hf_dir``), judged by itself when the judge is ``local``."""
  from medad_jax.model.checkpoint import load_checkpoint
  path = run.config.eval.hf_dir
  model, _ = load_checkpoint(path, cfg=run.model_cfg)
  graphdef, st = nnx.split(model)
  return model, graphdef, (lambda: (st,)), True, os.path.basename(os.path.normpath(path))


def policy_for_eval(run: pl.Run):
  if run.config.eval.policy == 'hf':
    return policy_from_hf(run)
  return policy_from_run(run)
