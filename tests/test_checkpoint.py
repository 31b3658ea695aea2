"""Checkpoint I/O: the 3B preset against transformers' meta-device model, HF->Flax->HF round trip, bad inputs,
checkpoints in the released layout (bf16 / fp16 shards) against transformers, bf16 export, the random writer."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

from medad_jax.model import checkpoint as ckpt
from medad_jax.model.config import Qwen25VLConfig, from_hf_config, to_hf_dict
from medad_jax.model.layers import BASE_PARAMS
from medad_jax.testing.write_checkpoint import hub_config_dict, write_random_checkpoint


@pytest.mark.parametrize('preset', ['qwen2_5_vl_3b', 'qwen2_5_vl_7b'])
def test_preset_names_shapes_and_count_match_transformers_meta(preset):
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

  cfg = Qwen25VLConfig.preset(preset)
  ours = {name: shape for name, shape, _, _ in ckpt.hf_tensor_specs(cfg)}
  # transformers builds the same model from the nested config we export and from the flat hub config.json.
  for layout in (to_hf_dict(cfg), hub_config_dict(cfg)):
    with torch.device('meta'):
      ref = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**layout))
    # transformers' module names are the v5 layout; our table speaks the hub layout.
    ref_shapes = {ckpt.canonical_hf_key(k): tuple(v.shape) for k, v in ref.state_dict().items()}
    if cfg.text.tie_word_embeddings:
      ref_shapes.pop('lm_head.weight')  # tied: the same tensor as embed_tokens
    assert ours == ref_shapes
    assert list(ref.config.text_config.rope_parameters['mrope_section']) == list(cfg.text.mrope_section)
  n_ref = sum(p.numel() for n, p in ref.named_parameters())  # named_parameters de-duplicates tied weights
  assert sum(int(np.prod(s)) for s in ours.values()) == n_ref
  if preset == 'qwen2_5_vl_3b':
    assert 3.7e9 < n_ref < 3.8e9  # the published "3B" model has 3.75B parameters (vision tower included)


def test_from_hf_config_reads_both_layouts(tmp_path):
  cfg = Qwen25VLConfig.qwen2_5_vl_3b()
  nested = to_hf_dict(cfg)
  flat = hub_config_dict(cfg)  # the flat hub layout of the released Qwen2.5-VL-3B-Instruct config.json
  assert flat['rope_scaling'] == {'type': 'mrope', 'mrope_section': [16, 24, 24]} and 'text_config' not in flat
  assert flat['vision_config']['in_chans'] == 3 and flat['hidden_size'] == 2048 and flat['tie_word_embeddings']
  for layout in (nested, flat):
    (tmp_path / 'config.json').write_text(json.dumps(layout))
    got = from_hf_config(str(tmp_path))
    assert got.text == cfg.text and got.vision == cfg.vision
    assert (got.image_token_id, got.vision_start_token_id) == (151655, 151652)


def test_round_trip_hf_flax_hf_is_bit_identical(tiny_hf_checkpoints, tmp_path):
  from safetensors.numpy import load_file
  for name, (cfg, path, _) in tiny_hf_checkpoints.items():
    model, cfg2 = ckpt.load_checkpoint(path)
    assert cfg2.text == cfg.text and cfg2.vision == cfg.vision
    out = str(tmp_path / name)
    ckpt.save_hf_checkpoint(model, out)
    a, b = load_file(os.path.join(path, 'model.safetensors')), load_file(os.path.join(out, 'model.safetensors'))
    if cfg.text.tie_word_embeddings:
      a.pop('lm_head.weight', None)
    assert sorted(a) == sorted(b), name
    for k in a:
      assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_export_loads_in_transformers_with_same_weights(tiny_hf_checkpoints, tmp_path):
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  cfg, path, ref = tiny_hf_checkpoints['tied_gqa4_win112']
  model, _ = ckpt.load_checkpoint(path)
  out = str(tmp_path / 'export')
  ckpt.save_hf_checkpoint(model, out, max_shard_bytes=200_000)  # forces a sharded index
  assert os.path.exists(os.path.join(out, 'model.safetensors.index.json'))
  back = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
  sd_ref, sd_back = ref.state_dict(), back.state_dict()
  assert sorted(sd_ref) == sorted(sd_back)
  for k in sd_ref:
    assert torch.equal(sd_ref[k], sd_back[k]), k
  # and the sharded export reads back through our own loader
  again, _ = ckpt.load_checkpoint(out)
  for (p, v), (_, w) in zip(nnx.to_flat_state(nnx.state(model, BASE_PARAMS)),
                            nnx.to_flat_state(nnx.state(again, BASE_PARAMS))):
    assert np.array_equal(np.asarray(v.get_value()), np.asarray(w.get_value())), p


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _rewrite(path, fn):
  from safetensors.numpy import load_file, save_file
  f = os.path.join(path, 'model.safetensors')
  t = load_file(f)
  fn(t)
  save_file(t, f, metadata={'format': 'pt'})


def test_bad_checkpoints_get_clear_errors(tiny_hf_checkpoints, tmp_path):
  cfg, path, _ = tiny_hf_checkpoints['untied_gqa2_win56']
  key = 'model.layers.1.self_attn.k_proj.weight'

  with pytest.raises(FileNotFoundError, match='does not exist'):
    ckpt.load_checkpoint(str(tmp_path / 'nope'))

  d = _copy(path, tmp_path / 'no_weights')
  os.remove(d / 'model.safetensors')
  (d / 'pytorch_model.bin').write_bytes(b'not loaded')
  with pytest.raises(FileNotFoundError, match='never loaded'):
    ckpt.load_checkpoint(str(d))

  d = _copy(path, tmp_path / 'no_config')
  os.remove(d / 'config.json')
  with pytest.raises(FileNotFoundError, match='config.json'):
    ckpt.load_checkpoint(str(d))

  d = _copy(path, tmp_path / 'missing')
  _rewrite(d, lambda t: t.pop(key))
  with pytest.raises(ckpt.CheckpointError, match=r'missing keys.*k_proj\.weight.*expected shape \(32, 64\)'):
    ckpt.load_checkpoint(str(d))

  d = _copy(path, tmp_path / 'unexpected')
  _rewrite(d, lambda t: t.update({'model.layers.1.self_attn.rotary.inv_freq': np.zeros(4, np.float32)}))
  with pytest.raises(ckpt.CheckpointError, match='unexpected keys.*rotary.inv_freq'):
    ckpt.load_checkpoint(str(d))

  d = _copy(path, tmp_path / 'shape')
  _rewrite(d, lambda t: t.update({key: np.zeros((16, 64), np.float32)}))
  with pytest.raises(ckpt.CheckpointError, match=r'k_proj.weight.*shape \(16, 64\).*expects \(32, 64\)'):
    ckpt.load_checkpoint(str(d))

  d = _copy(path, tmp_path / 'dtype')
  _rewrite(d, lambda t: t.update({key: np.zeros((32, 64), np.int32)}))
  with pytest.raises(ckpt.CheckpointError, match='k_proj.weight.*dtype int32'):
    ckpt.load_checkpoint(str(d))

  d = _copy(path, tmp_path / 'corrupt')
  (d / 'model.safetensors').write_bytes(b'\x00' * 20)
  with pytest.raises(ckpt.CheckpointError, match='not a readable safetensors'):
    ckpt.load_checkpoint(str(d))


# ----------------------------------------------------------------------------- hub layout: bf16 / fp16, sharded

TOL_MODEL = 1e-4  # fp32 whole-model logits
ST_DTYPE = {'bfloat16': 'BF16', 'float16': 'F16'}  # safetensors' names
TWO_PROMPTS = [[('t', 3), ('img', (1, 8, 12)), ('t', 5)], [('t', 2), ('img', (1, 6, 10)), ('t', 3)]]


def _safetensors_dtypes(path):
  from safetensors import safe_open
  out = {}
  for fn in os.listdir(path):
    if fn.endswith('.safetensors'):
      with safe_open(os.path.join(path, fn), 'np') as f:
        out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
  return out


def _weights_bytes(path):
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith('.safetensors'))


@pytest.fixture(scope='module')
def hub_checkpoints(tiny_hf_checkpoints, tmp_path_factory):
  """{dtype: (cfg, dir, torch model)}: the untied parity model written as the released checkpoints are (bf16 or
  fp16 shards + index, transformers-4 names, flat config.json)."""
  from medad_jax.testing.write_checkpoint import write_hf_model
  cfg, _, hf = tiny_hf_checkpoints['untied_gqa2_win56']
  out = {}
  for dtype in ('bfloat16', 'float16'):
    path = str(tmp_path_factory.mktemp(f'hub_{dtype}'))
    files = write_hf_model(hf, cfg, path, dtype=dtype, max_shard_bytes=150_000)
    assert len(files) > 1
    out[dtype] = (cfg, path, hf)
  return out


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_hub_layout_half_precision_checkpoint_matches_transformers(hub_checkpoints, dtype):
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration

  from medad_jax.testing.inputs import prompt_batch
  from medad_jax.testing.parity import hf_logits, our_logits
  cfg, path, hf32 = hub_checkpoints[dtype]
  # The layout of the released checkpoints.
  with open(os.path.join(path, 'model.safetensors.index.json')) as f:
    names = set(json.load(f)['weight_map'])
  assert {'model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.weight', 'visual.blocks.0.attn.qkv.weight',
          'visual.merger.mlp.0.weight', 'lm_head.weight'} <= names
  assert set(_safetensors_dtypes(path).values()) == {ST_DTYPE[dtype]}
  with open(os.path.join(path, 'config.json')) as f:
    hub_cfg = json.load(f)
  assert 'text_config' not in hub_cfg and hub_cfg['rope_scaling']['type'] == 'mrope'
  assert hub_cfg['num_hidden_layers'] == cfg.text.num_layers and hub_cfg['torch_dtype'] == dtype

  ours, cfg2 = ckpt.load_checkpoint(path)
  assert cfg2.text == cfg.text and cfg2.vision == cfg.vision and cfg2.param_dtype == 'float32'
  ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
  batch = prompt_batch(cfg, TWO_PROMPTS, seed=2)
  valid = batch['attention_mask'].astype(bool)
  want = hf_logits(ref, cfg, batch)
  got = our_logits(ours, batch)
  # Both sides compute in fp32 from the same half-precision-rounded weights: the fp32 whole-model tolerance.
  err = np.abs(got - want)[valid].max()
  assert err <= TOL_MODEL, err
  # Not vacuous: the rounding moved the model far beyond that tolerance (the fp32 original differs).
  moved = np.abs(hf_logits(hf32, cfg, batch) - want)[valid].max()
  assert moved > 10 * TOL_MODEL, moved

  # Loaded into the file's own dtype: every parameter is the stored value, bit for bit (no double rounding),
  # and computing in fp32 from it is the same computation as from the fp32 load.
  half, cfg3 = ckpt.load_checkpoint(path, param_dtype=dtype)
  assert cfg3.param_dtype == dtype
  full = dict(nnx.to_flat_state(nnx.state(ours, BASE_PARAMS)))
  for p, v in nnx.to_flat_state(nnx.state(half, BASE_PARAMS)):
    a = np.asarray(v.get_value())
    assert a.dtype == np.dtype(dtype) or str(a.dtype) == dtype, (p, a.dtype)
    assert np.array_equal(a.astype(np.float32), np.asarray(full[p].get_value())), p
  np.testing.assert_array_equal(our_logits(half, batch), got)


def test_bfloat16_export_round_trips_at_half_the_size(hub_checkpoints, tmp_path):
  import torch
  from safetensors import safe_open
  from transformers import Qwen2_5_VLForConditionalGeneration
  cfg, path, _ = hub_checkpoints['bfloat16']
  model, _ = ckpt.load_checkpoint(path)  # fp32 parameters
  bf, f32 = str(tmp_path / 'bf16'), str(tmp_path / 'fp32')
  ckpt.save_hf_checkpoint(model, bf, dtype='bfloat16', max_shard_bytes=150_000)
  ckpt.save_hf_checkpoint(model, f32)
  assert os.path.exists(os.path.join(bf, 'model.safetensors.index.json'))
  assert set(_safetensors_dtypes(bf).values()) == {'BF16'} and set(_safetensors_dtypes(f32).values()) == {'F32'}
  ratio = _weights_bytes(bf) / _weights_bytes(f32)
  assert 0.49 < ratio < 0.52, ratio  # (safetensors headers make it a little over one half)
  assert abs(_weights_bytes(bf) / _weights_bytes(path) - 1) < 0.02  # the size of the original
  with open(os.path.join(bf, 'config.json')) as f:
    assert json.load(f)['dtype'] == 'bfloat16'
  # Every tensor is the original bf16 value, bit for bit.
  orig = ckpt.SafetensorsReader(path)
  again = ckpt.SafetensorsReader(bf)
  assert sorted(orig.keys()) == sorted(again.keys())
  for k in orig.keys():
    a, b = orig.get(k), again.get(k)
    assert a.dtype == b.dtype and np.array_equal(a.view(np.uint16), b.view(np.uint16)), k
  # transformers reads it, and our loader too (into bf16 parameters).
  back = Qwen2_5_VLForConditionalGeneration.from_pretrained(bf)
  assert back.dtype == torch.bfloat16
  m2, _ = ckpt.load_checkpoint(bf, param_dtype='bfloat16')
  assert {str(v.get_value().dtype) for _, v in nnx.to_flat_state(nnx.state(m2, BASE_PARAMS))} == {'bfloat16'}
  with pytest.raises(ValueError, match="dtype='int8'"):
    ckpt.save_hf_checkpoint(model, str(tmp_path / 'bad'), dtype='int8')


def test_random_hub_checkpoint_writer_loads_here_and_in_transformers(tmp_path):
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration

  from medad_jax.testing import write_checkpoint as wc
  out = str(tmp_path / 'tiny')
  res = wc.main(['--preset=tiny', f'--out={out}', '--max_shard_gb=0.0001'])  # ~107 KB shards
  cfg = Qwen25VLConfig.tiny()
  specs = ckpt.hf_tensor_specs(cfg)
  assert res['tensors'] == len(specs) and len(res['files']) > 1
  with open(os.path.join(out, 'model.safetensors.index.json')) as f:
    assert sorted(json.load(f)['weight_map']) == sorted(name for name, _, _, _ in specs)
  assert set(_safetensors_dtypes(out).values()) == {'BF16'}
  assert not os.path.exists(os.path.join(out, 'tokenizer.json'))  # tiny does not use the Qwen2 vocabulary
  n = sum(int(np.prod(shape)) for _, shape, _, _ in specs)
  assert abs(res['bytes'] / (2 * n) - 1) < 0.05

  model, cfg2 = ckpt.load_checkpoint(out, param_dtype='bfloat16')
  assert cfg2.text == cfg.text and cfg2.vision == cfg.vision
  ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
  sd = {ckpt.canonical_hf_key(k): v for k, v in ref.state_dict().items()}
  reader = ckpt.SafetensorsReader(out)
  for name in reader.keys():
    a = reader.get(name)
    assert torch.equal(sd[name], torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)), name
  # transformers-like initialisation: RMSNorm scales 1, biases 0, matrices N(0, 0.02^2)
  w = reader.get('model.layers.0.mlp.up_proj.weight').astype(np.float32)
  assert abs(w.std() - wc.INIT_STD) < 0.002 and abs(w.mean()) < 0.002
  assert np.all(reader.get('model.norm.weight').astype(np.float32) == 1)
  assert np.all(reader.get('visual.blocks.0.attn.qkv.bias').astype(np.float32) == 0)
  # the same seed writes the same weights
  again = str(tmp_path / 'again')
  wc.write_random_checkpoint('tiny', again, tokenizer='none')
  other = ckpt.SafetensorsReader(again)
  assert all(np.array_equal(reader.get(k).view(np.uint16), other.get(k).view(np.uint16)) for k in reader.keys())
  with pytest.raises(ValueError, match='Qwen2 vocabulary'):
    wc.write_random_checkpoint('tiny', str(tmp_path / 'bad'), tokenizer='qwen2')


def test_random_writer_adds_the_qwen2_tokenizer_for_the_3b_preset(tmp_path):
  from medad_jax.api import load_tokenizer
  from medad_jax.testing import write_checkpoint as wc
  cfg = Qwen25VLConfig.qwen2_5_vl_3b()
  assert wc.uses_qwen2_vocabulary(cfg) and not wc.uses_qwen2_vocabulary(Qwen25VLConfig.small())
  wc._write_metadata(cfg, str(tmp_path), 'bfloat16', tokenizer=True)  # the 3B run without its 7.5 GB of weights
  tok = load_tokenizer(str(tmp_path))
  assert len(tok) == 151665 and tok.convert_tokens_to_ids('<|image_pad|>') == cfg.image_token_id
  assert from_hf_config(str(tmp_path)).text == cfg.text
