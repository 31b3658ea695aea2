"""CLI: ``python -m medad_jax.data {generate,bench,build,inspect,sheet} ...``.

  generate  write a medad-synth directory (images/*.png + train.jsonl + test.jsonl)
            python -m medad_jax.data generate --out /tmp/medad_synth --num_images 2000 --seed 0 [--workers 2]
  bench     images/s of medad-synth generation in one process (one core)
            python -m medad_jax.data bench --num_images 300
  build     TFDS array_record dataset from medad-synth or from a MedAD-38K directory
            python -m medad_jax.data build --data_dir /tmp/tfds --synth --num_images 2000
            python -m medad_jax.data build --data_dir /tmp/tfds --manual_dir /data/MedAD-38K --policy skip
  inspect   counts per split of task / modality / anatomy / answer letter / region (+ the load report)
            python -m medad_jax.data inspect --jsonl_dir /tmp/medad_synth [--policy skip] [--json]
            python -m medad_jax.data inspect --builder_dir /tmp/tfds/medad_synth/n2000_s0_px224_realistic/1.0.0
  sheet     contact-sheet PNG of sample images with the five-region grid drawn
            python -m medad_jax.data sheet --jsonl_dir /tmp/medad_synth --out /tmp/sheet.png --n 24
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from medad_jax.data import images, loader, report, synth

log = logging.getLogger('medad_jax.data')


def _synth_args(p: argparse.ArgumentParser) -> None:
  d = synth.SynthConfig()
  p.add_argument('--num_images', type=int, default=d.num_images)
  p.add_argument('--seed', type=int, default=d.seed)
  p.add_argument('--image_size', type=int, default=d.image_size)
  p.add_argument('--abnormal_fraction', type=float, default=d.abnormal_fraction)
  p.add_argument('--test_fraction', type=float, default=d.test_fraction)
  p.add_argument('--pairs', choices=('realistic', 'all'), default=d.pairs)
  p.add_argument('--lesion_scale', type=float, default=d.lesion_scale, help='lesion size factor (conspicuity)')


def _synth_cfg(a) -> synth.SynthConfig:
  return synth.SynthConfig(num_images=a.num_images, seed=a.seed, image_size=a.image_size,
                           abnormal_fraction=a.abnormal_fraction, test_fraction=a.test_fraction, pairs=a.pairs,
                           lesion_scale=a.lesion_scale)


def _source_args(p: argparse.ArgumentParser) -> None:
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument('--jsonl_dir', help='a MedAD-layout directory (*.jsonl + images)')
  g.add_argument('--builder_dir', help='a built TFDS dataset directory (.../<config>/<version>)')
  p.add_argument('--policy', choices=loader.POLICIES, default='strict')
  p.add_argument('--split', action='append', help='split(s) to read from --builder_dir (default: all)')


def _records(a):
  if a.jsonl_dir:
    return loader.load_jsonl_dir(a.jsonl_dir, policy=a.policy)
  import tensorflow_datasets as tfds
  from medad_jax.data import tfds_builders
  splits = a.split or list(tfds.builder_from_directory(a.builder_dir).info.splits)
  recs = [r for s in splits for r in tfds_builders.RecordSource(a.builder_dir, s)]
  return recs, None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m medad_jax.data', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='cmd', required=True)
  p = sub.add_parser('generate', help='write a medad-synth directory')
  _synth_args(p)
  p.add_argument('--out', required=True)
  p.add_argument('--workers', type=int, default=1)
  p = sub.add_parser('bench', help='images/s of medad-synth generation on one core')
  _synth_args(p)
  p = sub.add_parser('build', help='build a TFDS array_record dataset')
  _synth_args(p)
  p.add_argument('--data_dir', required=True)
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument('--synth', action='store_true', help='build medad-synth from the --num_images/--seed/... flags')
  g.add_argument('--manual_dir', help='a MedAD-38K directory (*.jsonl + images)')
  p.add_argument('--policy', choices=loader.POLICIES, default='strict')
  p.add_argument('--max_image_pixels', type=int, default=images.DEFAULT_MAX_PIXELS,
                 help='refuse larger images (<= 0: no cap)')
  p = sub.add_parser('inspect', help='label counts per split')
  _source_args(p)
  p.add_argument('--json', action='store_true', help='print the counts as JSON')
  p = sub.add_parser('sheet', help='contact sheet PNG with the five-region grid')
  _source_args(p)
  p.add_argument('--out', required=True)
  p.add_argument('--n', type=int, default=24)
  p.add_argument('--columns', type=int, default=6)
  p.add_argument('--seed', type=int, default=0)
  a = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')

  if a.cmd == 'generate':
    stats = synth.write_dir(_synth_cfg(a), a.out, workers=a.workers)
    sys.stdout.write(json.dumps(stats) + '\n')
  elif a.cmd == 'bench':
    stats = synth.benchmark(_synth_cfg(a), num_images=a.num_images)
    sys.stdout.write(json.dumps(stats) + '\n')
  elif a.cmd == 'build':
    from medad_jax.data import tfds_builders
    if a.synth:
      path = tfds_builders.build_synth(_synth_cfg(a), a.data_dir)
    else:
      path = tfds_builders.build_medad38k(a.manual_dir, a.data_dir, policy=a.policy,
                                          max_image_pixels=a.max_image_pixels)
    sys.stdout.write(path + '\n')
  elif a.cmd == 'inspect':
    recs, rep = _records(a)
    summary = report.summarize(recs)
    if a.json:
      sys.stdout.write(json.dumps({'summary': summary, 'skipped': rep.counts() if rep else {}}, indent=1) + '\n')
    else:
      sys.stdout.write(report.format_summary(summary) + '\n')
      if rep is not None:
        sys.stdout.write(rep.summary() + '\n')
        for s in rep.skipped:
          sys.stdout.write(f'  skipped {s.message}\n')
  elif a.cmd == 'sheet':
    recs, _ = _records(a)
    picked = report.pick_one_per_image(recs, a.n, seed=a.seed)
    report.contact_sheet(picked, columns=a.columns).save(a.out)
    log.info('wrote %s (%d images)', a.out, len(picked))
  return 0


def cli(argv=None) -> int:
  """``main`` with one-line errors: a bad record, a missing directory or a bad value is reported as
  ``error: <what, where, what was expected>`` (exit status 2), not as a traceback."""
  from medad_jax.data.schema import RecordError
  try:
    return main(argv)
  except (RecordError, FileNotFoundError, ValueError) as e:
    sys.stderr.write(f'error: {e}\n')
    return 2


if __name__ == '__main__':
  sys.exit(cli())
