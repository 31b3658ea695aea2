"""The jitted Con-GRPO update and SFT step on a tiny Qwen2.5-VL (with images) against plain-JAX references."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.layers import lora_disabled
from medad_jax.model.lora import LoraConfig, apply_lora
from medad_jax.model.qwen25vl import Qwen25VL, continuation_positions
from medad_jax.model.rope_index import rope_index
from medad_jax.model.vision import vision_meta
from medad_jax.rl import update as U
from medad_jax.sharding import make_mesh

P, G, T, N = 2, 4, 12, 6
GRID = np.array([[1, 4, 4]] * P)   # 16 patches -> 4 image tokens per prompt
N_IMG = 4
WHOLE_MODEL_TOL = 1e-4             # fp32 whole-model parity tolerance (project rule)
MESH_TOL = 1e-5                    # the 8-device vs 1-device tolerance


def tiny_cfg() -> Qwen25VLConfig:
  base = Qwen25VLConfig.tiny()
  return base.replace(text=dataclasses.replace(base.text, num_layers=1),
                      vision=dataclasses.replace(base.vision, depth=1, fullatt_block_indexes=(0,)))


def tiny_policy(seed=0, perturb=0.05):
  """A tiny model with LoRA adapters whose ``lora_b`` is non-zero, so the policy differs from the reference."""
  cfg = tiny_cfg()
  model = Qwen25VL(cfg, rngs=nnx.Rngs(seed))
  apply_lora(model, LoraConfig(rank=4, alpha=8.0))
  key = jax.random.PRNGKey(seed + 1)
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if path[-1] == 'lora_b':
      key, sub = jax.random.split(key)
      v.set_value(perturb * jax.random.normal(sub, v.get_value().shape))
  return cfg, model


def rollout_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, cfg.text.vocab_size - 10, size=(P, T)).astype(np.int32)
  mask = np.ones((P, T), np.int32)
  mask[1, :3] = 0
  ids[1, :3] = cfg.pad_token_id
  ids[0, 2:2 + N_IMG] = cfg.image_token_id
  ids[1, 5:5 + N_IMG] = cfg.image_token_id
  pos, deltas = rope_index(cfg, ids, mask, GRID)
  comp = rng.integers(0, cfg.text.vocab_size - 10, size=(P * G, N)).astype(np.int32)
  cmask = np.ones((P * G, N), bool)
  cmask[1, 4:] = False
  cmask[6, 2:] = False
  comp[~cmask] = cfg.pad_token_id
  rewards = np.array([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5], np.float32)  # group 1 has zero variance
  return dict(prompt_ids_PT=ids, prompt_mask_PT=mask, prompt_positions_3PT=pos, rope_deltas_P=deltas,
              pixel_values_LC=rng.normal(size=(P * 16, cfg.vision.patch_dim)).astype(np.float32),
              vision_meta=vision_meta(GRID, cfg.vision), completion_ids_BN=comp, completion_mask_BN=cmask,
              old_logp_BN=np.zeros((P * G, N), np.float32), rewards_B=rewards)


def per_image(cfg, batch, ids_key='prompt_ids_PT', mask_key='prompt_mask_PT', src_key='image_src_PT'):
  """The batch with its packed images moved to the trainer's per-image layout (``sampling/prompts.py``)."""
  from medad_jax.sampling.prompts import _per_image
  out = {k: v for k, v in batch.items() if k not in ('pixel_values_LC', 'vision_meta')}
  pix, meta, src = _per_image(cfg, batch['pixel_values_LC'], GRID, batch[ids_key], batch[mask_key],
                              batch[ids_key].shape[0], (16,))
  out.update(pixel_values_ILC=pix, vision_meta_I=meta, **{src_key: src})
  return out


def full_sequence_inputs(cfg, batch):
  """Every rollout as one full sequence (prompt + completion), each with its own copy of its prompt's image."""
  ids = np.concatenate([np.repeat(batch['prompt_ids_PT'], G, 0), batch['completion_ids_BN']], 1)
  mask = np.concatenate([np.repeat(batch['prompt_mask_PT'], G, 0), batch['completion_mask_BN']], 1).astype(np.int32)
  deltas = np.repeat(batch['rope_deltas_P'], G, 0)
  pos = np.concatenate([np.repeat(batch['prompt_positions_3PT'], G, 1),
                        np.asarray(continuation_positions(T, jnp.asarray(deltas), N))], 2)
  pix = np.repeat(batch['pixel_values_LC'].reshape(P, 16, -1), G, 0).reshape(P * G * 16, -1)
  return dict(ids=ids, mask=mask, pos=pos, pix=pix, meta=vision_meta(np.repeat(GRID, G, 0), cfg.vision),
              completion=batch['completion_ids_BN'])


