"""The notebooks: committed stripped, executed end to end with ``nbclient`` on the CI budget (in a temp copy, never
written back), and the ``medad_jax.notebook_utils`` helpers they call, against hand-computed values.

Execution order shares work: 03_results makes one ~1 minute smoke run through the launcher, and 02_rollout_explorer
then restores its policy from that run directory (the ``RUN_DIR`` path) as well as building a random one (the
default path).
"""

import json
import os
import pathlib
import shutil

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from medad_jax import notebook_utils as nu

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / 'notebooks'
EXPECTED = ('01_data_explorer.ipynb', '02_rollout_explorer.ipynb', '03_results.ipynb')
CELL_TIMEOUT_S = 240


# ------------------------------------------------------------------------------------------- committed form


def test_committed_notebooks_are_stripped():
  assert tuple(sorted(p.name for p in NOTEBOOKS.glob('*.ipynb'))) == EXPECTED
  for path in NOTEBOOKS.glob('*.ipynb'):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == 'python3', path.name
    assert 'widgets' not in nb.metadata, path.name
    for i, cell in enumerate(nb.cells):
      if cell.cell_type == 'code':
        assert cell.outputs == [], f'{path.name} cell {i} has outputs: strip them before committing'
        assert cell.execution_count is None, f'{path.name} cell {i} has an execution count'
      assert 'execution' not in cell.metadata, f'{path.name} cell {i} keeps execution timings'


# ------------------------------------------------------------------------------------------- helpers


def test_budget_reads_and_checks_the_env_var(monkeypatch):
  monkeypatch.delenv(nu.BUDGET_ENV, raising=False)
  assert nu.budget() == 'full'
  monkeypatch.setenv(nu.BUDGET_ENV, ' CI ')
  assert nu.budget() == 'ci'
  monkeypatch.setenv(nu.BUDGET_ENV, 'tiny')
  with pytest.raises(ValueError, match=r'\$MEDAD_NB_BUDGET.*tiny'):
    nu.budget()


def test_markdown_table_escapes_cells_and_checks_row_width():
  t = nu.markdown_table(['a', 'b'], [['x|y', 0.12345], ['two\nlines', float('nan')]])
  assert t.splitlines() == ['| a | b |', '| --- | --- |', '| x\\|y | 0.123 |', '| two lines | nan |']
  with pytest.raises(ValueError, match='row 1 has 1 cells, expected 2'):
    nu.markdown_table(['a', 'b'], [[1, 2], [3]])


def test_mean_std_cell_uses_population_std_and_drops_missing():
  assert nu.mean_std_cell([0.5, 0.7]) == '60.00 ± 10.00 (n=2)'
  assert nu.mean_std_cell([0.25, float('nan'), None]) == '25.00 ± 0.00 (n=1)'
  assert nu.mean_std_cell([]) == '-'


def test_balance_rows_follow_the_vocabulary_and_count_every_record():
  from medad_jax.data import LETTERS, MODALITIES, TASKS, report, synth
  records = [r for _, rs in synth.generate(synth.SynthConfig(num_images=12, image_size=56)) for r in rs]
  summary = report.summarize(records)
  per_split = {s: sum(r.split == s for r in records) for s in ('train', 'test')}
  for axis, vocab in (('task', TASKS), ('modality', MODALITIES), ('answer', LETTERS)):
    headers, rows = nu.balance_rows(summary, axis)
    assert headers == [axis, 'test', 'train']
    keys = [r[0] for r in rows]
    assert keys == sorted(keys, key=vocab.index)
    assert [sum(r[1] for r in rows), sum(r[2] for r in rows)] == [per_split['test'], per_split['train']]
  with pytest.raises(KeyError, match="no axis 'colour'"):
    nu.balance_rows(summary, 'colour')


