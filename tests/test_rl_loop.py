"""A short on-policy Con-GRPO loop on a tiny model: the sampler draws G completions per image prompt, a host reward
scores them, the jitted update learns. The reward goes up, and the update's teacher-forced log-probs of the sampled
tokens equal the sampler's (same prompt embedding, positions and cache), so the first-step ratio is 1."""

import dataclasses

import jax
import numpy as np
from flax import nnx

from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.lora import DEFAULT_PATTERN, LoraConfig, apply_lora
from medad_jax.model.qwen25vl import Qwen25VL
from medad_jax.rl import update as U
from medad_jax.sampling.ops import SamplingConfig
from medad_jax.sampling.prompts import prepare_prompts
from medad_jax.sampling.sampler import sample

P, G, N = 4, 8, 8
TOL = 1e-4  # whole-model fp32 tolerance (project rule)


def tiny_cfg() -> Qwen25VLConfig:
  base = Qwen25VLConfig.tiny()
  return base.replace(text=dataclasses.replace(base.text, num_layers=1),
                      vision=dataclasses.replace(base.vision, depth=1, fullatt_block_indexes=(0,)))


def prompts(cfg):
  rng = np.random.default_rng(0)
  grid = np.array([[1, 4, 4]] * P)   # 4 image tokens per prompt
  rows = []
  for p in range(P):
    text = rng.integers(0, 200, size=3 + p).tolist()
    rows.append(np.array([cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id] + text,
                         np.int32))
  pixels = rng.normal(size=(P * 16, cfg.vision.patch_dim)).astype(np.float32)
  return prepare_prompts(cfg, rows, pixel_values=pixels, image_grid_thw=grid)


def reward(tokens_BN, mask_BN, vocab):
  """Fraction of completion tokens in the lowest quarter of the vocabulary (a chance policy scores ~0.25)."""
  hit = (tokens_BN < vocab // 4) & mask_BN
  return hit.sum(1) / np.maximum(mask_BN.sum(1), 1)


def test_short_congrpo_run_raises_the_reward_and_matches_sampler_logprobs():
  cfg = tiny_cfg()
  model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  # The head is adapted too: the tiny random model's frozen head (std 0.02) behind the final RMSNorm cannot move
  # much probability onto a quarter of the vocabulary through the hidden state alone.
  apply_lora(model, LoraConfig(rank=8, alpha=16.0, pattern=f'(?:{DEFAULT_PATTERN})|^lm_head$'))
  tx, _ = U.make_optimizer(1e-2, max_grad_norm=1.0)
  graphdef, state = U.init_train_state(model, tx)
  update = U.make_congrpo_update(graphdef, tx, U.GRPOConfig(group_size=G, beta=0.04))
  batch_p = prompts(cfg)
  scfg = SamplingConfig(max_new_tokens=N, temperature=1.0)
  key = jax.random.PRNGKey(0)
  rewards, diffs, ratio_dev = [], [], []
  for it in range(15):
    policy = U.merge_model(graphdef, state)   # rebuilt every step: the update donates the old state
    roll = sample(policy, batch_p, key=jax.random.fold_in(key, it), config=scfg, num_samples=G)
    r = reward(np.asarray(roll.tokens_BN), np.asarray(roll.completion_mask_BN), cfg.text.vocab_size)
    rewards.append(float(r.mean()))
    state, met = update(state, U.put_batch(U.rollout_batch(batch_p, roll, r), None))
    diffs.append(abs(float(met['logp_old_diff'])))
    ratio_dev.append(max(abs(float(met['ratio_max']) - 1), abs(float(met['ratio_min']) - 1)))
  assert update.traces == 1
  # Sampler and update agree on pi_old: the ratio starts at exactly 1 (up to float32 round-off).
  assert max(diffs) < TOL and max(ratio_dev) < 10 * TOL, (diffs, ratio_dev)
  first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
  assert last > first + 0.15, rewards
