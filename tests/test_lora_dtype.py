"""LoRA dtype policy (adapters, their gradients and AdamW moments float32 under a bfloat16 base) and the removed
LoRA dropout."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.layers import BASE_PARAMS
from medad_jax.model.lora import LoraConfig, apply_lora, load_adapters, merge_lora, save_adapters
from medad_jax.model.qwen25vl import Qwen25VL
from medad_jax.model.rope_index import rope_index
from medad_jax.rl import update as U

LR = 1e-6


def _bf16_policy(seed=0):
  """Tiny model, bfloat16 storage and compute, LoRA with a non-zero ``lora_b`` (so ``lora_a`` gets gradients)."""
  base = Qwen25VLConfig.tiny()
  cfg = base.replace(dtype='bfloat16', param_dtype='bfloat16', text=dataclasses.replace(base.text, num_layers=1))
  model = Qwen25VL(cfg, rngs=nnx.Rngs(seed))
  apply_lora(model, LoraConfig(rank=4, alpha=8.0))
  key = jax.random.PRNGKey(seed + 1)
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if path[-1] == 'lora_b':
      key, sub = jax.random.split(key)
      v.set_value(0.05 * jax.random.normal(sub, v.get_value().shape))
  return cfg, model


def _text_sft_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  B, L = 2, 12
  ids = rng.integers(0, cfg.text.vocab_size - 10, size=(B, L)).astype(np.int32)
  mask = np.ones((B, L), np.int32)
  mask[1, :2] = 0
  ids[1, :2] = cfg.pad_token_id
  loss_mask = np.zeros((B, L), np.float32)
  loss_mask[:, 6:] = 1
  pos, _ = rope_index(cfg, ids, mask, None)
  return dict(input_ids_BT=ids, attention_mask_BT=mask, positions_3BT=pos, loss_mask_BT=loss_mask)


def _flat(state):
  return {'/'.join(map(str, p)): np.asarray(v.get_value() if hasattr(v, 'get_value') else v)
          for p, v in nnx.to_flat_state(state)}


def test_adapters_are_float32_under_a_bfloat16_base_and_an_lr_1e6_adamw_step_moves_them():
  cfg, model = _bf16_policy()
  adapters = nnx.state(model, nnx.LoRAParam)
  base = nnx.state(model, BASE_PARAMS)
  assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype('float32')}
  assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype('bfloat16')}

  tx, _ = U.make_optimizer(LR)
  graphdef, state = U.init_train_state(model, tx)
  # AdamW's first and second moments follow the adapters: float32.
  moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, 'ndim', 0) >= 1]
  assert moments and {x.dtype for x in moments} == {jnp.dtype('float32')}
  before, frozen_before = _flat(state.params), _flat(state.frozen)

  step = U.make_sft_step(graphdef, tx)
  new, met = step(state, U.put_batch(_text_sft_batch(cfg), None))
  assert np.isfinite(float(met['loss'])) and float(met['grad_norm']) > 0
  after = _flat(new.params)
  assert {a.dtype for a in after.values()} == {np.dtype('float32')}
  assert {x.dtype for x in jax.tree.leaves(new.opt_state) if getattr(x, 'ndim', 0) >= 1} == {np.dtype('float32')}
  # The frozen bf16 base is untouched.
  for k, v in _flat(new.frozen).items():
    assert v.dtype == frozen_before[k].dtype and np.array_equal(v, frozen_before[k]), k

  assert sorted(after) == sorted(before) and any(k.endswith('lora_a') for k in after)
  lost_in_bf16 = []
  for k in before:
    diff = np.abs(after[k] - before[k])
    # A first AdamW step moves each weight with a non-zero gradient by ~lr (m_hat / sqrt(v_hat) = sign(g)).
    assert np.mean(diff > 0) > 0.9, (k, np.mean(diff > 0))
    assert 0.5 * LR < diff.max() < 1.5 * LR, (k, diff.max())
    if k.endswith('lora_a'):
      bf = lambda x: x.astype(ml_dtypes.bfloat16)  # noqa: E731
      lost_in_bf16.append(np.mean(bf(after[k]) == bf(before[k])))
  # Not vacuous: stored in bfloat16, almost every lora_a entry (|a| ~ 1/sqrt(64)) would have rounded back.
  assert min(lost_in_bf16) > 0.9, lost_in_bf16


def test_saved_adapters_reload_as_float32_and_merge_keeps_the_base_dtype(tmp_path):
  _, model = _bf16_policy()
  want = _flat(nnx.state(model, nnx.LoRAParam))
  save_adapters(model, str(tmp_path))
  _, other = _bf16_policy(seed=3)
  load_adapters(other, str(tmp_path))
  got = _flat(nnx.state(other, nnx.LoRAParam))
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == np.float32 and np.array_equal(got[k], want[k]), k
  assert merge_lora(other) > 0
  assert {x.dtype for x in jax.tree.leaves(nnx.state(other, BASE_PARAMS))} == {jnp.dtype('bfloat16')}


def test_lora_dropout_is_refused_with_its_reason():
  from configs import common
  from medad_jax import launch
  with pytest.raises(ValueError, match='config.lora.dropout.*LoRA dropout is not supported'):
    common.load('congrpo', ['lora.dropout=0.1'])
  with pytest.raises(launch.ConfigError, match='lora.dropout: LoRA dropout is not supported'):
    launch.parse(['launch', '--config=congrpo', '--config.lora.dropout=0.1'])
  assert 'dropout' not in common.load('congrpo').lora
  with pytest.raises(TypeError, match='dropout'):
    LoraConfig(rank=4, dropout=0.1)  # pylint: disable=unexpected-keyword-arg
