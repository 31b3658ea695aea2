"""Evaluation arithmetic on hand-made answers: per-task and overall accuracy, format and consistency rates, the
Table 1 markdown with mean ± std over seeds, and the sweep aggregation across run directories."""

import json
import math
import os

import numpy as np
import pytest

from medad_jax.judge import RuleJudge
from medad_jax.train import evaluate

OPTS = ['Left Upper', 'Right Upper', 'Left Lower', 'Center Region']
Q = 'Where is the lesion?\nA. Left Upper\nB. Right Upper\nC. Left Lower\nD. Center Region'


def meta(task, answer):
  return {'id': f'{task}-{answer}', 'question': Q, 'options': OPTS, 'answer': answer, 'task': task}


def test_score_and_summarize_by_hand():
  texts = ['<think>It sits in the left upper part, option A.</think><answer>A</answer>',   # right, consistent
           '<think>Lower left, so option C.</think><answer>B</answer>',                   # wrong, inconsistent
           'The answer is B',                                                              # no format, no answer
           '<think>Center Region (D).</think><answer>D</answer>']                        # right, consistent
  metas = [meta('lesion_localization', 'A'), meta('lesion_localization', 'C'), meta('anomaly_detection', 'B'),
           meta('anomaly_detection', 'D')]
  s = evaluate.score(texts, metas, RuleJudge())
  np.testing.assert_array_equal(s['acc'], [1, 0, 0, 1])
  np.testing.assert_array_equal(s['fmt'], [1, 1, 0, 1])
  np.testing.assert_array_equal(s['con'], [1, 0, 0, 1])
  np.testing.assert_array_equal(s['rule_agree'][[0, 1, 3]], [1, 1, 1])  # the rule judge agrees with itself
  assert math.isnan(s['rule_agree'][2])                                 # not judged: no thought
  r = evaluate.summarize([m['task'] for m in metas], s['acc'], s['fmt'], s['con'])
  assert r['lesion_localization'] == 0.5 and r['anomaly_detection'] == 0.5 and r['overall'] == 0.5
  assert r['format_rate'] == 0.75 and r['consistency_rate'] == 0.5
  assert math.isnan(r['modality_classification'])  # no question of that task: no number invented


def _result(name, overall_by_seed):
  per_seed = [{**{k: v for k in evaluate.COLUMNS}, 'seed': i} for i, v in enumerate(overall_by_seed)]
  return evaluate.Result(name, per_seed, 10, 1.0)


def test_table_mean_std_and_aggregate(tmp_path):
  r = _result('ours', [0.5, 0.7])
  table = evaluate.markdown_table([r], {'ours': '4.7M'})
  assert table.splitlines()[0].startswith('| Model | Params | Anatomy ID. | Anomaly Det. | Lesion Loc.')
  assert '| ours | 4.7M | 60.00 ± 10.00 |' in table
  for i, vals in enumerate(([0.2], [0.4])):
    d = tmp_path / f'run{i}'
    evaluate.write_report(str(d), [_result('ours', vals)])
    assert os.path.exists(d / 'eval' / 'table.md')
  agg = evaluate.aggregate([str(tmp_path / 'run0'), str(tmp_path / 'run1')])
  assert '| ours | - | 30.00 ± 10.00 |' in agg
  payload = json.load(open(tmp_path / 'run0' / 'eval' / 'results.json'))
  assert payload['policies'][0]['mean']['overall'] == pytest.approx(0.2)
  with pytest.raises(FileNotFoundError, match='no eval/results.json'):
    evaluate.aggregate([str(tmp_path / 'missing')])


def _rec(task, options, answer):
  from medad_jax.data.schema import MedADRecord
  return MedADRecord(id=f'{task}-{answer}-{options[0]}', image_id='i', image=b'', modality='CT', anatomy='Chest',
                     task=task, question='q?', options=tuple(options), answer=answer, source='test',
                     split='train')