def test_rollout_rows_hand_computed():
  """Four completions of one question (ground truth B), rule judge, lambda = 1/3 each:
  a: well formed, answers B, thought concludes B      -> R = 1
  b: well formed, answers B, thought concludes C      -> R = 2/3 (inconsistent)
  c: untagged "B"                                     -> R = 0, not judged
  d: well formed, answers A, thought names no option  -> R = 1/3 (verdict None)
  Advantages are R - mean(R) = R - 1/2."""
  from medad_jax.judge import JudgeConfig, make_judge
  from medad_jax.rewards import RewardWeights
  question = 'Which organ is shown?\nA. Lung\nB. Liver\nC. Brain\nD. Skin'
  texts = ['<think>The wedge shape with vessels is the liver. So the answer is B.</think><answer>B</answer>',
           '<think>It looks like the Brain, option C.</think><answer>B</answer>',
           'B',
           '<think>hmm</think><answer>A</answer>']
  rows, rb = nu.rollout_rows(texts, question=question, options=('Lung', 'Liver', 'Brain', 'Skin'), answer='B',
                             judge=make_judge(JudgeConfig(backend='rule')), weights=RewardWeights())
  np.testing.assert_array_equal([r['R_fmt'] for r in rows], [1, 1, 0, 1])
  np.testing.assert_array_equal([r['R_acc'] for r in rows], [1, 1, 0, 0])
  np.testing.assert_array_equal([r['R_con'] for r in rows], [1, 0, 0, 0])
  assert [r['verdict'] for r in rows] == ['B', 'C', '(not judged)', None]
  np.testing.assert_allclose([r['R'] for r in rows], [1, 2 / 3, 0, 1 / 3], atol=1e-6)
  np.testing.assert_allclose([r['advantage'] for r in rows], [0.5, 1 / 6, -0.5, -1 / 6], atol=1e-6)
  assert rows[2]['problem'] == 'missing <think>' and rows[0]['problem'] == 'ok'
  assert rows[1]['think'] == 'It looks like the Brain, option C.' and rows[1]['letter'] == 'B'
  std_rows, _ = nu.rollout_rows(texts, question=question, options=('Lung', 'Liver', 'Brain', 'Skin'), answer='B',
                                judge=make_judge(JudgeConfig(backend='rule')), weights=RewardWeights(),
                                std_norm=True)
  std = np.std([1, 2 / 3, 0, 1 / 3])
  np.testing.assert_allclose([r['advantage'] for r in std_rows], np.array([0.5, 1 / 6, -0.5, -1 / 6]) / std,
                             rtol=1e-5)


def _fake_run(root, name, *, seed, sft, rl, weights, policies, stage='congrpo'):
  """A run directory in the launcher's layout with hand-written evaluation results: ``policies`` maps a policy name
  to its per-evaluation-seed overall accuracies."""
  d = root / name
  (d / 'eval').mkdir(parents=True)
  cfg = {'name': name, 'stage': stage, 'seed': seed, 'sft': {'enabled': sft}, 'rl': {'enabled': rl},
         'reward': dict(zip(('fmt', 'acc', 'con'), weights))}
  (d / 'config.json').write_text(json.dumps(cfg))
  (d / 'metrics.jsonl').write_text(
      json.dumps({'stage': 'congrpo', 'step': 1, 'kl': 0.0, 'reward_mean': 0.1}) + '\n'
      + json.dumps({'stage': 'congrpo', 'step': 2, 'kl': 0.02, 'reward_mean': 0.3}) + '\n'
      + json.dumps({'stage': 'sft', 'step': 1, 'loss': 5.0}) + '\n')
  from medad_jax.train.evaluate import COLUMNS
  pols = [{'name': n, 'num_questions': 10,
           'per_seed': [{**{c: 0.0 for c in COLUMNS}, 'overall': v, 'seed': s} for s, v in enumerate(vals)]}
          for n, vals in policies.items()]
  (d / 'eval' / 'results.json').write_text(json.dumps({'columns': list(COLUMNS), 'policies': pols}))
  return str(d)


