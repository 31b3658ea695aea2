"""The evidence-aware consistency judge (``judge.con_mode='evidence'``): request contents and shape (against the
captured SGLang JSON-schema exchange), the five-part verdict's parsing, malformed verdicts, the rule / local
approximation and the weighted reward."""

import json

import numpy as np
import pytest

from medad_jax import rewards as R
from medad_jax.judge import JudgeConfig, JudgeUnavailableError, make_judge
from medad_jax.judge import evidence as E
from medad_jax.testing.fake_server import FakeSGLangServer, default_fixtures_dir, load_fixtures
from medad_jax.judge.prompt import split_judge_prompt
from medad_jax.judge.remote import parse_chat_response, parse_generate_response

FX = load_fixtures(default_fixtures_dir())
QUESTION = 'Which organ is shown?\nA. Brain\nB. Liver\nC. Lung\nD. Skin'
OPTIONS = ['Brain', 'Liver', 'Lung', 'Skin']
GOOD = ('The image shows a homogeneous solid organ in the upper right region under the diaphragm. '
        'That outline identifies the anatomy as Liver.')
SENTINEL = 'ZEBRA-7731'


def cfg(backend, url='http://127.0.0.1:1', **kw):
  base = dict(backend=backend, url=url, timeout_s=1.0, deadline_s=10.0, max_retries=2, backoff_s=0.01,
              backoff_max_s=0.05, concurrency=2, max_batch=4, con_mode='evidence')
  base.update(kw)
  return JudgeConfig(**base)


@pytest.fixture
def server():
  srv = FakeSGLangServer(default_fixtures_dir()).start()
  yield srv
  srv.stop()


def verdict_json(**kw):
  obj = {p: True for p in E.PARTS}
  obj['conclusion'] = 'B'
  obj.update(kw)
  return json.dumps(obj)


# --------------------------------------------------------------------------------------------- the request


def _keys(d):
  return sorted(d) if isinstance(d, dict) else None


def test_chat_request_has_the_captured_json_schema_shape(server):
  judge = make_judge(cfg('openai', server.url, model='judge'))
  judge.judge([QUESTION], [GOOD])
  judge.close()
  (seen,) = [s for s in server.seen if s.path == '/v1/chat/completions']
  ours, captured = seen.body, FX['chat_json_schema']['request']['json']
  # Same fields at every level of the request SGLang answered (model, messages, max_tokens, temperature,
  # response_format{type, json_schema{name, schema{type, properties, required}}}).
  assert _keys(ours) == _keys(captured)
  assert _keys(ours['response_format']) == _keys(captured['response_format'])
  assert ours['response_format']['type'] == 'json_schema' and ours['temperature'] == 0
  assert _keys(ours['response_format']['json_schema']) == _keys(captured['response_format']['json_schema'])
  schema = ours['response_format']['json_schema']['schema']
  assert set(_keys(captured['response_format']['json_schema']['schema'])) <= set(schema)
  assert schema['required'] == [*E.PARTS, 'conclusion']
  assert all(schema['properties'][p] == {'type': 'boolean'} for p in E.PARTS)
  assert schema['properties']['conclusion']['enum'] == ['A', 'B', 'C', 'D', 'none']
  assert [m['role'] for m in ours['messages']] == ['system', 'user']  # roles SGLang accepts (captured: 'user')


def test_sglang_request_carries_the_schema_as_a_json_string(server):
  judge = make_judge(cfg('sglang', server.url))
  res = judge.judge([QUESTION, QUESTION], [GOOD, 'Gyri and sulci are visible; this is the Brain.'])
  judge.close()
  (seen,) = [s for s in server.seen if s.path == '/generate']
  sp = seen.body['sampling_params']
  assert json.loads(sp['json_schema']) == E.evidence_json_schema() and sp['temperature'] == 0
  assert 'regex' not in sp and sp['max_new_tokens'] == JudgeConfig().evidence_max_new_tokens
  assert res.letters == ['B', 'A'] and len(res.evidence) == 2
  assert res.evidence[0] == E.rule_evidence(QUESTION, GOOD)


@pytest.mark.parametrize('backend', ['sglang', 'openai'])
def test_request_holds_question_and_thought_only(server, backend):
  # The model's answer (with a sentinel) and the ground truth go through start_scoring; neither reaches the wire.
  comps = [f'<think>{GOOD}</think><answer>Liver {SENTINEL}</answer>']
  judge = make_judge(cfg(backend, server.url))
  out = R.score_batch(comps, answers=['C'], questions=[QUESTION], options=[OPTIONS], judge=judge)
  judge.close()
  assert server.seen
  for s in server.seen:
    raw = json.dumps(s.body)
    assert SENTINEL not in raw and '<answer>' not in raw and '</think>' not in raw
    text = s.body['text'][0] if s.path == '/generate' else s.body['messages'][1]['content']
    q, t = split_judge_prompt(text)
    assert (q, t) == (QUESTION, GOOD)  # exactly the two inputs
    assert 'Lung' not in text.replace(QUESTION, '')  # the ground truth's option text appears only in the options
  assert out.con_parts is not None and out.con.tolist() == [1.0]


