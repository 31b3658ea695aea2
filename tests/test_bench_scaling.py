"""The scaling benchmark end to end on the tiny preset: one subprocess per faked mesh size, the batch really split
over the mesh, one compile per point, and the printed tables."""

import json

import pytest

from medad_jax.bench import scaling


def test_points_cover_the_three_sweeps_and_bad_flags_fail():
  args = scaling.parse_args(['--devices', '1,2,4', '--groups', '2,8', '--lengths', '16'])
  pts = scaling.plan_points(args)
  assert [p.devices for p in pts if p.sweep == 'mesh'] == [1, 2, 4]
  assert [p.group for p in pts if p.sweep == 'group'] == [2, 8]
  assert [(p.devices, p.completion_len) for p in pts if p.sweep == 'length'] == [(1, 16)]
  assert all(p.prompts == args.prompts for p in pts)   # fixed global batch
  with pytest.raises(SystemExit, match='--devices'):
    scaling.plan_points(scaling.parse_args(['--devices', '1,x']))


def test_scaling_benchmark_runs_on_faked_meshes(tmp_path, capsys):
  out = tmp_path / 'scaling.json'
  argv = ['--preset', 'tiny', '--layers', '1', '--devices', '1,2', '--groups', '2', '--lengths', '8,4',
          '--prompts', '2', '--group', '2', '--prompt-len', '16', '--completion-len', '8', '--repeats', '1',
          '--peak-size', '256', '--json', str(out)]
  assert scaling.main(argv) == 0
  text = capsys.readouterr().out
  assert 'vs faked CPU mesh size (data=devices; fixed global batch P=2 x G=2' in text
  assert 'vs group size G' in text and 'vs answer length N' in text
  res = json.loads(out.read_text())['results']
  mesh = {r['devices']: r for r in res if r['sweep'] == 'mesh'}
  assert set(mesh) == {1, 2}
  # The 2-device run really splits the 4 rollouts over the mesh; every point compiled once and gave a loss.
  assert mesh[1]['rollouts_per_device'] == 4 and mesh[2]['rollouts_per_device'] == 2
  assert all(r['traces'] == 1 and r['step_s'] > 0 and r['update_flops'] > 0 for r in res)
  length = sorted((r['completion_len'], r['tokens']) for r in res if r['sweep'] == 'length')
  assert length == [(4, 2 * 16 + 4 * 4), (8, 2 * 16 + 4 * 8)]
  # The shared 1-device point (G=2, N=8) was timed once and reused by the sweeps.
  shared = [r for r in res if r['devices'] == 1 and r['group'] == 2 and r['completion_len'] == 8]
  assert len(shared) == 3 and len({r['step_s'] for r in shared}) == 1
