"""``python -m medad_jax.bench paper_scale`` end to end on the small preset at small shapes: the real SFT step,
Con-GRPO update and sampler compiled with abstract weights, XLA's memory beside the planner's, the last line's
format (the 3B run prints the same line with its figures; WORKSPACE.md "Memory and FLOPs plan")."""

import json
import re
import subprocess
import sys

PLAN_VS_XLA = 0.10   # the planner agrees with XLA's compiled memory within 10% on 1 device


def test_paper_scale_bench_on_the_small_preset(tmp_path):
  out_json = tmp_path / 'paper_scale.json'
  cmd = [sys.executable, '-m', 'medad_jax.bench', 'paper_scale', '--preset=small', '--meshes=data=1',
         f'--json={out_json}', '--set=data.image_size=112', '--set=data.max_target_len=32',
         '--set=sampling.max_new_tokens=32', '--set=sft.batch_size=8', '--set=rl.prompts_per_step=4',
         '--set=rl.group_size=2']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  last = proc.stdout.strip().splitlines()[-1]
  m = re.fullmatch(r'small per device: sft (\d+\.\d\d) GiB, congrpo (\d+\.\d\d) GiB \(1 device\)', last)
  assert m, last
  (r,) = json.loads(out_json.read_text())['results']
  progs = r['programs']
  assert set(progs) == {'sft', 'congrpo', 'sampler'} and r['devices'] == 1
  # The last line carries XLA's per-device totals (arguments + outputs - donated aliases + temporaries).
  assert float(m.group(1)) == round(progs['sft']['total'] / 2**30, 2)
  assert float(m.group(2)) == round(progs['congrpo']['total'] / 2**30, 2)
  for name in ('sft', 'congrpo'):
    p = progs[name]
    assert p['temp'] > 0 and p['argument'] > 0
    assert abs(p['planned'] - p['total']) <= PLAN_VS_XLA * p['total'], (name, p['planned'], p['total'])
  assert progs['sampler']['total'] > 0
