"""The peers benchmark's weight mapping (ours <-> Tunix's Qwen2 layout), checked without Tunix installed: the maps
are exact inverses, put every value where Tunix's einsums read it (a projection through the mapped weights and
adapters equals ours), and fail clearly on a missing or stray tensor. The benchmark itself (Tunix installed from
requirements-bench.txt) checks the same mapping by logits before it times anything."""

import sys

import numpy as np
import pytest
from flax import nnx

from medad_jax.bench import peers
from medad_jax.model.checkpoint import hf_tensors_from_model
from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.lora import LoraConfig, apply_lora
from medad_jax.model.qwen25vl import Qwen25VL


def _model(tied: bool):
  cfg = Qwen25VLConfig.tiny(tie_word_embeddings=tied)
  model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  apply_lora(model, LoraConfig(rank=4, alpha=8.0))
  rng = np.random.default_rng(0)
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    v.set_value(rng.normal(size=v.get_value().shape).astype(np.float32))   # lora_b non-zero too
  return cfg, model


@pytest.mark.parametrize('tied', [True, False])
def test_base_weights_round_trip_and_layout(tied):
  cfg, model = _model(tied)
  t = cfg.text
  hf = peers.text_tensors(hf_tensors_from_model(model, merge_lora=False))
  tx = peers.hf_to_tunix(hf, t)
  assert (('lm_head', 'w') in tx) == (not tied)
  back = peers.tunix_to_hf(tx, t)
  assert set(back) == set(hf) - ({'lm_head.weight'} if tied else set())
  for k, v in back.items():
    np.testing.assert_array_equal(v, hf[k], err_msg=k)
  # Tunix's projections are einsums over [D, heads, H] / [heads, H, D]: they must give our Linear's output.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, t.hidden_size)).astype(np.float32)
  attn = model.model.layers[1].self_attn
  for proj, n in (('q_proj', t.num_heads), ('k_proj', t.num_kv_heads), ('v_proj', t.num_kv_heads)):
    ours = x @ np.asarray(getattr(attn, proj).kernel.get_value())
    theirs = np.einsum('TD,DNH->TNH', x, tx[('layers', 1, 'attn', proj, 'w')])
    np.testing.assert_allclose(theirs.reshape(3, n * t.head_dim), ours, rtol=1e-6, atol=1e-6)
  h = rng.normal(size=(3, t.num_heads, t.head_dim)).astype(np.float32)
  ours = h.reshape(3, -1) @ np.asarray(attn.o_proj.kernel.get_value())
  np.testing.assert_allclose(np.einsum('TNH,NHD->TD', h, tx[('layers', 1, 'attn', 'o_proj', 'w')]), ours,
                             rtol=1e-6, atol=1e-6)
  mlp = model.model.layers[0].mlp
  np.testing.assert_array_equal(tx[('layers', 0, 'mlp', 'up_proj', 'kernel')],
                                np.asarray(mlp.up_proj.kernel.get_value()))
  np.testing.assert_array_equal(tx[('layers', 1, 'attn', 'k_bias')], np.asarray(attn.k_proj.bias.get_value()))


def test_adapters_round_trip_and_qwix_layout():
  cfg, model = _model(True)
  t = cfg.text
  ours = peers.our_adapters(model)
  tx = peers.lora_to_tunix(ours, t)
  assert len(tx) == len(ours) == 2 * 7 * t.num_layers
  back = peers.lora_from_tunix(tx, t)
  assert set(back) == set(ours)
  for k in ours:
    np.testing.assert_array_equal(back[k], ours[k], err_msg=str(k))
  # qwix's LoRA terms (the einsums it builds for Tunix's modules) equal ours, x @ A @ B, on every projection.
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, t.hidden_size)).astype(np.float32)
  for proj, n in (('q_proj', t.num_heads), ('v_proj', t.num_kv_heads)):
    a, b = (ours[('model', 'layers', 0, 'self_attn', proj, w)] for w in ('lora_a', 'lora_b'))
    theirs = np.einsum('TD,Dr,rNH->TNH', x, tx[('layers', 0, 'attn', proj, 'w_lora_a')],
                       tx[('layers', 0, 'attn', proj, 'w_lora_b')])
    np.testing.assert_allclose(theirs.reshape(3, n * t.head_dim), x @ a @ b, rtol=1e-5, atol=1e-5)
  h = rng.normal(size=(3, t.num_heads, t.head_dim)).astype(np.float32)
  a, b = (ours[('model', 'layers', 1, 'self_attn', 'o_proj', w)] for w in ('lora_a', 'lora_b'))
  theirs = np.einsum('TNH,NHr,rD->TD', h, tx[('layers', 1, 'attn', 'o_proj', 'w_lora_a')],
                     tx[('layers', 1, 'attn', 'o_proj', 'w_lora_b')])
  np.testing.assert_allclose(theirs, h.reshape(3, -1) @ a @ b, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(tx[('layers', 1, 'mlp', 'down_proj', 'kernel_lora_b')],
                                ours[('model', 'layers', 1, 'mlp', 'down_proj', 'lora_b')])


def test_mapping_errors_name_the_tensor():
  cfg, model = _model(False)
  hf = peers.text_tensors(hf_tensors_from_model(model, merge_lora=False))
  missing = {k: v for k, v in hf.items() if k != 'model.layers.1.mlp.up_proj.weight'}
  with pytest.raises(KeyError, match=r'model\.layers\.1\.mlp\.up_proj\.weight'):
    peers.hf_to_tunix(missing, cfg.text)
  with pytest.raises(KeyError, match='no place'):
    peers.hf_to_tunix({**hf, 'visual.blocks.0.norm1.weight': np.zeros(3)}, cfg.text)
  adapters = peers.our_adapters(model)
  del adapters[('model', 'layers', 0, 'mlp', 'gate_proj', 'lora_a')]
  with pytest.raises(KeyError, match='model/layers/0/mlp/gate_proj'):
    peers.lora_to_tunix(adapters, cfg.text)


def test_config_flops_and_summary_line():
  t = peers.PRESETS['small']().text
  kw = peers.tunix_config_kwargs(t)
  assert (kw['embed_dim'], kw['hidden_dim'], kw['num_kv_heads'], kw['rope_theta'], kw['use_tied_embedding']) == (
      t.hidden_size, t.intermediate_size, t.num_kv_heads, 1_000_000, True)
  assert 90e6 < peers.text_params(peers.base100m().text) < 110e6
  shared = peers.rollout_flops(t, 8, 8, 64, 64, shared_prompt=True, lora_rank=16)
  per_row = peers.rollout_flops(t, 8, 8, 64, 64, shared_prompt=False, lora_rank=16)
  assert 1.0 < per_row / shared < 3.0   # Tunix prefills each prompt G times and keeps every prompt logit
  assert peers.summary_line(2.345, 1.3) == 'peers: rollout 2.35x tunix, update 1.30x tunix'


def test_missing_tunix_says_how_to_install(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'tunix', None)   # makes `import tunix...` fail, installed or not
  with pytest.raises(SystemExit) as e:
    peers.main(['--configs', 'tiny'])
  assert 'pip install --no-deps -r requirements-bench.txt' in str(e.value)
