"""The seed sweep (``python -m medad_jax.sweep``) on a tiny smoke config: 2 variants x 2 seeds, the SFT stage of a seed
reused by its RL variant (``sft.checkpoint``), pi_SFT evaluated once per seed, a half-finished sweep resumed, tables
(markdown + JSON, mean ± std over seeds beside the paper's numbers) and the plot."""

import json
import os

import numpy as np
import pytest

from medad_jax import launch, sweep
from medad_jax.judge.evidence import PARTS

CONFIG = 'congrpo:evidence'

# The launcher's smoke set, cut to one SFT and one Con-GRPO step, 2 evaluation questions and the rule judge: the
# test checks the sweep's plumbing (4 real runs), not learning.
SMOKE = ['model.preset=tiny', 'data.synth_images=20', 'data.image_size=56', 'data.read_threads=1',
         'sft.batch_size=4', 'sft.max_steps=1', 'sft.optim.warmup_steps=0', 'rl.prompts_per_step=2',
         'rl.group_size=2', 'rl.max_steps=1', 'sampling.max_new_tokens=8', 'eval.max_new_tokens=8',
         'eval.max_examples=2', 'eval.batch_size=2', 'ckpt.every_steps=2', 'ckpt.async_save=False',
         'mesh.devices=1', 'log.tensorboard=False', 'judge.backend=rule',
         'eval.image_control=False']  # the 2 evaluated questions show one image: nothing to shuffle


def test_plan_reuses_sft_per_seed():
  runs = sweep.plan('congrpo', ['rl_only', 'balanced', 'sft_only'], [3], 'out', ['rl.max_steps=1'])
  assert [(r['variant'], r['requested']) for r in runs] == [('sft_only', True), ('rl_only', True),
                                                             ('balanced', True)]
  sft, rl_only, bal = (r['argv'] for r in runs)
  assert sft == ['launch', '--config=congrpo:sft_only', '--workdir=out/seed3/sft_only', '--config.seed=3',
                 '--config.rl.max_steps=1']
  assert '--config.sft.checkpoint' not in ' '.join(rl_only)  # RL-only starts from the random base model
  assert bal[-2:] == ['--config.sft.checkpoint=out/seed3/sft_only', '--config.eval.include_sft=False']
  # A variant that needs SFT brings the seed's SFT run even when sft_only is not requested (not a table row then).
  runs = sweep.plan('congrpo:paper', ['acc_only'], [0], 'o')
  assert [(r['variant'], r['requested']) for r in runs] == [('sft_only', False), ('acc_only', True)]
  assert runs[1]['argv'][1] == '--config=congrpo:paper,acc_only'
  # Only RL-only: no SFT run at all.
  assert [r['variant'] for r in sweep.plan('congrpo', ['rl_only'], [0, 1], 'o')] == ['rl_only', 'rl_only']


def test_cli_arguments_and_bad_input(tmp_path):
  args, ov = sweep.parse_args(['sweep', '--config=congrpo', '--variants=sft_only, balanced', '--seeds=0,2',
                               '--config.rl.max_steps=3', '--max_runs=1'])
  assert (args.variants, args.seeds, args.max_runs, ov) == (['sft_only', 'balanced'], [0, 2], 1, ['rl.max_steps=3'])
  assert args.out == os.path.join('runs', 'sweep-congrpo')
  with pytest.raises(sweep.SweepError, match='expected comma-separated integers'):
    sweep.parse_args(['sweep', '--config=congrpo', '--variants=a', '--seeds=0,x'])
  with pytest.raises(sweep.SweepError, match="variant 'nope'"):
    sweep.run_sweep('congrpo', ['nope'], [0], str(tmp_path), launch_fn=lambda argv: pytest.fail('ran'))
  with pytest.raises(sweep.SweepError, match='repeated'):
    sweep.run_sweep('congrpo', ['balanced', 'balanced'], [0], str(tmp_path), launch_fn=lambda argv: {})


def _overall(run_dir, policy):
  res = json.loads((run_dir / 'eval' / 'results.json').read_text())
  pols = {p['name']: p for p in res['policies']}
  return 100 * float(np.mean([s['overall'] for s in pols[policy]['per_seed']])), sorted(pols)


