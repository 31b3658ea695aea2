"""Con-GRPO rewards (Eq. 3-6) on hand-written rollouts, and the answer parser on messy outputs."""

import inspect

import numpy as np
import pytest

from medad_jax import rewards as R
from medad_jax.judge import Judge, RuleJudge, build_judge_prompt, split_judge_prompt

OPTS = ['Brain', 'Liver', 'Lung', 'Skin']
QUESTION = 'Which organ is shown in this CT slice?\nA. Brain\nB. Liver\nC. Lung\nD. Skin'
THINK = 'The slice shows a large homogeneous solid organ under the right hemidiaphragm. This is the liver.'


# --------------------------------------------------------------------------------------------- R_fmt


@pytest.mark.parametrize('text, well_formed, problem', [
    (f'<think>{THINK}</think><answer>B</answer>', True, ''),
    (f'  \n<think>\n{THINK}\n</think>\n\n<answer> B </answer>\n', True, ''),  # whitespace around is fine
    (f'{THINK}<answer>B</answer>', False, 'missing <think>'),
    (f'<think>{THINK}<answer>B</answer>', False, 'missing </think>'),  # unclosed think
    (f'<think>{THINK}</think>B', False, 'missing <answer>'),
    (f'<think>{THINK}</think><answer>B', False, 'missing </answer>'),  # unclosed answer
    (f'<think>{THINK} <answer>B</answer></think>', False, 'tags nested or out of order'),
    (f'<think>{THINK} <think>again</think></think><answer>B</answer>', False, '<think> occurs 2 times'),
    (f'<think>{THINK}</think><answer>B</answer><answer>C</answer>', False, '<answer> occurs 2 times'),
    (f'<answer>B</answer><think>{THINK}</think>', False, 'tags nested or out of order'),
    (f'Sure! <think>{THINK}</think><answer>B</answer>', False, 'text outside the tags'),
    (f'<think>{THINK}</think> so: <answer>B</answer>', False, 'text outside the tags'),
    (f'<think>{THINK}</think><answer>B</answer> Hope this helps.', False, 'text outside the tags'),
    ('<think>  \n </think><answer>B</answer>', False, 'empty think'),
    (f'<think>{THINK}</think><answer> </answer>', False, 'empty answer'),
    (f'<THINK>{THINK}</THINK><ANSWER>B</ANSWER>', False, 'missing <think>'),  # tags are case-sensitive
    ('', False, 'missing <think>'),
])
def test_format(text, well_formed, problem):
  p = R.parse_completion(text, OPTS)
  assert (p.well_formed, p.problem) == (well_formed, problem)
  assert R.format_reward([text]).tolist() == [float(well_formed)]


def test_thought_and_answer_extraction():
  p = R.parse_completion(f'<think>\n {THINK} \n</think><answer>\n(b)\n</answer>', OPTS)
  assert (p.thought, p.answer_text, p.letter) == (THINK, '(b)', 'B')
  # Nested: the answer block is unique so it is read, but there is no thought (it would contain the answer).
  p = R.parse_completion(f'<think>{THINK} <answer>B</answer></think>', OPTS)
  assert (p.thought, p.letter) == (None, 'B')
  # Duplicated answer blocks: no answer at all.
  p = R.parse_completion(f'<think>{THINK}</think><answer>B</answer><answer>B</answer>', OPTS)
  assert (p.answer_text, p.letter) == (None, None)
  # Text outside the tags breaks the format, not the thought or the answer.
  p = R.parse_completion(f'Sure! <think>{THINK}</think><answer>B</answer>', OPTS)
  assert (p.well_formed, p.thought, p.letter) == (False, THINK, 'B')
  # Untagged answer: nothing to reward.
  p = R.parse_completion('The answer is B.', OPTS)
  assert (p.answer_text, p.letter, p.thought) == (None, None, None)


# --------------------------------------------------------------------------------------------- answer parser