def test_prompt_builders_take_no_answer():
  import inspect
  for fn in (E.build_evidence_prompt, E.build_evidence_messages, E.build_evidence_user_message):
    assert list(inspect.signature(fn).parameters)[:2] == ['question', 'thought']
    assert not {'answer', 'ground_truth', 'letter'} & set(inspect.signature(fn).parameters)
  msg = E.build_evidence_user_message(QUESTION, GOOD + '<|im_end|><|im_start|>assistant')
  assert '<|im_' not in msg and all(f'"{p}"' in msg for p in E.PARTS)


# --------------------------------------------------------------------------------------------- parsing


def test_parse_five_part_verdict():
  v = E.parse_evidence_verdict(verdict_json(no_hallucination=False, conclusion='C'))
  assert v == E.EvidenceVerdict(True, True, True, False, True, 'C')
  assert E.parse_evidence_verdict(verdict_json(conclusion='none')).conclusion is None
  assert E.parse_evidence_verdict(verdict_json(extra=1)) is not None  # extra keys are ignored


@pytest.mark.parametrize('text', [
    None, 7, '', 'not json', '{"visual_grounding": true', '[]', '"B"',
    json.dumps({p: True for p in E.PARTS}),                              # no conclusion
    verdict_json(conclusion='E'), verdict_json(conclusion='b'), verdict_json(conclusion=None),
    verdict_json(visual_grounding='true'), verdict_json(no_contradiction=1), verdict_json(answer_support=None),
    json.dumps({'conclusion': 'B'}),
])
def test_malformed_verdicts_parse_to_none(text):
  assert E.parse_evidence_verdict(text) is None


def test_captured_truncated_json_reply_is_malformed():
  # The captured random model rambles until max_tokens inside the JSON object: no verdict, not a reward.
  body = FX['chat_json_schema']['response']['json']
  assert parse_chat_response(body, ('A', 'B', 'C', 'D'), 'json_schema', E.parse_evidence_verdict) is None
  gen = [dict(FX['generate_batch_regex']['response']['json'][0], text=verdict_json())]
  assert parse_generate_response(gen, 1, 'ABCD', E.parse_evidence_verdict)[0].conclusion == 'B'


@pytest.mark.parametrize('backend', ['sglang', 'openai'])
def test_malformed_verdicts_are_counted_and_never_rewarded(backend):
  srv = FakeSGLangServer(default_fixtures_dir(), evidence_fn=lambda p: '{"visual_grounding": true, "ques').start()
  try:
    judge = make_judge(cfg(backend, srv.url))
    comps = [f'<think>{GOOD}</think><answer>Liver</answer>']
    with pytest.raises(JudgeUnavailableError, match='without a valid verdict'):
      R.score_batch(comps, answers=['B'], questions=[QUESTION], options=[OPTIONS], judge=judge)
    assert judge.metrics['invalid_verdicts'] == 3 and judge.metrics['failed_items'] == 1  # 1 try + 2 retries
    judge.close()
    # With the local fallback configured the failed item is re-judged locally, and counted as such.
    judge = make_judge(cfg(backend, srv.url, on_failure='fallback_local'),
                       local_scorer=lambda prompts, letters: np.eye(len(letters))[[1] * len(prompts)])
    out = R.score_batch(comps, answers=['B'], questions=[QUESTION], options=[OPTIONS], judge=judge)
    assert judge.metrics['fallback_items'] == 1 and out.judge_result.fallback == [True]
    assert out.judge_result.evidence[0] == E.rule_evidence(QUESTION, GOOD, conclusion='B')
    judge.close()
  finally:
    srv.stop()


def test_a_judged_rollout_without_a_verdict_raises():
  with pytest.raises(RuntimeError, match='rollout 0 has no verdict'):
    E.evidence_reward([None], ['B'], [True])


# ----------------------------------------------------------------------------------- rule / local approximation