def test_prior_baseline_by_hand():
  """Train: 'Yes' is correct 2 of 3 anomaly questions; 'Lung' once, 'Brain' twice for anatomy."""
  yn = ('Yes', 'No', 'Artifact', 'Unknown')
  train = [_rec('anomaly_detection', yn, 'A'), _rec('anomaly_detection', ('No', 'Yes', 'Artifact', 'Unknown'), 'B'),
           _rec('anomaly_detection', yn, 'B'),
           _rec('anatomy_identification', ('Lung', 'Brain', 'Liver', 'Eye'), 'A'),
           _rec('anatomy_identification', ('Brain', 'Lung', 'Liver', 'Eye'), 'A'),
           _rec('anatomy_identification', ('Eye', 'Liver', 'Brain', 'Lung'), 'C')]
  test = [_rec('anomaly_detection', ('No', 'Unknown', 'Yes', 'Artifact'), 'C'),   # prior says Yes = C: right
          _rec('anomaly_detection', yn, 'B'),                                     # prior says Yes = A: wrong
          _rec('anatomy_identification', ('Liver', 'Eye', 'Lung', 'Brain'), 'D'),  # Brain = D: right
          _rec('anatomy_identification', ('Liver', 'Eye', 'Lung', 'Kidney'), 'C'),  # Lung (1) beats unseen: right
          _rec('anatomy_identification', ('Liver', 'Eye', 'Spleen', 'Kidney'), 'B')]  # all unseen -> A: wrong
  res = evaluate.prior_baseline(train, test)
  s = res.per_seed[0]
  assert res.name == evaluate.PRIOR_NAME and res.num_questions == 5
  assert s['anomaly_detection'] == 0.5 and s['anatomy_identification'] == pytest.approx(2 / 3)
  assert s['overall'] == pytest.approx(3 / 5)
  assert math.isnan(s['lesion_localization']) and math.isnan(s['format_rate'])
  row = evaluate.markdown_table([res]).splitlines()[-1]
  assert '| 60.00 | - | - |' in row  # overall, then format and consistency do not apply


def test_eval_batch_is_cut_to_the_questions_rounded_to_the_row_blocks():
  assert evaluate.batch_size_for(32, 4, 1) == 4          # 4 questions: 4 rows, not 28 padding copies
  assert evaluate.batch_size_for(32, 5, 4) == 8          # rounded up to the mesh's batch blocks
  assert evaluate.batch_size_for(32, 150, 4) == 32       # more questions than a batch: the configured size
  assert evaluate.batch_size_for(8, 0, 2) == 2
  with pytest.raises(ValueError, match='expected both >= 1'):
    evaluate.batch_size_for(0, 4, 1)


def test_image_shuffled_control_moves_every_question_to_another_image():
  """Five images of two or three questions each: every question keeps its text and answer but shows the image of
  another image id; the questions of one image move together; every image is shown as often as before."""
  from medad_jax.data.schema import MedADRecord
  recs = [MedADRecord(id=f'q{i}', image_id=f'img{i // 2 if i < 8 else 4}', image=f'/px/{i // 2 if i < 8 else 4}.png',
                      modality='X-ray', anatomy='Chest', task='anomaly_detection', question=f'question {i}?',
                      options=('Yes', 'No', 'Artifact', 'Unknown'), answer='AB'[i % 2], source='t', split='test')
          for i in range(11)]
  shuffled = evaluate.ImageShuffled(recs, seed=3)
  assert len(shuffled) == len(recs)
  moved = {}
  for r, s in zip(recs, shuffled):
    assert (s.id, s.question, s.options, s.answer, s.task) == (r.id, r.question, r.options, r.answer, r.task)
    assert s.image_id != r.image_id and s.image == f'/px/{s.image_id[3:]}.png'   # another image, its own pixels
    assert moved.setdefault(r.image_id, s.image_id) == s.image_id                # one image's questions move together
  assert sorted(moved.values()) == sorted(moved)                                  # a permutation of the images
  assert [s.image_id for s in evaluate.ImageShuffled(recs, seed=3)] == [s.image_id for s in shuffled]  # seeded
  assert [s.image_id for s in evaluate.ImageShuffled(recs, seed=4)] != [s.image_id for s in shuffled]
  with pytest.raises(ValueError, match='at least 2 distinct images'):
    evaluate.ImageShuffled(recs[:2])
  assert evaluate.control_name('SFT') == 'SFT · images shuffled (control)'
