"""The pixel-ceiling probe (``python -m medad_jax.bench probe``): it sees the images as the model does, and on a
small medad-synth build it learns modality from the pixels far above the blind answer prior."""

import json

import numpy as np
import pytest

from medad_jax.bench import probe
from medad_jax.train.evaluate import TABLE1


def test_model_view_puts_the_processors_patches_back_in_place():
  from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

  from medad_jax.model.config import Qwen25VLConfig
  from medad_jax.processor import Qwen25VLProcessor
  from medad_jax.tokenizer import train_small_tokenizer
  tok = train_small_tokenizer(['a small corpus for a small tokenizer'] * 4, 300)
  proc = Qwen25VLProcessor(tok, Qwen25VLConfig.preset('mini').vision, min_pixels=28 * 28, max_pixels=56 * 84)
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)   # 2 x 3 merged patches: no resize
  x = probe.model_view(proc, pixels)
  want = (pixels / 255.0 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
  assert x.shape == (56, 84, 3)
  np.testing.assert_allclose(x, want, atol=1e-5)
  # A larger image is resized to the processor's pixel budget, as the model would see it.
  assert probe.model_view(proc, rng.integers(0, 256, (140, 140, 3), dtype=np.uint8)).shape == (56, 56, 3)


def test_view_to_patches_inverts_model_view_to_the_processors_patches():
  from medad_jax.model.config import Qwen25VLConfig
  from medad_jax.processor import Qwen25VLProcessor
  from medad_jax.tokenizer import train_small_tokenizer
  tok = train_small_tokenizer(['a small corpus for a small tokenizer'] * 4, 300)
  vcfg = Qwen25VLConfig.preset('mini').vision
  proc = Qwen25VLProcessor(tok, vcfg, min_pixels=28 * 28, max_pixels=56 * 84)
  pixels = np.random.default_rng(1).integers(0, 256, (56, 84, 3), dtype=np.uint8)
  pv_LP, grid = proc.process_image(pixels)
  assert grid.tolist() == [1, 4, 6]
  np.testing.assert_array_equal(probe.view_to_patches(probe.model_view(proc, pixels), vcfg), pv_LP)


def test_vit_probe_runs_the_runs_vision_tower_and_learns_modality(tmp_path, capsys):
  out = tmp_path / 'probe.json'
  argv = [f'--config.data.cache_dir={tmp_path / "cache"}', '--config.data.synth_images=200',
          '--config.data.image_size=56', '--config.data.test_fraction=0.3', '--arch', 'vit', '--epochs', '15', '--seeds', '0', '--json', str(out)]
  assert probe.main(argv) == 0
  assert "the run's vision tower" in capsys.readouterr().out
  res = json.loads(out.read_text())
  assert res['settings']['arch'] == 'vit' and res['overall']['arch'] == 'vit'
  mod = {r['task']: r for r in res['tasks']}['modality_classification']
  # As for the CNN below: 60 test questions over 10 modalities; the tower must read the palette well above the
  # blind prior (~20-30 %).
  assert mod['probe'] >= mod['prior'] + 0.30, mod


def test_probe_reads_modality_from_pixels_far_above_the_prior(tmp_path, capsys):
  out = tmp_path / 'probe.json'
  argv = [f'--config.data.cache_dir={tmp_path / "cache"}', '--config.data.synth_images=200',
          '--config.data.image_size=56', '--config.data.test_fraction=0.3', '--epochs', '15', '--seeds', '0', '--json', str(out)]
  assert probe.main(argv) == 0
  text = capsys.readouterr().out
  table = text[text.index('pixel ceilings'):]
  for task, _ in TABLE1:
    assert task in table
  assert 'overall' in table and 'machine: ' in text and 'cpu flags:' in text
  res = json.loads(out.read_text())
  tasks = {r['task']: r for r in res['tasks']}
  assert list(tasks) == [t for t, _ in TABLE1]
  assert res['overall']['image_shape'] == [56, 56, 3] and res['overall']['images'] == 200
  mod = tasks['modality_classification']
  # 200 images, 30 % test: 60 modality questions over 10 modalities. The blind prior (the most frequent correct
  # text of train) gets ~20-30 %; the CNN, trained 15 passes over 140 images, reads the modality's palette and
  # framing (measured on one machine: 100 %). Margin 30 points on 60 questions = 18 more questions right than the prior.
  assert mod['n_test'] == 60 and mod['n_train'] == 140
  assert mod['probe'] >= mod['prior'] + 0.30, mod
  assert all(r['n_test'] == 60 for r in tasks.values())


def test_bad_run_config_key_is_refused_before_any_work():
  with pytest.raises(SystemExit, match='unknown config key --config.data.no_such_key'):
    probe.main(['--config.data.no_such_key=1'])