def _full_logprobs(model, inp):
  logits, _ = model(inp['ids'], attention_mask_BT=inp['mask'], positions_3BT=inp['pos'], pixel_values=inp['pix'],
                    vision_meta=inp['meta'])
  lsm = jax.nn.log_softmax(logits[:, T - 1:T + N - 1], -1)
  return jnp.take_along_axis(lsm, inp['completion'][..., None], -1)[..., 0]


@functools.partial(jax.jit, static_argnums=0)
def _full_logprobs_jit(graphdef, state, inp):
  return _full_logprobs(nnx.merge(graphdef, state), inp)


def full_sequence_logprobs(model, batch):
  """Reference log-probs of the completions: the plain full-sequence forward, no cache, no prompt sharing."""
  graphdef, state = nnx.split(model)
  return _full_logprobs_jit(graphdef, state, full_sequence_inputs(model.cfg, batch))


def reference_grpo_grads(graphdef, state, batch, *, beta, eps, ratio_to='old', filter_zero_var=False):
  """Eq. 7-8 written out by hand on the full-sequence forward; -> (grads of the trainable params, loss).

  The reference policy is ``state.ref_params`` when the state has one (full fine-tuning), else the LoRA policy
  with its adapters switched off.
  """
  r = batch['rewards_B'].reshape(P, G)
  adv = (r - r.mean(1, keepdims=True)).reshape(-1)
  m = batch['completion_mask_BN'].astype(np.float32)
  if filter_zero_var:
    m = m * np.repeat(r.max(1) > r.min(1), G)[:, None]
  inp = full_sequence_inputs(nnx.merge(graphdef, state.params, state.frozen).cfg, batch)

  @jax.jit
  def value_and_grad(params, inp):
    if state.ref_params is not None:
      ref = _full_logprobs(nnx.merge(graphdef, state.ref_params, state.frozen), inp)
    else:
      with lora_disabled():
        ref = _full_logprobs(nnx.merge(graphdef, params, state.frozen), inp)

    def loss(params):
      logp = _full_logprobs(nnx.merge(graphdef, params, state.frozen), inp)
      den = ref if ratio_to == 'sft' else jnp.asarray(batch['old_logp_BN'])
      ratio = jnp.exp(logp - den)
      a = jnp.asarray(adv)[:, None]
      pg = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - eps, 1 + eps) * a)
      kl = jnp.exp(ref - logp) - (ref - logp) - 1
      per_tok = pg + beta * kl
      n = m.sum(1)
      seq = jnp.sum(per_tok * m, 1) / np.maximum(n, 1)
      return jnp.sum(seq * (n > 0)) / (n > 0).sum()

    return jax.value_and_grad(loss)(params)

  l, g = value_and_grad(state.params, inp)
  return g, float(l)


def sgd_delta(old_params, new_params):
  """With optax.sgd(1.0), ``new = old - grad``: recovers the gradient the update used."""
  return jax.tree.map(lambda o, n: np.asarray(o) - np.asarray(n), old_params, new_params)


def copy_state(state):
  return jax.tree.map(jnp.copy, state)


def assert_trees_close(a, b, rtol, atol):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture(scope='module')
def setup():
  cfg, model = tiny_policy()
  graphdef, state = U.init_train_state(model, optax.sgd(1.0))
  batch = rollout_batch(cfg)
  # old log-probs = the current policy's, perturbed so ratios spread over both sides of the clip range.
  old = np.asarray(full_sequence_logprobs(model, batch))
  noise = np.random.default_rng(3).normal(scale=0.3, size=old.shape).astype(np.float32)
  batch['old_logp_BN'] = ((old + noise) * batch['completion_mask_BN']).astype(np.float32)
  gcfg = U.GRPOConfig(group_size=G, beta=0.04, eps_low=0.2, eps_high=0.2)
  step = U.make_congrpo_update(graphdef, optax.sgd(1.0), gcfg)
  return cfg, graphdef, state, batch, gcfg, step


