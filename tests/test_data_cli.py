"""``python -m medad_jax.data``: generate, bench, build, inspect, sheet; and the report helpers behind them."""

import json

import numpy as np
from PIL import Image

from medad_jax.data import regions, report
from medad_jax.data.__main__ import main


def test_generate_inspect_sheet_build(tmp_path, capsys):
  out = tmp_path / 'synth'
  assert main(['generate', '--out', str(out), '--num_images', '10', '--seed', '2', '--image_size', '56']) == 0
  stats = json.loads(capsys.readouterr().out)
  assert stats['images'] == 10 and stats['records'] == 50

  assert main(['inspect', '--jsonl_dir', str(out), '--json']) == 0
  s = json.loads(capsys.readouterr().out)['summary']
  assert s['train']['images'] + s['test']['images'] == 10 and s['test']['images'] == 3
  for split in ('train', 'test'):
    assert sum(s[split]['answer'].values()) == s[split]['records'] == 5 * s[split]['images']
    assert set(s[split]['task'].values()) == {s[split]['images']}
    assert sum(s[split]['region'].values()) == s[split]['records']

  assert main(['inspect', '--jsonl_dir', str(out)]) == 0
  text = capsys.readouterr().out
  assert '== train: 35 records, 7 images' in text and '50 records loaded' in text

  sheet = tmp_path / 'sheet.png'
  assert main(['sheet', '--jsonl_dir', str(out), '--out', str(sheet), '--n', '8', '--columns', '4']) == 0
  assert Image.open(sheet).size == (4 * 224, 2 * (224 + 30))

  data_dir = tmp_path / 'tfds'
  assert main(['build', '--data_dir', str(data_dir), '--synth', '--num_images', '10', '--seed', '2',
               '--image_size', '56']) == 0
  builder_dir = capsys.readouterr().out.strip().splitlines()[-1]
  assert main(['inspect', '--builder_dir', builder_dir, '--json']) == 0
  assert json.loads(capsys.readouterr().out)['summary'] == s  # same counts from the TFDS copy


def test_bench_reports_images_per_second(capsys):
  assert main(['bench', '--num_images', '4', '--image_size', '56']) == 0
  stats = json.loads(capsys.readouterr().out)
  assert stats['images'] == 4 and stats['images_per_s'] > 0 and stats['images_per_cpu_s'] > 0


def test_region_grid_drawn_where_regions_meet():
  im = np.asarray(report.draw_region_grid(Image.new('RGB', (101, 101))))
  yellow = np.array([255, 255, 0])
  for (xa, ya), (xb, yb) in regions.boundary_segments():
    for t in (0.2, 0.5, 0.8):
      x, y = xa + t * (xb - xa), ya + t * (yb - ya)
      np.testing.assert_array_equal(im[round(y * 100), round(x * 100)], yellow)
  for x, y in ((0.15, 0.15), (0.85, 0.85), (0.5, 0.5), (0.15, 0.85)):  # region interiors stay untouched
    np.testing.assert_array_equal(im[round(y * 100), round(x * 100)], [0, 0, 0])
