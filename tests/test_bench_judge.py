"""The judge benchmark: transformers on the N x K full rows and our shared-context scorer give the same option
scores (otherwise the benchmark refuses to report), and ours computes fewer token-forwards."""

import json

import numpy as np

from medad_jax.bench import judge


def test_judge_benchmark_scores_the_same_rows(tmp_path, capsys):
  out = tmp_path / 'judge.json'
  assert judge.main(['--prompts', '8', '--repeats', '1', '--peak-size', '256', '--json', str(out)]) == 0
  text = capsys.readouterr().out
  assert 'judge call (N prompts x K options)' in text and 'transformers' in text
  r = json.loads(out.read_text())['result']
  assert r['max_rel_diff'] <= judge.RTOL and np.isfinite(r['max_abs_diff'])
  assert r['ours_token_forwards'] < r['transformers_token_forwards']  # each context runs once, not K times
  assert r['ours_s'] > 0 and r['transformers_s'] > 0 and r['prompts'] == 8 and r['options'] == 4