def test_completion_logprobs_match_full_sequence_forward(setup):
  cfg, graphdef, state, batch, _, _ = setup
  got = U.rollout_logprobs(graphdef, state.params, state.frozen, U.put_batch(batch, None), group_size=G)
  want = full_sequence_logprobs(U.merge_model(graphdef, state), batch)
  m = batch['completion_mask_BN']
  np.testing.assert_allclose(np.asarray(got)[m], np.asarray(want)[m], atol=WHOLE_MODEL_TOL, rtol=0)


def test_update_gradients_equal_hand_written_objective(setup):
  _, graphdef, state, batch, gcfg, step = setup
  want_g, want_loss = reference_grpo_grads(graphdef, state, batch, beta=gcfg.beta, eps=gcfg.eps_low)
  new_state, met = step(copy_state(state), U.put_batch(batch, None))
  got_g = sgd_delta(state.params, new_state.params)
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want_g))
  assert scale > 1e-4, 'degenerate test: zero gradient'
  assert_trees_close(got_g, want_g, rtol=0, atol=WHOLE_MODEL_TOL * scale)
  assert float(met['loss']) == pytest.approx(want_loss, abs=WHOLE_MODEL_TOL)
  # The perturbed old log-probs put tokens on both sides of the clip range; the KL to pi_SFT is positive.
  assert float(met['clip_frac_low']) > 0 and float(met['clip_frac_high']) > 0
  assert float(met['kl']) > 0 and float(met['ratio_min']) < 0.8 < 1.2 < float(met['ratio_max'])
  assert int(met['zero_var_groups']) == 1 and float(met['zero_var_frac']) == 0.5
  assert int(new_state.step) == 1
  assert float(met['completion_tokens']) == batch['completion_mask_BN'].sum()


@pytest.fixture(scope='module')
def adamw_setup(setup):
  """The policy of ``setup`` with AdamW + clipping, and its 1-device update (compiled once, shared)."""
  _, graphdef, state, _, gcfg, _ = setup
  # eps = 1e-4, not AdamW's 1e-8: the first AdamW step moves a parameter by lr * g / (|g| + eps), which for the
  # adapters' near-zero gradients (down to ~1e-8 here) turns fp32 summation-order noise of the sharded program into
  # parameter differences of up to 2 * lr. With eps above the noise the step is a smooth function of the gradient,
  # so comparing parameters (and moments) at the mesh tolerance tests the sharded program, not that amplification.
  tx, _ = U.make_optimizer(1e-2, weight_decay=0.01, max_grad_norm=0.5, eps=1e-4)
  graphdef, st = U.init_train_state(U.merge_model(graphdef, copy_state(state)), tx)
  return tx, graphdef, st, U.make_congrpo_update(graphdef, tx, gcfg)


def test_inner_iterations_reuse_the_compiled_update(setup, adamw_setup):
  batch = setup[3]
  _, _, st, step = adamw_setup
  s = copy_state(st)
  dev_batch = U.put_batch(batch, None)
  losses = []
  for _ in range(3):  # mu = 3 inner iterations on one rollout batch
    s, met = step(s, dev_batch)
    losses.append(float(met['loss']))
  assert step.traces == 1   # mu inner iterations reuse one compiled program
  assert int(s.step) == 3
  assert losses[2] < losses[0]


@pytest.mark.parametrize('ratio_to,filter_zero_var', [('sft', False), ('old', True)])
def test_update_variants_equal_hand_written_objective(setup, ratio_to, filter_zero_var):
  _, graphdef, state, batch, _, _ = setup
  gcfg = U.GRPOConfig(group_size=G, beta=0.1, eps_low=0.2, eps_high=0.2, ratio_to=ratio_to,
                      filter_zero_variance=filter_zero_var)
  step = U.make_congrpo_update(graphdef, optax.sgd(1.0), gcfg)
  want_g, want_loss = reference_grpo_grads(graphdef, state, batch, beta=0.1, eps=0.2, ratio_to=ratio_to,
                                           filter_zero_var=filter_zero_var)
  new_state, met = step(copy_state(state), U.put_batch(batch, None))
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want_g))
  assert_trees_close(sgd_delta(state.params, new_state.params), want_g, rtol=0, atol=WHOLE_MODEL_TOL * scale)
  assert float(met['loss']) == pytest.approx(want_loss, abs=WHOLE_MODEL_TOL)
  if ratio_to == 'sft':
    # Eq. 8: the ratio is to pi_SFT, so the rollout log-probs do not enter at all.
    b2 = dict(batch, old_logp_BN=np.zeros_like(batch['old_logp_BN']))
    s2, met2 = step(copy_state(state), U.put_batch(b2, None))
    assert_trees_close(s2.params, new_state.params, rtol=0, atol=0)


