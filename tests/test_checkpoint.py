"""Checkpoint I/O: the 3B preset against transformers' meta-device model, HF->Flax->HF round trip, bad inputs."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

from medad_jax.model import checkpoint as ckpt
from medad_jax.model.config import Qwen25VLConfig, from_hf_config, to_hf_dict
from medad_jax.model.layers import BASE_PARAMS


def _our_hf_shapes(cfg):
  from medad_jax.model.qwen25vl import Qwen25VL
  abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
  out = {}
  for path, v in nnx.to_flat_state(nnx.state(abstract, BASE_PARAMS)):
    key, transform = ckpt.path_to_hf_key(tuple(path))
    shape = tuple(v.get_value().shape)
    if transform == 'linear':
      shape = shape[::-1]
    elif transform == 'patch':
      vc = cfg.vision
      shape = (vc.hidden_size, vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size)
    out[key] = shape
  return out


@pytest.mark.parametrize('preset', ['qwen2_5_vl_3b', 'qwen2_5_vl_7b'])
def test_preset_names_shapes_and_count_match_transformers_meta(preset):
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

  cfg = Qwen25VLConfig.preset(preset)
  with torch.device('meta'):
    ref = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**to_hf_dict(cfg)))
  # transformers' module names are the v5 layout; our table speaks the hub layout.
  ref_shapes = {ckpt.canonical_hf_key(k): tuple(v.shape) for k, v in ref.state_dict().items()}
  if cfg.text.tie_word_embeddings:
    ref_shapes.pop('lm_head.weight')  # tied: the same tensor as embed_tokens
  ours = _our_hf_shapes(cfg)
  assert ours == ref_shapes
  n_ref = sum(p.numel() for n, p in ref.named_parameters())  # named_parameters de-duplicates tied weights
  assert sum(int(np.prod(s)) for s in ours.values()) == n_ref
  if preset == 'qwen2_5_vl_3b':
    assert 3.7e9 < n_ref < 3.8e9  # the published "3B" model has 3.75B parameters (vision tower included)


def test_from_hf_config_reads_both_layouts(tmp_path):
  cfg = Qwen25VLConfig.qwen2_5_vl_3b()
  nested = to_hf_dict(cfg)
  # The flat hub layout of the released Qwen2.5-VL-3B-Instruct config.json.
  t = nested['text_config']
  flat = {k: v for k, v in t.items() if k not in ('rope_parameters', 'model_type')}
  flat.update(model_type='qwen2_5_vl', rope_theta=t['rope_parameters']['rope_theta'],
              rope_scaling={'type': 'mrope', 'mrope_section': t['rope_parameters']['mrope_section']},
              vision_config={k: v for k, v in nested['vision_config'].items() if k != 'rope_parameters'},
              image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
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