@pytest.mark.parametrize('answer, expected', [
    ('B', 'B'), ('b', 'B'), (' b \n', 'B'), ('(B)', 'B'), ('[c]', 'C'), ('B.', 'B'), ('d)', 'D'), ('B:', 'B'),
    ('**B**', 'B'), ('`C`', 'C'), ('"A"', 'A'),
    ('Liver', 'B'), ('liver.', 'B'), ('  LUNG ', 'C'), ('The lesion is in the liver.', 'B'),
    ('B. Liver', 'B'), ('(B) Liver', 'B'), ('B) liver', 'B'), ('Option B: Liver', 'B'),
    ('The answer is b', 'B'), ('Answer: (C)', 'C'), ('option D', 'D'), ('answer is option C', 'C'),
    ('answer choice: d', 'D'), ('The answer is clearly B', 'B'), ('I think it is B', 'B'),
    ('A', 'A'), ('option A is correct', 'A'), ('A is correct', 'A'),
    ('A lesion in the liver', 'B'),        # the article "A" is not option A
    ('lesion(s) in the liver', 'B'),       # "(s)" is not a letter
    # invalid: two different answers, or a letter contradicting the option text, or nothing
    ('B or C', None), ('A and C', None), ('B, C', None), ('B. Brain', None), ('Not A, it is B', None),
    ('the lung and the liver', None), ('The answer is a tumor', None), ('', None), ('none of these', None),
    ('E', None), ('option E', None), ('(e)', None),
])
def test_parse_answer_messy(answer, expected):
  assert R.parse_answer(answer, OPTS) == expected


def test_parse_answer_option_subtleties():
  # Overlapping option texts: the longest match wins, so "Lung nodule" does not also name "Lung".
  opts = ['Lung', 'Lung nodule', 'Liver cyst', 'Normal']
  assert R.parse_answer('A lung nodule is present', opts) == 'B'
  assert R.parse_answer('lung', opts) == 'A'
  # An option text containing a capital letter is blanked before letters are read.
  opts = ['Hepatitis B', 'Cirrhosis', 'Steatosis', 'Normal liver']
  assert R.parse_answer('Hepatitis B', opts) == 'A'
  # Three options: D is not a valid letter.
  assert R.parse_answer('D', ['Yes', 'No', 'Unclear']) is None
  assert R.parse_answer('b', ['Yes', 'No', 'Unclear']) == 'B'
  # Without options only letters count.
  assert R.parse_answer('Liver') is None and R.parse_answer('(c)') == 'C'
  with pytest.raises(ValueError, match='at most 4'):
    R.parse_answer('A', ['a', 'b', 'c', 'd', 'e'])


# --------------------------------------------------------------------------------------------- R_acc, R_con, R


def test_accuracy_reward():
  comps = [
      f'<think>{THINK}</think><answer>B</answer>',         # right
      f'<think>{THINK}</think><answer>b</answer>',         # lowercase letter, right
      f'<think>{THINK}</think><answer>Liver</answer>',     # option text instead of the letter, right
      f'<think>{THINK}</think><answer>C</answer>',         # wrong
      f'<think>{THINK}</think><answer>B or C</answer>',    # two answers
      f'<think>{THINK}</think>The answer is B.',           # untagged
      f'Sure. <think>{THINK}</think><answer>B</answer>',   # bad format, right answer: R_acc is independent
  ]
  got = R.accuracy_reward(comps, answers=['B'] * 6 + ['b'], options=[OPTS] * 7)
  assert got.dtype == np.float32 and got.shape == (7,)
  assert got.tolist() == [1, 1, 1, 0, 0, 0, 1]


def test_bad_metadata_is_named():
  comps = [f'<think>{THINK}</think><answer>B</answer>'] * 2
  with pytest.raises(ValueError, match=r"answers\[1\].*got 'E'"):
    R.accuracy_reward(comps, answers=['B', 'E'])
  with pytest.raises(ValueError, match='answers: expected 2 entries'):
    R.accuracy_reward(comps, answers=['B'])
  with pytest.raises(ValueError, match=r'options\[0\]: expected 1-4 option texts, got 5'):
    R.parse_completions(comps, [OPTS + ['Bone'], OPTS])
  with pytest.raises(ValueError, match='verdicts: expected 2 entries'):
    R.consistency_reward(comps, verdicts=['B'])
  with pytest.raises(TypeError, match='completion: expected str'):
    R.parse_completion(None)


def test_consistency_reward():
  comps = [f'<think>{THINK}</think><answer>B</answer>'] * 3 + ['<think>x</think><answer>B or C</answer>']
  got = R.consistency_reward(comps, verdicts=['B', 'C', None, 'B'], options=[OPTS] * 4)
  # equal / differs / judge named nothing / model named nothing
  assert got.tolist() == [1, 0, 0, 0]