def test_full_fine_tuning_update_with_a_reference_copy(setup):
  """LoRA off: every Param is trained and the reference is a frozen copy (here perturbed, so KL > 0); precomputed
  reference log-probs in the batch give the same update."""
  cfg, _, _, batch, gcfg, _ = setup
  model = Qwen25VL(cfg, rngs=nnx.Rngs(5))
  graphdef, state = U.init_train_state(model, optax.sgd(1.0), trainable='all', keep_reference=True)
  assert any('embed_tokens' in '/'.join(map(str, p)) for p, _ in nnx.to_flat_state(state.params))
  ref = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)),
                     state.ref_params)
  state = state.replace(ref_params=ref)
  want_g, want_loss = reference_grpo_grads(graphdef, state, batch, beta=gcfg.beta, eps=gcfg.eps_low)
  step = U.make_congrpo_update(graphdef, optax.sgd(1.0), gcfg)
  new_state, met = step(copy_state(state), U.put_batch(batch, None))
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want_g))
  assert_trees_close(sgd_delta(state.params, new_state.params), want_g, rtol=0, atol=WHOLE_MODEL_TOL * scale)
  assert float(met['loss']) == pytest.approx(want_loss, abs=WHOLE_MODEL_TOL) and float(met['kl']) > 0
  assert_trees_close(new_state.ref_params, ref, rtol=0, atol=0)   # the reference never moves
  ref_logp = U.rollout_logprobs(graphdef, ref, state.frozen, U.put_batch(batch, None), group_size=G)
  s2, met2 = step(copy_state(state), U.put_batch(dict(batch, ref_logp_BN=np.asarray(ref_logp)), None))
  assert_trees_close(s2.params, new_state.params, rtol=0, atol=MESH_TOL)


def test_microbatched_update_equals_full_batch(setup):
  """2 microbatches, each running its own prompts' images through the tower inside the scan, equal the packed
  full batch; so does the per-image layout unsplit."""
  cfg, graphdef, state, batch, gcfg, step = setup
  step2 = U.make_congrpo_update(graphdef, optax.sgd(1.0), dataclasses.replace(gcfg, num_microbatches=2))
  s1, m1 = step(copy_state(state), U.put_batch(batch, None))
  s2, m2 = step2(copy_state(state), U.put_batch(per_image(cfg, batch), None))
  s3, _ = step(copy_state(state), U.put_batch(per_image(cfg, batch), None))
  assert_trees_close(s3.params, s1.params, rtol=0, atol=MESH_TOL)
  with pytest.raises(ValueError, match='needs per-prompt images'):
    step2(copy_state(state), U.put_batch(batch, None))
  assert_trees_close(s2.params, s1.params, rtol=0, atol=MESH_TOL)
  for k in ('loss', 'kl', 'clip_frac_low', 'clip_frac_high', 'ratio_min', 'ratio_max', 'entropy', 'grad_norm'):
    assert float(m2[k]) == pytest.approx(float(m1[k]), rel=MESH_TOL, abs=MESH_TOL), k


def test_update_on_8_device_mesh_equals_1_device(setup, adamw_setup):
  assert jax.device_count() == 8, 'conftest sets --xla_force_host_platform_device_count=8'
  batch, gcfg = setup[3], setup[4]
  tx, graphdef, st, one = adamw_setup
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  eight = U.make_congrpo_update(graphdef, tx, gcfg, mesh=mesh)
  s1, m1 = one(copy_state(st), U.put_batch(batch, None))
  s8, m8 = eight(U.place_state(copy_state(st), mesh), U.put_batch(batch, mesh))
  # The state really is spread over the mesh (e.g. the adapters' fsdp/tensor axes).
  spread = [x for x in jax.tree.leaves(s8.params) if len(x.sharding.device_set) == 8 and
            not x.sharding.is_fully_replicated]
  assert spread
  assert_trees_close(s8.params, s1.params, rtol=0, atol=MESH_TOL)
  assert_trees_close(s8.opt_state, s1.opt_state, rtol=0, atol=MESH_TOL)
  for k in m1:
    assert float(m8[k]) == pytest.approx(float(m1[k]), rel=MESH_TOL, abs=MESH_TOL), k