def test_tables_2_and_3_place_runs_by_their_config(tmp_path):
  third = (1 / 3, 1 / 3, 1 / 3)
  dirs = [
      _fake_run(tmp_path, 'full', seed=0, sft=True, rl=True, weights=third,
                policies={'SFT': [0.5], 'SFT + Con-GRPO': [0.6]}),
      # same training seed: its SFT policy is the full run's, counted once
      _fake_run(tmp_path, 'acc', seed=0, sft=True, rl=True, weights=(0.0, 1.0, 0.0),
                policies={'SFT': [0.5], 'SFT + Con-GRPO': [0.4]}),
      _fake_run(tmp_path, 'rlonly', seed=1, sft=False, rl=True, weights=third,
                policies={'Con-GRPO (RL-only)': [0.3, 0.5]}),
      _fake_run(tmp_path, 'confoc', seed=2, sft=True, rl=True, weights=(0.1, 0.1, 0.8),
                policies={'SFT': [0.45], 'SFT + Con-GRPO': [0.7]}),
  ]
  runs = [nu.load_run(d) for d in dirs]
  assert nu.ablation_variants(runs[0]) == {'sft_only': 'SFT', 'balanced': 'SFT + Con-GRPO'}
  assert nu.ablation_variants(runs[2]) == {'rl_only': 'Con-GRPO (RL-only)'}
  headers, rows = nu.table2_rows(runs)
  t2 = {r[0]: r[1:] for r in rows}
  assert t2['RL-only (Con-GRPO)'][:2] == ['73.22 ± 2.58', '40.00 ± 10.00 (n=2)']
  assert t2['SFT-only'][:2] == ['75.41 ± 1.19', '47.50 ± 2.50 (n=2)']  # 0.5 (seed 0, once) and 0.45 (seed 2)
  assert t2['SFT + GRPO (Acc-only)'][:2] == ['78.85 ± 1.08', '40.00 ± 0.00 (n=1)']
  assert t2['SFT + GRPO (Con-only)'][:3] == ['81.73 ± 1.12', '-', '--config=congrpo:con_only']
  assert t2['MedAD-R1 (Full Model)'][:2] == ['85.15 ± 0.95', '60.00 ± 0.00 (n=1)']
  headers, rows = nu.table3_rows(runs)
  t3 = {r[0]: r[1:] for r in rows}
  assert t3['Consistency-focused'] == ['0.10', '0.10', '0.80', '84.21 ± 0.98', '70.00 ± 0.00 (n=1)',
                                       '--config=congrpo:con_focused']
  assert t3['Format-focused'][4] == '-' and t3['Accuracy-focused'][3] == '82.54 ± 1.02'
  assert t3['Balanced (Ours)'][3:5] == ['85.15 ± 0.95', '60.00 ± 0.00 (n=1)']
  _, acc = nu.accuracy_rows(runs)
  assert [r[:2] for r in acc][:2] == [['full', 'SFT'], ['full', 'SFT + Con-GRPO']]
  steps, kl = nu.curve(runs[0].metrics, 'congrpo', 'kl')
  np.testing.assert_array_equal(steps, [1, 2])
  np.testing.assert_allclose(kl, [0.0, 0.02])
  assert nu.curve(runs[0].metrics, 'sft', 'kl')[0].size == 0


def test_image_control_rows_compare_the_shuffled_row_with_the_prior(tmp_path):
  from medad_jax.train.evaluate import PRIOR_NAME, control_name
  d = _fake_run(tmp_path, 'ctl', seed=0, sft=True, rl=True, weights=(1 / 3, 1 / 3, 1 / 3),
                policies={PRIOR_NAME: [0.62], 'SFT': [0.7], 'SFT + Con-GRPO': [0.8],
                          control_name('SFT + Con-GRPO'): [0.64]})
  headers, rows = nu.image_control_rows([nu.load_run(d)])
  assert headers[-1] == 'shuffled <= prior + 3'
  overall = [r for r in rows if r[2] == 'Overall']
  assert overall == [['ctl', 'SFT + Con-GRPO', 'Overall', '62.00', '80.00', '64.00', 'yes']]  # 64 <= 62 + 3
  headers, rows = nu.image_control_rows([nu.load_run(d)], margin=0.01)
  assert [r for r in rows if r[2] == 'Overall'][0][-1] == 'no'
  assert len(rows) == 6  # five tasks and overall, for the one policy with a control row
  assert nu.image_control_rows([nu.load_run(_fake_run(tmp_path, 'none', seed=0, sft=True, rl=False,
                                                      weights=(1, 1, 1), policies={'SFT': [0.5]}))])[1] == []


