"""``python -m medad_jax.bench paper_scale`` end to end on the ``small`` preset (the 3B run is a documented command,
WORKSPACE.md "The model at paper scale"): the real SFT step, Con-GRPO update and sampler of ``congrpo:paper``
compiled with abstract weights on 1 device and on a faked 8-device ``fsdp=4,tensor=2`` mesh, XLA's memory per
device beside the planner's, and the machine-readable last line. Shapes cut (224-px images, 256-token answers) so
the test compiles in about two minutes."""

import json
import re

from medad_jax.bench import paper_scale

GiB = 2.0**30


def test_paper_scale_bench_on_the_small_preset(tmp_path, capsys):
  out = tmp_path / 'ps.json'
  argv = ['--preset=small', '--jobs=2', '--set', 'data.image_size=224', '--set', 'data.max_target_len=256',
          '--set', 'sampling.max_new_tokens=256', f'--json={out}']
  assert paper_scale.main(argv) == 0
  text = capsys.readouterr().out
  last = text.strip().splitlines()[-1]
  m = re.fullmatch(r'small per device: sft ([\d.]+) GiB, congrpo ([\d.]+) GiB \(1 device\); '
                   r'sft ([\d.]+) GiB, congrpo ([\d.]+) GiB \(8 devices\)', last)
  assert m, last
  sft1, cg1, sft8, cg8 = map(float, m.groups())
  res = {r['devices']: r for r in json.loads(out.read_text())['results']}
  assert set(res) == {1, 8}
  one, eight = res[1], res[8]
  # The printed figures are XLA's totals from the JSON, and the paper's shapes reached the compiled programs.
  assert abs(one['programs']['sft']['total'] / GiB - sft1) < 0.006
  assert abs(eight['programs']['congrpo']['total'] / GiB - cg8) < 0.006
  assert one['shapes']['congrpo'] == dict(prompts=8, group=8, prompt_len=194, completion_len=256, microbatches=4)
  assert one['shapes']['sft']['rows'] == 64 and one['shapes']['remat'] == 'full'
  # Sharding over 8 devices divides the memory per device (the frozen base alone is split 8 ways).
  assert sft8 < sft1 / 2 and cg8 < cg1 / 2
  for r in (one, eight):
    for name in ('sft', 'congrpo', 'sampler'):
      p = r['programs'][name]
      assert p['total'] > 0 and p['planned'] > 0 and p['compile_s'] > 0
  # The planner's Con-GRPO update agrees with XLA:CPU on one device (measured: -6 % here, -4 % at 3B; SFT is the
  # looser one here: -18 %, -8 % at 3B; WORKSPACE.md).
  cg = one['programs']['congrpo']
  assert abs(cg['planned'] - cg['total']) / cg['total'] < 0.10
  sft = one['programs']['sft']
  assert abs(sft['planned'] - sft['total']) / sft['total'] < 0.25