def test_few_updates_raise_the_reward_of_a_fixed_batch(setup):
  """Repeated updates on fixed rollouts move probability to the rewarded completions: their mean token log-prob
  rises, the others' falls, and the policy's expected reward over each group's completions (weights
  ``softmax(mean_t logp)``) goes up."""
  cfg, graphdef, state, batch, gcfg, _ = setup
  tx, _ = U.make_optimizer(1e-2)
  graphdef, s = U.init_train_state(U.merge_model(graphdef, copy_state(state)), tx)
  r = np.array([1, 0, 0, 0, 0, 1, 0, 0], np.float32)
  b = dict(batch, rewards_B=r)
  step = U.make_congrpo_update(graphdef, tx, dataclasses.replace(gcfg, ratio_to='sft'))
  m = b['completion_mask_BN']

  def seq_mean_logp(s):
    logp = np.asarray(full_sequence_logprobs(U.merge_model(graphdef, s), b))
    return (logp * m).sum(1) / m.sum(1)

  def expected_reward(lp):
    w = np.exp(lp.reshape(P, G) - lp.reshape(P, G).max(1, keepdims=True))
    return float((w / w.sum(1, keepdims=True) * r.reshape(P, G)).sum(1).mean())

  before = seq_mean_logp(s)
  dev = U.put_batch(b, None)
  for _ in range(5):
    s, met = step(s, dev)
  after = seq_mean_logp(s)
  delta = after - before
  assert np.all(delta[r == 1] > 0.1), delta
  assert np.all(delta[r == 0] < 0), delta
  assert expected_reward(after) > expected_reward(before) + 0.1, (expected_reward(before), expected_reward(after))


# ------------------------------------------------------------------------------------------------- SFT


def sft_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  B, L = 2, 16
  ids = rng.integers(0, cfg.text.vocab_size - 10, size=(B, L)).astype(np.int32)
  mask = np.ones((B, L), np.int32)
  mask[1, :2] = 0   # left padding
  ids[1, :2] = cfg.pad_token_id
  ids[0, 1:1 + N_IMG] = cfg.image_token_id
  ids[1, 3:3 + N_IMG] = cfg.image_token_id
  loss_mask = np.zeros((B, L), np.float32)
  loss_mask[0, 9:] = 1     # the assistant turn
  loss_mask[1, 11:15] = 1
  pos, _ = rope_index(cfg, ids, mask, GRID)
  return dict(input_ids_BT=ids, attention_mask_BT=mask, positions_3BT=pos, loss_mask_BT=loss_mask,
              pixel_values_LC=rng.normal(size=(B * 16, cfg.vision.patch_dim)).astype(np.float32),
              vision_meta=vision_meta(GRID, cfg.vision))


def _target_logprobs(graphdef, state, b):
  """``(params, batch) -> [targets]``: the full model's log-prob of every assistant token of ``b`` (by hand)."""
  targets = list(zip(*np.nonzero(b['loss_mask_BT'])))

  def fn(params, batch):
    m = nnx.merge(graphdef, params, state.frozen)
    logits, _ = m(batch['input_ids_BT'], attention_mask_BT=batch['attention_mask_BT'],
                  positions_3BT=batch['positions_3BT'], pixel_values=batch['pixel_values_LC'],
                  vision_meta=batch['vision_meta'])
    lsm = jax.nn.log_softmax(logits, -1)
    return jnp.stack([lsm[b_, t - 1, b['input_ids_BT'][b_, t]] for b_, t in targets])
  return fn