def test_answer_confusion_by_hand():
  """Rows: the right answer's text, columns: what was said (by option text, whatever its letter in each question);
  other tasks' rows are ignored, an unparsed answer is '(none)', a completion of an unknown record is refused."""
  from medad_jax.data.schema import MedADRecord

  def rec(i, options, answer):
    return MedADRecord(id=i, image_id=i, image=b'', modality='CT', anatomy='Chest', task='lesion_localization',
                       question='q?', options=tuple(options), answer=answer, source='test', split='test')
  records = [rec('a', ('Left Upper', 'No lesion'), 'A'), rec('b', ('No lesion', 'Left Upper'), 'B'),
             rec('c', ('Center Region', 'Left Upper'), 'A')]
  rows = [{'id': 'a', 'task': 'lesion_localization', 'answer': 'A', 'predicted': 'A'},     # right
          {'id': 'b', 'task': 'lesion_localization', 'answer': 'B', 'predicted': 'A'},     # said No lesion
          {'id': 'c', 'task': 'lesion_localization', 'answer': 'A', 'predicted': 'B'},     # centre said Left Upper
          {'id': 'c', 'task': 'lesion_localization', 'answer': 'A', 'predicted': None},    # no answer
          {'id': 'x', 'task': 'anomaly_detection', 'answer': 'A', 'predicted': 'A'}]       # another task
  labels, counts = nu.answer_confusion(records, rows, 'lesion_localization')
  assert labels == ['(none)', 'Center Region', 'Left Upper', 'No lesion']
  np.testing.assert_array_equal(counts, [[0, 0, 0, 0],
                                         [1, 0, 1, 0],
                                         [0, 0, 1, 1],
                                         [0, 0, 0, 0]])
  with pytest.raises(KeyError, match="'z' is not among the 3 records"):
    nu.answer_confusion(records, [{'id': 'z', 'task': 'lesion_localization', 'answer': 'A'}], 'lesion_localization')


def test_load_run_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'nothing: no config.json'):
    nu.load_run(str(tmp_path / 'nothing'))
  d = tmp_path / 'bad'
  d.mkdir()
  (d / 'config.json').write_text(json.dumps({'stage': 'congrpo', 'seed': 0, 'sft': {}, 'rl': {}}))
  (d / 'metrics.jsonl').write_text('')
  with pytest.raises(KeyError, match=r"bad/config.json: missing key 'reward'"):
    nu.load_run(str(d))


# ------------------------------------------------------------------------------------------- execution


def _execute(name: str, tmp_path: pathlib.Path, monkeypatch, **env) -> nbformat.NotebookNode:
  """Runs a temp copy of ``notebooks/<name>`` on the CI budget; the committed file stays untouched."""
  src = NOTEBOOKS / name
  before = src.read_bytes()
  work = tmp_path / 'nb'
  work.mkdir(exist_ok=True)
  copy = work / name
  shutil.copyfile(src, copy)
  monkeypatch.setenv(nu.BUDGET_ENV, 'ci')
  monkeypatch.setenv('PYTHONPATH', str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  nb = nbformat.read(copy, as_version=4)
  NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                 resources={'metadata': {'path': str(work)}}).execute()
  assert src.read_bytes() == before
  return nb


def _text(nb) -> str:
  """Every text output of the executed notebook (streams, markdown, else plain), blank-line separated."""
  parts = []
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      if out.output_type == 'stream':
        parts.append(out.text)
      data = out.get('data', {})
      for mime in ('text/markdown', 'text/plain'):  # the richer one only (plain is a repr next to markdown)
        if mime in data:
          parts.append(data[mime])
          break
  return '\n\n'.join(parts)


def _pngs(nb) -> int:
  return sum('image/png' in out.get('data', {}) for c in nb.cells for out in c.get('outputs', []))


def test_data_explorer_notebook(tmp_path, monkeypatch):
  nb = _execute('01_data_explorer.ipynb', tmp_path, monkeypatch, MEDAD_NB_WORKDIR=str(tmp_path / 'work'))
  text = _text(nb)
  assert 'budget: ci' in text and '100 records of 20 images' in text
  assert '| answer | test | train |' in text and '| region | test | train |' in text
  assert _pngs(nb) == 2  # contact sheet, class balance
  assert (tmp_path / 'work' / 'contact_sheet.png').stat().st_size > 10_000


@pytest.fixture(scope='module')
def results_run(tmp_path_factory):
  """03_results executed with no run directory: it makes the smoke run itself; returns (notebook, run dir)."""
  tmp = tmp_path_factory.mktemp('results')
  with pytest.MonkeyPatch.context() as mp:
    mp.delenv('MEDAD_NB_RUN_DIRS', raising=False)
    nb = _execute('03_results.ipynb', tmp, mp, MEDAD_NB_WORKDIR=str(tmp / 'work'))
  return nb, tmp / 'work' / 'congrpo-ci'


