"""The GRPO variants through the sampler and the jitted update on a tiny model: the temperature question (the ratio
is taken under the distribution the rollouts were drawn from), the fp32 rollout-update mismatch (~0), and GSPO,
Dr. GRPO, overlong penalty and TIS combined in one compiled update."""

import jax
import numpy as np
from flax import nnx

from medad_jax.model.lora import LoraConfig, apply_lora
from medad_jax.model.qwen25vl import Qwen25VL
from medad_jax.rl import update as U
from medad_jax.sampling.ops import SamplingConfig
from medad_jax.sampling.prompts import prepare_prompts
from medad_jax.sampling.sampler import sample
from medad_jax.testing.multiprocess import tiny_cfg

P, G, N = 2, 4, 6
TOL = 1e-4  # whole-model fp32 tolerance (project rule)
T_SAMPLE = 0.7


def _setup():
  cfg = tiny_cfg()
  model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  apply_lora(model, LoraConfig(rank=4, alpha=8.0))
  rng = np.random.default_rng(0)
  rows = [np.array([cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id]
                   + rng.integers(0, 200, size=3 + p).tolist(), np.int32) for p in range(P)]
  pixels = rng.normal(size=(P * 16, cfg.vision.patch_dim)).astype(np.float32)
  prompts = prepare_prompts(cfg, rows, pixel_values=pixels, image_grid_thw=np.array([[1, 4, 4]] * P))
  return cfg, model, prompts


def _rollout(graphdef, state, prompts, temperature, seed=0):
  scfg = SamplingConfig(max_new_tokens=N, temperature=temperature)
  return jax.device_get(sample(U.merge_model(graphdef, state), prompts, key=jax.random.PRNGKey(seed), config=scfg,
                               num_samples=G))


def test_ratio_is_under_the_sampling_distribution():
  """Rollouts at T = 0.7: the sampler's sampling-distribution log-probs equal the update's teacher-forced ones at
  ``GRPOConfig.temperature = 0.7`` (ratio 1, mismatch ~0), while the temperature-1 log-probs differ by O(0.1):
  computing the ratio at T = 1 against rollouts drawn at 0.7 would be off-policy by that much at every step."""
  cfg, model, prompts = _setup()
  tx, _ = U.make_optimizer(1e-3)
  graphdef, state = U.init_train_state(model, tx)
  roll = _rollout(graphdef, state, prompts, T_SAMPLE)
  batch = U.put_batch(U.rollout_batch(prompts, roll, np.linspace(0, 1, P * G)), None)
  at_t = U.rollout_logprobs(graphdef, state.params, state.frozen, batch, group_size=G, temperature=T_SAMPLE)
  m = np.asarray(roll.completion_mask_BN)
  assert np.max(np.abs(np.asarray(at_t) - roll.sampling_logprobs_BN)[m]) < TOL
  # The temperature-1 log-probs the sampler also records (test_rl_loop checks the update reproduces those at T=1).
  assert np.mean(np.abs(roll.sampling_logprobs_BN - roll.policy_logprobs_BN)[m]) > 0.05
  # GRPOConfig.from_config takes the sampling temperature; the trainer then uses the sampling log-probs.
  from configs import common
  c = common.load('congrpo', ['sampling.temperature=0.7'])
  assert U.GRPOConfig.from_config(c.rl, c.sampling).temperature == T_SAMPLE
  assert U.GRPOConfig.from_config(common.load('congrpo').rl, common.load('congrpo').sampling).temperature == 1.0


def test_variants_combined_in_one_update():
  """GSPO + overlong penalty + TIS at T = 0.7 in one compiled update (two steps, one trace), through the trainer's
  helper that picks the old log-probs; in fp32 the recomputed old log-probs equal the sampler's, so the TIS weights
  are 1 and the mismatch ~0."""
  cfg, model, prompts = _setup()
  tx, _ = U.make_optimizer(1e-2)
  graphdef, state = U.init_train_state(model, tx)
  gcfg = U.GRPOConfig(group_size=G, beta=0.04, loss='gspo', temperature=T_SAMPLE, overlong_penalty=1.0,
                      overlong_buffer=3, tis_cap=2.0)
  update = U.make_congrpo_update(graphdef, tx, gcfg)
  from medad_jax.train.congrpo import _rollout_logprobs_for_variants
  for step in range(2):
    roll = _rollout(graphdef, state, prompts, T_SAMPLE, seed=step)
    b = U.rollout_batch(prompts, roll, np.arange(P * G) % 3 / 2.0)
    _rollout_logprobs_for_variants(b, roll, gcfg, graphdef, state, None)
    assert 'sampler_logp_BN' in b
    state, met = update(state, U.put_batch(b, None))
    met = {k: float(v) for k, v in met.items()}
    assert all(np.isfinite(v) for v in met.values()), met
    assert met['logp_mismatch'] < TOL and abs(met['tis_weight_mean'] - 1) < 10 * TOL
    lengths = np.asarray(roll.completion_mask_BN).sum(1)
    want = np.clip((N - 3 - lengths) / 3, -1, 0).mean()  # overlong penalty over the last 3 of 6 tokens
    assert abs(met['overlong_penalty'] - want) < 1e-6
    assert abs(met["ratio_max"] - 1) < 10 * TOL  # GSPO sequence ratio 1 at the rollout params
  assert update.traces == 1