def test_sft_loss_is_the_masked_mean_over_assistant_tokens():
  cfg, model = tiny_policy()
  b = sft_batch(cfg)
  graphdef, state = U.init_train_state(model, optax.sgd(1.0))
  step = U.make_sft_step(graphdef, optax.sgd(1.0))

  target_logp = _target_logprobs(graphdef, state, b)
  want_loss, want_g = jax.value_and_grad(jax.jit(lambda p, batch: -jnp.mean(target_logp(p, batch))))(state.params, b)
  new_state, met = step(copy_state(state), U.put_batch(b, None))
  assert float(met['loss']) == pytest.approx(float(want_loss), abs=WHOLE_MODEL_TOL)
  assert float(met['target_tokens']) == b['loss_mask_BT'].sum()
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want_g))
  assert_trees_close(sgd_delta(state.params, new_state.params), want_g, rtol=0, atol=WHOLE_MODEL_TOL * scale)
  # Gradient accumulation over 2 microbatches (one example each) gives the same step.
  step2 = U.make_sft_step(graphdef, optax.sgd(1.0), U.SFTConfig(num_microbatches=2))
  s2, met2 = step2(copy_state(state), U.put_batch(per_image(cfg, b, 'input_ids_BT', 'attention_mask_BT',
                                                           'image_src_BT'), None))
  assert_trees_close(s2.params, new_state.params, rtol=0, atol=MESH_TOL)
  assert float(met2['loss']) == pytest.approx(float(met['loss']), abs=MESH_TOL)

  # Prompt, image and padding positions are not targets: whatever the model predicts there (its logits) gets no
  # gradient from the loss. (Their *tokens* still condition the targets, as they must.)
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 16, cfg.text.vocab_size))
  from medad_jax.rl import algo
  g = jax.grad(lambda lg: algo.sft_nll(lg, jnp.asarray(b['input_ids_BT']), jnp.asarray(b['loss_mask_BT']))[0])(
      logits)
  predicts_target = np.zeros((2, 16), bool)
  predicts_target[:, :-1] = b['loss_mask_BT'][:, 1:] > 0
  assert np.all(np.asarray(g)[~predicts_target] == 0)
  assert np.all(np.abs(np.asarray(g)[predicts_target]).sum(-1) > 0)


def test_sft_focal_weights_each_token_by_its_error_as_a_constant():
  """``focal_gamma``: the loss is mean over targets of ``(1 - p)^gamma * nll`` with the weight held constant (its
  gradient is the weighted sum of the NLL gradients); gamma 0 is the plain loss of the test above."""
  cfg, model = tiny_policy()
  b = sft_batch(cfg)
  graphdef, state = U.init_train_state(model, optax.sgd(1.0))
  target_logp = _target_logprobs(graphdef, state, b)
  gamma = 2.0

  @jax.jit
  def manual(params, batch):
    lp = target_logp(params, batch)
    w = jax.lax.stop_gradient((1.0 - jnp.exp(lp)) ** gamma)
    return jnp.mean(-lp * w), jnp.mean(-lp)

  (want_loss, want_nll), want_g = jax.value_and_grad(manual, has_aux=True)(state.params, b)
  step = U.make_sft_step(graphdef, optax.sgd(1.0), U.SFTConfig(focal_gamma=gamma))
  new_state, met = step(copy_state(state), U.put_batch(b, None))
  assert float(met['loss']) == pytest.approx(float(want_loss), abs=WHOLE_MODEL_TOL)
  assert float(met['nll']) == pytest.approx(float(want_nll), abs=WHOLE_MODEL_TOL)   # the NLL stays unweighted
  assert float(met['loss']) < float(met['nll'])                                     # every weight is below 1
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want_g))
  assert_trees_close(sgd_delta(state.params, new_state.params), want_g, rtol=0, atol=WHOLE_MODEL_TOL * scale)
  with pytest.raises(ValueError, match='focal_gamma'):
    U.SFTConfig(focal_gamma=-1.0)


def test_sft_decoder_only_keeps_the_tower_and_trains_the_rest_as_all():
  """``trainable='decoder'``: the tower's weights are frozen (not in the optimizer, no gradient through it), every
  other weight gets the same update as under ``'all'`` -- the tower's features are the same constants either way."""
  cfg, model = tiny_policy()
  b = sft_batch(cfg)
  g_all, s_all = U.init_train_state(model, optax.sgd(1.0), trainable='all')
  g_dec, s_dec = U.init_train_state(model, optax.sgd(1.0), trainable='decoder')
  names = ['/'.join(map(str, p)) for p, _ in nnx.to_flat_state(s_dec.params)]
  assert names and not any(n.startswith('visual') for n in names)
  assert any(p[0] == 'visual' for p, _ in nnx.to_flat_state(s_dec.frozen))
  new_all, m_all = U.make_sft_step(g_all, optax.sgd(1.0))(copy_state(s_all), U.put_batch(b, None))
  new_dec, m_dec = U.make_sft_step(g_dec, optax.sgd(1.0))(copy_state(s_dec), U.put_batch(b, None))
  assert float(m_dec['loss']) == pytest.approx(float(m_all['loss']), abs=MESH_TOL)
  after_all = dict(nnx.to_flat_state(new_all.params))
  for path, v in nnx.to_flat_state(new_dec.params):
    np.testing.assert_allclose(np.asarray(v[...]), np.asarray(after_all[path][...]), rtol=0, atol=MESH_TOL,
                               err_msg=str(path))
  for (path, before), (_, after) in zip(nnx.to_flat_state(s_dec.frozen), nnx.to_flat_state(new_dec.frozen)):
    np.testing.assert_array_equal(np.asarray(before[...]), np.asarray(after[...]), err_msg=str(path))


