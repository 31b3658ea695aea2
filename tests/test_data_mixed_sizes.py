"""A MedAD directory shaped like a hospital export -- 20 images in 20 sizes (40x40 to 333x111) and five pixel
formats (grayscale, RGB, RGBA, 16-bit, palette), 100 questions plus three bad records -- through SFT, Con-GRPO and
evaluation on the tiny model with ``data.policy='skip'``: every record is used or counted with its reason in the
run summary, the SFT step sees a bounded set of batch shapes, checkpoints carry the config fingerprint, a
re-launch with another config is refused, and another run may start Con-GRPO from this run's SFT.

Images are padded one by one to a patches-per-image bucket chosen from the directory's own image sizes
(``train.pipeline.patch_buckets``, ``data.patch_buckets`` = 4 of them): the SFT step compiles at most one program
per (length bucket, patch bucket), and the metrics count them."""

import json
import os

import pytest

from medad_jax import launch, rundir
from medad_jax.testing.medad_dirs import write_mixed_size_dir
from medad_jax.train import pipeline as pl

ARGS = ['model.preset=tiny', 'data.source=medad38k', 'data.policy=skip', 'data.image_size=56',
        'data.read_threads=1', 'sft.batch_size=4', 'sft.max_steps=2', 'sft.optim.warmup_steps=0',
        'rl.prompts_per_step=2', 'rl.group_size=2', 'rl.max_steps=1', 'sampling.max_new_tokens=8',
        'eval.max_new_tokens=8', 'eval.max_examples=4', 'eval.batch_size=4', 'ckpt.async_save=False',
        'mesh.devices=1', 'judge.backend=rule', 'eval.include_sft=False',
        'eval.image_control=False',  # the 4 evaluated questions show one image: nothing to shuffle
        'vision_warmup.enabled=False']  # it batches images of one patch grid (refused below)


def _args(workdir, data_dir, cache, extra=()):
  return ['launch', '--config=congrpo', f'--workdir={workdir}', f'--config.data.dir={data_dir}',
          f'--config.data.cache_dir={cache}', *[f'--config.{a}' for a in ARGS + list(extra)]]


def test_mixed_sizes_end_to_end_every_record_accounted(tmp_path, monkeypatch):
  data_dir, cache, workdir = str(tmp_path / 'export'), str(tmp_path / 'cache'), str(tmp_path / 'run')
  manifest = write_mixed_size_dir(data_dir)
  assert len(manifest['sizes']) == 20
  shapes = []
  real = pl.sft_batch

  def recording(examples, cfg, *a, **k):
    b = real(examples, cfg, *a, **k)
    shapes.append((b['input_ids_BT'].shape, b['pixel_values_ILC'].shape[1:], b['target_pos_BM'].shape))
    return b

  monkeypatch.setattr(pl, 'sft_batch', recording)
  summary = launch.main(_args(workdir, data_dir, cache))
  d = summary['data']
  assert d['skipped'] == manifest['bad'] and d['skipped_total'] == 3
  assert d['used']['train'] + d['used']['test'] + d['skipped_total'] == manifest['records'] == 103
  assert {e['reason'] for e in d['skipped_examples']} == set(manifest['bad'])
  assert json.load(open(os.path.join(workdir, 'summary.json')))['data'] == d
  # SFT batch shapes (length, patch and target buckets) = compiled SFT step programs: at most 4 patch buckets
  assert len(shapes) >= 2
  assert 1 <= len({l for _, (l, _), _ in shapes}) <= 4
  sft_metrics = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))
                 if json.loads(l).get('stage') == 'sft']
  assert 1 <= sft_metrics[-1]['compiled_programs'] <= len(set(shapes))  # one per batch shape that ran
  assert len(set(shapes)) <= (len({t for (_, t), _, _ in shapes}) * len({l for _, (l, _), _ in shapes})
                              * len({m for _, _, (_, m) in shapes}))
  res = json.load(open(os.path.join(workdir, 'eval', 'results.json')))
  assert [p['num_questions'] for p in res['policies']] == [4, 4]
  # every checkpoint carries the run's config fingerprint
  from configs import common
  cfg = common.load('congrpo', [a[len('--config.'):] for a in _args(workdir, data_dir, cache)[3:]])
  for stage in ('sft', 'congrpo'):
    steps = [s for s in os.listdir(os.path.join(workdir, 'checkpoints', stage)) if s.isdigit()]
    meta = json.load(open(os.path.join(workdir, 'checkpoints', stage, max(steps, key=int), 'meta', 'metadata')))
    assert meta['config_fingerprint'] == rundir.fingerprint(cfg)
  # the same run directory with another learning rate: refused, nothing touched
  before = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(launch.ConfigError, match=r'rl.optim.lr: 0.001 -> 0.5'):
    launch.main(_args(workdir, data_dir, cache, ['rl.optim.lr=0.5']))
  assert open(os.path.join(workdir, 'config.json')).read() == before
  # an ablation sharing this run's SFT in a new run directory: allowed
  other = str(tmp_path / 'ablation')
  s2 = launch.main(_args(other, data_dir, cache, [f'sft.checkpoint={workdir}', 'rl.beta=0.0', 'rl.enabled=False',
                                                   'eval.enabled=False']))
  assert not os.path.exists(os.path.join(other, 'checkpoints', 'sft')) and s2['data'] == d


def test_vision_warmup_refuses_mixed_image_sizes_clearly(tmp_path):
  """The warm-up stacks whole images of one patch grid: on a directory of mixed sizes it stops before any training
  with a message that names the images' grids and the flag that turns it off."""
  data_dir, cache, workdir = str(tmp_path / 'export'), str(tmp_path / 'cache'), str(tmp_path / 'run')
  write_mixed_size_dir(data_dir)
  with pytest.raises(ValueError, match=r'vision_warmup: the images come in \d+ patch grids .*'
                                       r'--config\.vision_warmup\.enabled=False'):
    launch.main(_args(workdir, data_dir, cache, ['vision_warmup.enabled=True']))
  assert not os.path.isdir(os.path.join(workdir, 'checkpoints', 'sft')) or not os.listdir(
      os.path.join(workdir, 'checkpoints', 'sft'))