@pytest.mark.heavy
def test_smoke_sweep_two_variants_two_seeds_resumed(tmp_path):
  out = tmp_path / 'sweep'
  overrides = [*SMOKE, f'data.cache_dir={tmp_path / "cache"}']
  launched = []

  def counting(argv):
    launched.append(next(a for a in argv if a.startswith('--workdir=')).split('/')[-2:])
    return launch.main(argv)

  # First call: stops after 3 runs (a half-finished sweep).
  # The base variant 'evidence' (evidence-aware R_con, rule judge) rides along: every run of the sweep uses it.
  state = sweep.run_sweep(CONFIG, ['sft_only', 'balanced'], [0, 1], str(out), overrides, max_runs=3,
                          launch_fn=counting)
  assert launched == [['seed0', 'sft_only'], ['seed0', 'balanced'], ['seed1', 'sft_only']]
  assert state['runs']['seed1/balanced']['status'] == 'pending'
  part = json.loads((out / 'tables' / 'table2.json').read_text())
  full = next(r for r in part['rows'] if r['variant'] == 'balanced')
  assert full['ours']['overall']['n'] == 1 and full['seeds'] == [0]

  # Second call: the three finished runs are skipped, only the missing one runs.
  launched.clear()
  state = sweep.run_sweep(CONFIG, ['sft_only', 'balanced'], [0, 1], str(out), overrides, launch_fn=counting)
  assert launched == [['seed1', 'balanced']]
  assert {k: v['status'] for k, v in state['runs'].items()} == {
      'seed0/sft_only': 'done', 'seed0/balanced': 'done', 'seed1/sft_only': 'done', 'seed1/balanced': 'done'}
  assert all(v['seconds'] > 0 for v in state['runs'].values())

  for s in (0, 1):
    sft_dir, rl_dir = out / f'seed{s}' / 'sft_only', out / f'seed{s}' / 'balanced'
    cfg = json.loads((rl_dir / 'config.json').read_text())
    # The RL run started from its seed's SFT run and trained no SFT of its own.
    assert cfg['sft']['checkpoint'] == str(sft_dir) and cfg['seed'] == s
    assert not (rl_dir / 'checkpoints' / 'sft').exists() and (sft_dir / 'checkpoints' / 'sft').is_dir()
    # pi_SFT is evaluated once per seed, in the SFT run; the RL run evaluates its final policy only.
    _, sft_pols = _overall(sft_dir, 'SFT')
    _, rl_pols = _overall(rl_dir, 'SFT + Con-GRPO')
    assert 'SFT' in sft_pols and 'SFT' not in rl_pols and 'SFT + Con-GRPO' in rl_pols
    # The evidence-aware R_con logs each of its five parts at every Con-GRPO step.
    recs = [json.loads(line) for line in (rl_dir / 'metrics.jsonl').read_text().splitlines()]
    rl_recs = [r for r in recs if r.get('stage') == 'congrpo']
    assert rl_recs and all(f'reward_con_{p}' in r for r in rl_recs for p in PARTS)
    assert cfg['judge']['con_mode'] == 'evidence'

  # Tables: mean ± std over the two seeds, beside the paper's numbers, in JSON and markdown.
  t2 = json.loads((out / 'tables' / 'table2.json').read_text())
  t3 = json.loads((out / 'tables' / 'table3.json').read_text())
  full = next(r for r in t2['rows'] if r['variant'] == 'balanced')
  vals = [_overall(out / f'seed{s}' / 'balanced', 'SFT + Con-GRPO')[0] for s in (0, 1)]
  assert full['paper'] == {'mean': 85.15, 'std': 0.95} and full['seeds'] == [0, 1]
  assert full['ours']['overall']['mean'] == pytest.approx(np.mean(vals), abs=1e-3)
  assert full['ours']['overall']['std'] == pytest.approx(np.std(vals), abs=1e-3)
  assert set(full['ours']) == set(sweep.COLUMNS)
  sft_row = next(r for r in t2['rows'] if r['variant'] == 'sft_only')
  assert sft_row['ours']['overall']['n'] == 2
  assert next(r for r in t2['rows'] if r['variant'] == 'rl_only')['ours']['overall']['n'] == 0
  bal3 = next(r for r in t3['rows'] if r['variant'] == 'balanced')
  assert bal3['ours'] == full['ours'] and bal3['weights'] == pytest.approx([1 / 3] * 3)
  md = (out / 'tables' / 'table2.md').read_text()
  cell = f'{np.mean(vals):.2f} ± {np.std(vals):.2f}'
  assert '| MedAD-R1 (Full Model) | 85.15 ± 0.95 |' in md and cell in md and '| 0,1 |' in md
  assert '| RL-only (Con-GRPO) | 73.22 ± 2.58 | - |' in md
  assert 'Overall | Format | Consistency' in md
  assert '| Balanced (Ours) | 0.33 | 0.33 | 0.33 | 85.15 ± 0.95 |' in (out / 'tables' / 'table3.md').read_text()
  assert (out / 'tables' / 'sweep.png').stat().st_size > 10_000

  # The same directory with other overrides is refused: runs of different settings must not be averaged.
  with pytest.raises(sweep.SweepError, match='holds a sweep with overrides'):
    sweep.run_sweep(CONFIG, ['balanced'], [0], str(out), [*overrides, 'rl.beta=0.0'], launch_fn=counting)