def test_sft_steps_lower_the_loss():
  cfg, model = tiny_policy(perturb=0.0)
  b = sft_batch(cfg, seed=1)
  tx, sched = U.make_optimizer(1e-2)
  graphdef, state = U.init_train_state(model, tx)
  step = U.make_sft_step(graphdef, tx, U.SFTConfig(num_microbatches=2), lr_schedule=sched)
  dev = U.put_batch(per_image(cfg, b, 'input_ids_BT', 'attention_mask_BT', 'image_src_BT'), None)
  losses = []
  for _ in range(6):
    state, met = step(state, dev)
    losses.append(float(met['loss']))
  assert losses[-1] < losses[0] - 0.5, losses
  assert float(met['lr']) == pytest.approx(1e-2)


def test_a_batch_without_targets_skips_the_update_and_the_step_keeps_its_buffers():
  # A batch with no target token (every loss-mask entry 0) leaves the weights and AdamW's moments as they were and
  # still counts the step; a normal batch moves them. The skip is a branch of the step, so the donated weights and
  # moments are updated in place: the compiled step holds no copy of them (a select of new-or-old per leaf made
  # XLA copy every moment array first, 19 ms of the miniature's 400 ms SFT step).
  cfg, model = tiny_policy(perturb=0.0)
  tx, _ = U.make_optimizer(1e-2)
  graphdef, state = U.init_train_state(model, tx)
  step = U.make_sft_step(graphdef, tx)
  b = sft_batch(cfg, seed=1)
  state, met = step(state, U.put_batch(b, None))
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  empty = dict(b, loss_mask_BT=np.zeros_like(b['loss_mask_BT']))
  hlo = step.lower(state, U.put_batch(empty, None)).compile().as_text()
  copies = [ln for ln in hlo.splitlines() if ' copy(' in ln and ('opt_state' in ln or 'params' in ln)]
  assert not copies, copies[:3]
  state, met = step(state, U.put_batch(empty, None))
  assert int(state.step) == 2 and float(met['target_tokens']) == 0 and float(met['update_norm']) == 0
  after = jax.tree.map(np.asarray, (state.params, state.opt_state))
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
  state, met = step(state, U.put_batch(b, None))
  assert float(met['update_norm']) > 0
  moved = jax.tree.map(np.asarray, state.params)
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before[0]), jax.tree.leaves(moved)))


def test_the_skip_branch_runs_full_fine_tuning_in_bfloat16():
  # The skip's two branches must agree in dtype: full fine-tuning of bf16 weights has bf16 updates, whose norm
  # is reported as float32 either way.
  cfg = tiny_cfg().replace(dtype='bfloat16', param_dtype='bfloat16')
  model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  tx, _ = U.make_optimizer(1e-2)
  graphdef, state = U.init_train_state(model, tx, trainable='all')
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype('bfloat16')}
  step = U.make_sft_step(graphdef, tx)
  b = sft_batch(cfg, seed=1)
  before = jax.tree.map(np.asarray, state.params)
  state, met = step(state, U.put_batch(dict(b, loss_mask_BT=np.zeros_like(b['loss_mask_BT'])), None))
  assert met['update_norm'].dtype == jnp.float32 and float(met['update_norm']) == 0
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)))
  state, met = step(state, U.put_batch(b, None))
  assert met['update_norm'].dtype == jnp.float32 and float(met['update_norm']) > 0


def test_bad_batches_and_configs_fail_clearly(setup):
  _, graphdef, state, batch, gcfg, step = setup
  with pytest.raises(KeyError, match="missing key 'rewards_B'"):
    step(copy_state(state), {k: v for k, v in U.put_batch(batch, None).items() if k != 'rewards_B'})
  with pytest.raises(ValueError, match='ratio_to'):
    U.GRPOConfig(ratio_to='ref')
  with pytest.raises(ValueError, match='aggregation'):
    U.GRPOConfig(aggregation='mean')
  with pytest.raises(ValueError, match='selects no parameters'):
    U.init_train_state(Qwen25VL(tiny_cfg(), rngs=nnx.Rngs(0)), optax.sgd(1.0))