@pytest.mark.heavy  # notebook 03 makes its own smoke run (~2 min); the launcher smoke run is in CI
def test_results_notebook_makes_a_run_and_tabulates_it(results_run):
  nb, run_dir = results_run
  assert (run_dir / 'eval' / 'results.json').is_file()
  text = _text(nb)
  assert '--config=congrpo' in text and 'run finished in' in text
  assert _pngs(nb) == 2  # Con-GRPO curves, SFT curves
  # The smoke run evaluates SFT and SFT + Con-GRPO with balanced weights: those rows are ours, the rest '-'.
  res = json.loads((run_dir / 'eval' / 'results.json').read_text())
  full = next(p for p in res['policies'] if p['name'] == 'SFT + Con-GRPO')['mean']['overall']
  assert f'| MedAD-R1 (Full Model) | 85.15 ± 0.95 | {100 * full:.2f} ± 0.00 (n=1) |' in text
  assert '| RL-only (Con-GRPO) | 73.22 ± 2.58 | - |' in text
  assert '| Format-focused | 0.80 | 0.10 | 0.10 | 77.13 ± 1.35 | - |' in text
  assert '| congrpo-ci | SFT + Con-GRPO | 6 |' in text
  assert '| congrpo-ci | SFT + Con-GRPO | Anomaly Det. |' in text  # the image-shuffled control's comparison


def test_rollout_explorer_notebook_random_policy(tmp_path, monkeypatch):
  monkeypatch.delenv('MEDAD_NB_RUN_DIR', raising=False)
  nb = _execute('02_rollout_explorer.ipynb', tmp_path, monkeypatch)
  text = _text(nb)
  assert 'RANDOM tiny policy' in text and '4 samples in' in text
  table = next(t.strip() for t in text.split('\n\n') if t.strip().startswith('| sample | think |'))
  assert len(table.splitlines()) == 2 + 4
  # the dataset's own target is well formed, correct and (rule judge) consistent: R = 1
  assert '| 1.000 | 1.000 | 1.000 |' in text


@pytest.mark.heavy  # notebook 03 makes its own smoke run (~2 min); the launcher smoke run is in CI
def test_rollout_explorer_notebook_from_a_run_dir(results_run, tmp_path, monkeypatch):
  _, run_dir = results_run
  nb = _execute('02_rollout_explorer.ipynb', tmp_path, monkeypatch, MEDAD_NB_RUN_DIR=str(run_dir))
  text = _text(nb)
  assert f'policy restored from {run_dir}' in text and "judge backend 'local'" in text
  assert '4 samples in' in text


def test_smooth_is_a_trailing_mean():
  np.testing.assert_allclose(nu.smooth([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])
  np.testing.assert_allclose(nu.smooth([1.0, 3.0, 5.0], 5), [1.0, 2.0, 3.0])
  np.testing.assert_array_equal(nu.smooth([2.0, 9.0], 1), [2.0, 9.0])
  assert nu.smooth([], 3).size == 0


@pytest.mark.heavy  # notebook 03 makes its own smoke run (~2 min); the launcher smoke run is in CI
def test_results_notebook_on_given_runs_new_workdir_and_a_sweep(results_run, tmp_path, monkeypatch):
  """MEDAD_NB_RUN_DIRS set and a MEDAD_NB_WORKDIR that does not exist yet (it used to fail at the first figure),
  plus a sweep directory whose tables and plot the last section shows."""
  from medad_jax import sweep
  _, run_dir = results_run
  sw = tmp_path / 'sweep'
  for v in ('sft_only', 'balanced'):  # the smoke run has both policies: it stands in for a seed's two runs
    shutil.copytree(run_dir, sw / 'seed0' / v)
  sweep.write_outputs(str(sw), ['sft_only', 'balanced'], [0])
  work = tmp_path / 'not' / 'yet'
  nb = _execute('03_results.ipynb', tmp_path, monkeypatch, MEDAD_NB_RUN_DIRS=str(run_dir),
                MEDAD_NB_WORKDIR=str(work), MEDAD_NB_SWEEP_DIR=str(sw))
  text = _text(nb)
  assert (work / 'congrpo_curves.png').is_file() and 'run finished in' not in text
  assert '**Table 2 (components)**' in text and '**Table 3 (reward weights)**' in text
  assert '| MedAD-R1 (Full Model) | 85.15 ± 0.95 |' in text
  assert _pngs(nb) == 3  # Con-GRPO curves, SFT curves, the sweep plot
