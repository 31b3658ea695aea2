"""LoRA (adapters in their own subtree, disabled = bit-identical base, merged = unmerged, save/load alone) and
sharding (the forward on a faked 8-device (data, fsdp, tensor) mesh equals the 1-device result)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medad_jax import sharding
from medad_jax.model.checkpoint import load_checkpoint
from medad_jax.model.layers import BASE_PARAMS, lora_disabled
from medad_jax.model.lora import LoraConfig, apply_lora, load_adapters, merge_lora, save_adapters
from medad_jax.testing.inputs import model_inputs, prompt_batch

ROWS = [[('t', 3), ('img', (1, 8, 12)), ('t', 5)], [('t', 2), ('img', (1, 6, 10)), ('t', 3)],
        [('t', 7)], [('t', 4), ('img', (1, 4, 4)), ('t', 1)]]


def _forward(model, inputs):
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(state, inputs):
    return nnx.merge(graphdef, state)(**inputs)[0]
  return f(state, inputs)


def _forward_base(model, inputs):
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(state, inputs):
    with lora_disabled():
      return nnx.merge(graphdef, state)(**inputs)[0]
  return f(state, inputs)


def _randomise_adapters(model, seed=1):
  """B starts at zero (adapted == base); give every adapter a non-zero B so the tests see an effect."""
  keys = iter(jax.random.split(jax.random.key(seed), 1000))
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    v.set_value(0.05 * jax.random.normal(next(keys), v.get_value().shape, v.get_value().dtype))


@pytest.fixture(scope='module')
def loaded(tiny_hf_checkpoints):
  cfg, path, _ = tiny_hf_checkpoints['untied_gqa2_win56']
  inputs = model_inputs(cfg, prompt_batch(cfg, ROWS, seed=3))
  return cfg, path, inputs


def test_lora_targets_base_untouched_and_disabled_is_bit_identical(loaded):
  cfg, path, inputs = loaded
  base, _ = load_checkpoint(path)
  ref = np.asarray(_forward(base, inputs))
  base_state = jax.tree.map(np.asarray, nnx.state(base, BASE_PARAMS))

  model, _ = load_checkpoint(path)
  adapted = apply_lora(model, LoraConfig(rank=4, alpha=8.0))
  assert len(adapted) == 7 * cfg.text.num_layers  # q k v o gate up down in every decoder layer, nothing else
  assert all(p.startswith('model/layers/') for p in adapted)
  # B = 0 at start: the adapted model is the base model.
  np.testing.assert_allclose(np.asarray(_forward(model, inputs)), ref, atol=1e-6, rtol=0)
  _randomise_adapters(model)
  # The base tree is exactly what was loaded; adapters are a separate subtree.
  after = jax.tree.map(np.asarray, nnx.state(model, BASE_PARAMS))
  for (p, a), (_, b) in zip(nnx.to_flat_state(base_state), nnx.to_flat_state(after)):
    assert np.array_equal(a.get_value(), b.get_value()), p
  lora_paths = [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))]
  assert len(lora_paths) == 2 * len(adapted) and all(p[-1] in ('lora_a', 'lora_b') for p in lora_paths)
  on = np.asarray(_forward(model, inputs))
  assert np.abs(on - ref).max() > 1e-3  # the adapters do change the output
  off = np.asarray(_forward_base(model, inputs))
  assert np.array_equal(off, ref)  # adapters disabled: bit-identical to the base model


def test_lora_merged_equals_unmerged_and_adapters_save_load_alone(loaded, tmp_path):
  cfg, path, inputs = loaded
  model, _ = load_checkpoint(path)
  apply_lora(model, LoraConfig(rank=4, alpha=8.0))
  _randomise_adapters(model, seed=2)
  unmerged = np.asarray(_forward(model, inputs))
  save_adapters(model, str(tmp_path / 'adapters'))
  files = sorted(p.name for p in (tmp_path / 'adapters').iterdir())
  assert files == ['adapter_config.json', 'adapters.safetensors']
  n_bytes = (tmp_path / 'adapters' / 'adapters.safetensors').stat().st_size
  n_lora = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
  assert n_bytes < 4 * n_lora + 64_000  # the adapters alone, not the base

  fresh, _ = load_checkpoint(path)
  load_adapters(fresh, str(tmp_path / 'adapters'))
  assert np.array_equal(np.asarray(_forward(fresh, inputs)), unmerged)

  assert merge_lora(model) == 7 * cfg.text.num_layers
  assert not list(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
  np.testing.assert_allclose(np.asarray(_forward(model, inputs)), unmerged, atol=1e-5, rtol=0)


def test_load_adapters_rejects_mismatched_shapes(loaded, tmp_path):
  cfg, path, _ = loaded
  model, _ = load_checkpoint(path)
  apply_lora(model, LoraConfig(rank=4))
  save_adapters(model, str(tmp_path / 'a'))
  other, _ = load_checkpoint(path)
  other.model.layers[0].self_attn.q_proj.in_features = 65  # pretend a different architecture
  with pytest.raises(ValueError, match=r'model/layers/0/self_attn/q_proj adapter shapes'):
    load_adapters(other, str(tmp_path / 'a'))
  with pytest.raises(ValueError, match='matches no Linear'):
    apply_lora(model, LoraConfig(pattern=r'^nothing$'))


def test_forward_on_8_device_mesh_equals_single_device(loaded):
  cfg, path, inputs = loaded
  assert jax.device_count() == 8
  model, _ = load_checkpoint(path)
  apply_lora(model, LoraConfig(rank=4))
  _randomise_adapters(model, seed=3)
  single = np.asarray(_forward(model, inputs))

  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  sharded, _ = load_checkpoint(path, shardings=sharding.param_sharding_fn(mesh))
  apply_lora(sharded, LoraConfig(rank=4))
  _randomise_adapters(sharded, seed=3)
  sharding.shard_model(sharded, mesh)
  k = sharded.model.layers[0].mlp.gate_proj.kernel.get_value()
  assert k.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert len({d for d in k.sharding.device_set}) == 8
  batch_dims = {'positions_3BT': 1, 'pixel_values': None, 'vision_meta': None}
  placed = {k: v for k, v in inputs.items() if k != 'vision_meta'}
  placed = sharding.shard_batch(placed, mesh, batch_dims)
  placed['vision_meta'] = inputs['vision_meta']
  assert placed['input_ids_BT'].sharding.spec[0] == ('data', 'fsdp')
  with jax.set_mesh(mesh):
    out = _forward(sharded, placed)
  np.testing.assert_allclose(np.asarray(out), single, atol=1e-5, rtol=0)


def test_make_mesh_errors():
  with pytest.raises(ValueError, match='needs 16 devices'):
    sharding.make_mesh(data=4, fsdp=4, tensor=1)
  with pytest.raises(ValueError, match='at most one mesh axis'):
    sharding.make_mesh(data=-1, fsdp=-1)
  m = sharding.make_mesh(data=-1, fsdp=2, tensor=2)
  assert dict(m.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