# ------------------------------------------------------------------------------------------ memory features


@pytest.mark.parametrize('chunk', [1, 5, 4096])
def test_chunked_logprobs_equal_unchunked(chunk):
  """Log-probs, entropy and argmax hits through the LM head in chunks equal the full-logits ones (1e-6), and
  so do the gradients."""
  from medad_jax.rl import algo
  cfg, model = tiny_policy()
  rng = np.random.default_rng(3)
  h = jnp.asarray(rng.normal(size=(3, 7, cfg.text.hidden_size)).astype(np.float32))
  ids = jnp.asarray(rng.integers(0, cfg.text.vocab_size, (3, 7)).astype(np.int32))
  graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

  def chunked(params, h):
    m = nnx.merge(graphdef, params, rest)
    lp, ent, hit = U.chunked_token_logprobs(m, h, ids, temperature=0.7, chunk=chunk)
    return jnp.sum(jnp.sin(lp)), (lp, ent, hit)

  def full(params, h):
    m = nnx.merge(graphdef, params, rest)
    logits = m.logits(h)
    lp = algo.selected_logprobs(logits, ids, temperature=0.7)
    return jnp.sum(jnp.sin(lp)), (lp, algo.entropy(logits, temperature=0.7), jnp.argmax(logits, -1) == ids)

  (v1, a1), g1 = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(params, h)
  (v0, a0), g0 = jax.jit(jax.value_and_grad(full, argnums=(0, 1), has_aux=True))(params, h)
  for x, y in zip(a1, a0):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=0, atol=1e-6)
  assert_trees_close(g1, g0, rtol=0, atol=1e-6)


def test_sft_target_positions_equal_every_position():
  """The pipeline's target gather (logits only where a target is) gives the loss and gradients of scoring every
  position under the loss mask (1e-6)."""
  from medad_jax.train.pipeline import TARGET_LENGTH_BUCKETS  # noqa: F401  (the bucket list the pipeline uses)
  cfg, model = tiny_policy()
  b = sft_batch(cfg)
  loss = b['loss_mask_BT'].astype(bool).copy()
  loss[:, 0] = False
  M = 8
  pos, tids, tmask = (np.zeros((2, M), np.int32) for _ in range(3))
  for r in range(2):
    t = np.nonzero(loss[r])[0]
    pos[r, :t.size], tids[r, :t.size], tmask[r, :t.size] = t - 1, b['input_ids_BT'][r, t], 1
  gathered = dict(b, target_pos_BM=pos, target_ids_BM=tids, target_mask_BM=tmask)
  graphdef, state = U.init_train_state(model, optax.sgd(1.0))
  step = U.make_sft_step(graphdef, optax.sgd(1.0), U.SFTConfig(logits_chunk=3))
  s1, m1 = step(copy_state(state), U.put_batch(b, None))
  s2, m2 = step(copy_state(state), U.put_batch(gathered, None))
  assert_trees_close(s2.params, s1.params, rtol=0, atol=1e-6)
  for k in ('loss', 'nll', 'token_accuracy', 'target_tokens'):
    assert float(m2[k]) == pytest.approx(float(m1[k]), abs=1e-6), k


def test_remat_and_chunking_lower_the_updates_memory():
  """XLA's compiled memory analysis of the Con-GRPO update: rematerialised layers + chunked log-probs need fewer
  temporary bytes than neither, for the same program otherwise."""
  base = Qwen25VLConfig.tiny(vocab_size=2048)
  temps = {}
  for remat, chunk in (('none', 4096), ('full', 16)):
    cfg = base.replace(remat=remat, text=dataclasses.replace(base.text, num_layers=3),
                       vision=dataclasses.replace(base.vision, depth=1, fullatt_block_indexes=(0,)))
    model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    graphdef, state = U.init_train_state(model, optax.sgd(1.0))
    from medad_jax.plan import rollout_batch as plan_rollout_batch
    batch = plan_rollout_batch(cfg, 2, 4, 24, 64, 4)
    step = U.make_congrpo_update(graphdef, optax.sgd(1.0), U.GRPOConfig(group_size=4, logits_chunk=chunk))
    temps[remat] = step.lower(state, U.put_batch(batch, None)).compile().memory_analysis().temp_size_in_bytes
  print('XLA temp bytes, no remat / remat + chunking:', temps)
  assert temps['full'] < temps['none'], temps