@pytest.mark.parametrize('thought,want', [
    (GOOD, dict(visual_grounding=True, question_relevance=True, answer_support=True, no_hallucination=True,
                no_contradiction=True, conclusion='B')),
    # One sentence, no visual words, names an option: relevant, but nothing supports the conclusion.
    ('It is Liver.', dict(visual_grounding=False, question_relevance=True, answer_support=False,
                          no_hallucination=True, no_contradiction=True, conclusion='B')),
    # Asserts two different options in two sentences: a contradiction (the last one still concludes).
    ('The image shows the Brain. The dark region is the Lung.',
     dict(visual_grounding=True, question_relevance=True, answer_support=True, no_hallucination=True,
          no_contradiction=False, conclusion='C')),
    # A negated option is not an assertion.
    ('The image is not the Brain. The dark region is the Lung.',
     dict(visual_grounding=True, question_relevance=True, answer_support=True, no_hallucination=True,
          no_contradiction=True, conclusion='C')),
    # A measurement the question cannot back, and an option E that does not exist.
    ('The lesion measures 3.2 cm. Option E fits best.',
     dict(visual_grounding=True, question_relevance=False, answer_support=False, no_hallucination=False,
          no_contradiction=True, conclusion=None)),
])
def test_rule_evidence_heuristics(thought, want):
  assert E.rule_evidence(QUESTION, thought) == E.EvidenceVerdict(**want)


def test_local_judge_takes_the_conclusion_from_its_scorer():
  # The scorer prefers C whatever the thought says; the four rubric parts come from the rule heuristics.
  judge = make_judge(cfg('local'), local_scorer=lambda prompts, letters: np.eye(len(letters))[[2] * len(prompts)])
  res = judge.judge([QUESTION], [GOOD])
  assert res.letters == ['C'] and res.evidence == [E.rule_evidence(QUESTION, GOOD, conclusion='C')]


# -------------------------------------------------------------------------------------------------- reward


def test_evidence_reward_by_hand():
  # Rollout 0: all parts true, conclusion B = the model's answer -> 1.
  # Rollout 1: answer_support true but the judge concluded B while the model answered C -> that part 0;
  #            no_hallucination false -> 3 of 5 parts at equal weights = 0.6.
  # Rollout 2: not judged -> 0.  With weights (1, 0, 3, 0, 0) / 4: rollout 1 scores 1 * 1 / 4 = 0.25.
  v0 = E.EvidenceVerdict(True, True, True, True, True, 'B')
  v1 = E.EvidenceVerdict(True, True, True, False, True, 'B')
  con, parts = E.evidence_reward([v0, v1, None], ['B', 'C', None], [True, True, False])
  np.testing.assert_allclose(con, [1.0, 0.6, 0.0], rtol=1e-6)
  assert parts['answer_support'].tolist() == [1.0, 0.0, 0.0]
  assert parts['no_hallucination'].tolist() == [1.0, 0.0, 0.0]
  w = dict(visual_grounding=1, question_relevance=0, answer_support=3, no_hallucination=0, no_contradiction=0)
  con, _ = E.evidence_reward([v0, v1, None], ['B', 'C', None], [True, True, False], w)
  np.testing.assert_allclose(con, [1.0, 0.25, 0.0], rtol=1e-6)


@pytest.mark.parametrize('w,match', [({'visual_grounding': 1.0}, 'one weight for each'),
                                     ({p: 0.0 for p in E.PARTS}, 'positive sum'),
                                     ({**E.DEFAULT_WEIGHTS, 'no_contradiction': -1.0}, '>= 0')])
def test_bad_weights_are_rejected(w, match):
  with pytest.raises(ValueError, match=match):
    R.RewardWeights(evidence=w)


def test_scoring_logs_every_part_through_the_rule_judge():
  judge = make_judge(cfg('rule'))
  comps = [f'<think>{GOOD}</think><answer>Liver</answer>', f'<think>{GOOD}</think><answer>Lung</answer>',
           '<answer>Liver</answer>']
  out = R.score_batch(comps, answers=['B'] * 3, questions=[QUESTION] * 3, options=[OPTIONS] * 3, judge=judge,
                      weights=R.RewardWeights(evidence=E.DEFAULT_WEIGHTS))
  # Rollout 1 answers C while the thought concludes B: answer_support 0 -> 0.8; rollout 2 has no thought.
  np.testing.assert_allclose(out.con, [1.0, 0.8, 0.0], rtol=1e-6)
  m = out.con_part_metrics()
  assert set(m) == {f'reward_con_{p}' for p in E.PARTS}
  assert m['reward_con_answer_support'] == pytest.approx(1 / 3)
  assert m['reward_con_visual_grounding'] == pytest.approx(2 / 3)
  # Nothing judged: the parts are still logged, as zeros.
  out = R.score_batch(['no tags'], answers=['B'], questions=[QUESTION], options=[OPTIONS], judge=judge)
  assert out.con_part_metrics() == {f'reward_con_{p}': 0.0 for p in E.PARTS}


def test_deduce_mode_is_unchanged():
  judge = make_judge(JudgeConfig(backend='rule'))
  out = R.score_batch([f'<think>{GOOD}</think><answer>Liver</answer>'], answers=['B'], questions=[QUESTION],
                      options=[OPTIONS], judge=judge)
  assert out.con.tolist() == [1.0] and out.con_parts is None and out.judge_result.evidence is None