def test_total_reward_hand_computed():
  f, a, c = (np.array(x, np.float32) for x in ([1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 0, 0]))
  np.testing.assert_allclose(R.total_reward(f, a, c), [1.0, 2 / 3, 0.0, 2 / 3], rtol=1e-6)
  w = R.RewardWeights(fmt=0.1, acc=0.1, con=0.8)
  np.testing.assert_allclose(R.total_reward(f, a, c, w), [1.0, 0.9, 0.0, 0.2], rtol=1e-6)
  with pytest.raises(ValueError, match='RewardWeights.con'):
    R.RewardWeights(con=-1.0)
  with pytest.raises(ValueError, match='reward shapes differ'):
    R.total_reward(f, a, c[:2])


class RecordingJudge(Judge):
  """Rule verdicts, remembering every input it was given."""
  backend = 'recording'

  def __init__(self):
    super().__init__(RuleJudge().cfg)
    self.inputs = []

  def _judge_items(self, questions, thoughts):
    self.inputs.append((list(questions), list(thoughts)))
    return RuleJudge()._judge_items(questions, thoughts)


def test_start_scoring_end_to_end_with_rule_judge():
  comps = [
      f'<think>{THINK} The answer is B.</think><answer>B</answer>',   # consistent, correct
      f'<think>{THINK} The answer is B.</think><answer>C</answer>',   # inconsistent, wrong
      '<think>It is air-filled; the lung.</think><answer>C</answer>',  # consistent, wrong
      '<think> </think><answer>B</answer>',                            # empty think: not judged
      'Sure. <think>Brain tissue. So A.</think><answer>A</answer>',    # bad format, still judged
      f'<think>{THINK}</think><answer>B or C</answer>',                # no parsed answer: not judged
  ]
  judge = RecordingJudge()
  pending = R.start_scoring(comps, answers=['B'] * 6, questions=[QUESTION] * 6, options=[OPTS] * 6, judge=judge)
  out = pending.result(timeout=30)
  judge.close()
  assert out.fmt.tolist() == [1, 1, 1, 0, 0, 1]
  assert out.acc.tolist() == [1, 0, 0, 1, 0, 0]
  assert out.con.tolist() == [1, 0, 1, 0, 1, 0]
  assert out.judged.tolist() == [True, True, True, False, True, False]
  np.testing.assert_allclose(out.total, (out.fmt + out.acc + out.con) / 3, rtol=1e-6)
  assert out.verdicts == ['B', 'B', 'C', None, 'A', None]
  assert len(judge.inputs) == 1 and len(judge.inputs[0][1]) == 4  # one batched call, judged rollouts only
  m = out.metrics()
  assert m['reward/con'] == pytest.approx(0.5) and m['reward/judged'] == pytest.approx(4 / 6)


def test_judge_never_sees_answer_or_ground_truth():
  # The judge API takes only questions and thoughts.
  assert list(inspect.signature(Judge.judge).parameters) == ['self', 'questions', 'thoughts']
  sentinel = 'ZEBRA-7731'
  comps = [f'<think>{THINK}</think><answer>B, final pick {sentinel}</answer>',
           f'<think>Air-filled lobes. The lung.</think><answer>C {sentinel}</answer>']
  judge = RecordingJudge()
  out = R.score_batch(comps, answers=['D', 'A'], questions=[QUESTION] * 2, options=[OPTS] * 2, judge=judge)
  assert out.judged.all()
  (qs, ts), = judge.inputs
  assert qs == [QUESTION] * 2 and ts == [THINK, 'Air-filled lobes. The lung.']
  for q, t in zip(qs, ts):
    prompt = build_judge_prompt(q, t)
    assert sentinel not in prompt and '<answer>' not in prompt and '</think>' not in prompt
    assert split_judge_prompt(prompt) == (q, t)
  # Per-sample content is exactly (question, thought): with both removed, every prompt is the same template,
  # so nothing else about the rollout (its answer, the ground truth) can be in it.
  templates = {build_judge_prompt(q, t).replace(q, '').replace(t, '') for q, t in zip(qs, ts)}
  templates.add(build_judge_prompt('Q?', 'T.').replace('Q?', '').replace('T.', ''))
  assert len(templates) == 1
