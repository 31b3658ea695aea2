"""``python -m medad_jax.bench sft_padding`` on a small synthetic config: the table's rows, padding that falls with
length grouping, and a timed step per length."""

import re

from medad_jax.bench import sft_padding


def test_sft_padding_reports_less_padding_with_grouping(tmp_path, capsys):
  argv = ['--config=sft', '--config.model.preset=tiny', '--config.data.synth_images=40',
          '--config.data.image_size=56', '--config.data.read_threads=1', '--config.sft.batch_size=4',
          f'--config.data.cache_dir={tmp_path / "cache"}', f'--workdir={tmp_path / "run"}',
          '--groups', '0,4', '--buckets', '128,160,192', '--time', '--repeats', '1']
  assert sft_padding.main(argv) == 0
  out = capsys.readouterr().out
  assert 'cpu flags' in out and 'measured SFT step' in out
  rows = [l.split() for l in out.splitlines() if re.match(r'\s+[04]\s', l)]
  assert [(r[0], r[1]) for r in rows] == [('0', 'default'), ('0', '128,160,192'),
                                          ('4', 'default'), ('4', '128,160,192')]
  real = {(r[0], r[1]): float(r[3]) for r in rows}
  assert real[('4', '128,160,192')] > real[('0', '128,160,192')]
  assert all(0 < v <= 1 for v in real.values())
  assert rows[0][-1] == '1.00x'
