"""Contract and fault-injection tests of the `sglang` and `openai` judges against a local server that replays
SGLang's captured protocol (medad_jax/testing/fixtures/sglang, from SGLang 0.5.23)."""

import copy
import json
import logging
import pathlib
import threading
import time

import httpx
import numpy as np
import pytest

from medad_jax import rewards as R
from medad_jax.judge import (JudgeConfig, JudgeRequestError, JudgeUnavailableError, OpenAIJudge, RuleJudge,
                             SGLangJudge, build_judge_messages, build_judge_prompt, make_judge)
from medad_jax.testing.fake_server import FakeSGLangServer, default_fixtures_dir, load_fixtures
from medad_jax.judge.remote import error_message, parse_chat_response, parse_generate_response

FIXTURES = default_fixtures_dir()
FX = load_fixtures(FIXTURES)
QUESTION = 'Which organ is shown?\nA. Brain\nB. Liver\nC. Lung\nD. Skin'
THOUGHTS = [
    'Homogeneous solid organ under the right hemidiaphragm: the liver. The answer is B.',
    'Air-filled parenchyma with bronchovascular markings. So the answer is C.',
    'Gyri and sulci are visible; this is the brain.',
    'Epidermis and dermis layers; option D.',
    'Hepatic veins converge on the IVC. B.',
    'Alveolar spaces throughout. Final answer: C',
    'Cortex and white matter. Answer: A',
    'Keratinised surface. (D)',
    'Portal triads visible, so liver.',
    'Pleura and lobar fissures: lung.',
]
EXPECTED = ['B', 'C', 'A', 'D', 'B', 'C', 'A', 'D', 'B', 'C']
QS = [QUESTION] * len(THOUGHTS)


def fast_cfg(backend, url, **kw):
  base = dict(backend=backend, url=url, timeout_s=1.0, deadline_s=10.0, max_retries=3, backoff_s=0.02,
              backoff_max_s=0.1, concurrency=4, max_batch=4)
  base.update(kw)
  return JudgeConfig(**base)


def rule_scorer(prompts, letters=('A', 'B', 'C', 'D')):
  from medad_jax.judge import extract_conclusion, parse_options, split_judge_prompt
  out = np.full((len(prompts), len(letters)), -10.0)
  for n, p in enumerate(prompts):
    q, t = split_judge_prompt(p)
    out[n, letters.index(extract_conclusion(t, parse_options(q), letters) or letters[-1])] = 0.0
  return out


@pytest.fixture
def server():
  srv = FakeSGLangServer(FIXTURES).start()
  yield srv
  srv.stop()


@pytest.fixture(params=['sglang', 'openai'])
def backend(request):
  return request.param


def posts(srv, path):
  return [s for s in srv.seen if s.path == path]


# ------------------------------------------------------------------------------------------- the replay server


def test_fake_server_replays_the_captures(server):
  with httpx.Client(base_url=server.url, timeout=5) as c:
    for name, rec in FX.items():
      req, resp = rec['request'], rec['response']
      if req['method'] == 'GET':
        r = c.get(req['path'])
      elif 'raw_body' in req:
        r = c.post(req['path'], content=req['raw_body'], headers={'Content-Type': 'application/json'})
      else:
        r = c.post(req['path'], json=req['json'])
      assert r.status_code == resp['status'], name
      if 'json' in resp and 'raw_body' not in req:
        assert r.json() == resp['json'], name
      elif 'raw_body' in req:  # SGLang's malformed-JSON 400 shape, with our decoder's position
        body = r.json()
        assert {k: body[k] for k in ('object', 'type', 'code')} == {'object': 'error', 'type': 'Bad Request',
                                                                    'code': 400}
        assert 'JSON decode error' in body['message']
      else:
        assert r.text == resp['text'], name


# ------------------------------------------------------------------------------------------- parsers on real bodies


def test_parsers_on_captured_bodies():
  letters = ('A', 'B', 'C', 'D')
  assert parse_generate_response(FX['generate_batch_regex']['response']['json'], 3, letters) == ['B', 'B', 'B']
  assert parse_generate_response(FX['generate_batch_regex_logprob']['response']['json'], 2, letters) == ['B', 'B']
  with pytest.raises(ValueError, match='expected a list of 3 results, got a list of 2'):
    parse_generate_response(FX['generate_batch_regex_logprob']['response']['json'], 3, letters)
  with pytest.raises(ValueError, match='expected a list of 1 results, got dict'):  # a single-prompt reply
    parse_generate_response(FX['generate_regex_letter']['response']['json'], 1, letters)
  free = [FX['generate_free']['response']['json']]  # unconstrained text, finish_reason length: not a verdict
  assert parse_generate_response(free, 1, letters) == [None]
  aborted = copy.deepcopy(FX['generate_batch_regex']['response']['json'])
  aborted[1]['meta_info']['finish_reason'] = {'type': 'abort', 'message': 'x'}
  assert parse_generate_response(aborted, 3, letters) == ['B', None, 'B']
  assert parse_chat_response(FX['chat_regex']['response']['json'], letters) == 'A'
  # The random model rambles until max_tokens: truncated JSON is no verdict.
  assert parse_chat_response(FX['chat_json_schema']['response']['json'], letters, 'json_schema') is None
  with pytest.raises(ValueError, match=r'no choices\[0\]\.message\.content'):
    parse_chat_response({'object': 'error'}, letters)
  assert error_message(FX['error_bad_regex']['response']['json']).startswith('Failed to compile regex grammar')
  assert error_message(FX['error_missing_text']['response']['json']).startswith('Either text, input_ids')
  assert error_message(FX['error_chat_bad_role']['response']['json']).startswith('2 validation errors')
  assert error_message(FX['error_bad_json_body']['response']['json']).startswith('1 validation error')


# ------------------------------------------------------------------------------------------- contract


def test_sglang_request_is_the_captured_protocol(server):
  # Our /generate request for the captured prompts is byte-for-byte (as JSON) the request SGLang answered.
  rec = FX['generate_batch_regex']
  judge = SGLangJudge(fast_cfg('sglang', server.url))
  letters, err = judge.generate_letters(rec['request']['json']['text'])
  judge.close()
  assert (letters, err) == (['B', 'B', 'B'], '')
  (seen,) = posts(server, '/generate')
  assert seen.body == rec['request']['json']


def test_openai_request_is_the_captured_protocol(server):
  rec = FX['chat_regex']
  judge = OpenAIJudge(fast_cfg('openai', server.url, model='judge'))
  letters, err = judge.chat_letters([rec['request']['json']['messages']])
  judge.close()
  assert (letters, err) == (['A'], '')
  (seen,) = posts(server, '/v1/chat/completions')
  assert seen.body == rec['request']['json']


def test_openai_json_schema_truncated_reply_fails_explicitly(server):
  rec = FX['chat_json_schema']
  cfg = fast_cfg('openai', server.url, model='judge', openai_constraint='json_schema', max_new_tokens=24,
                 max_retries=1)
  judge = OpenAIJudge(cfg)
  letters, err = judge.chat_letters([rec['request']['json']['messages']])
  assert posts(server, '/v1/chat/completions')[0].body == rec['request']['json']
  assert letters == [None] and 'without a valid verdict letter' in err
  assert judge.metrics['invalid_verdicts'] == 2 and judge.metrics['retries'] == 1
  # Through judge(): every request replays the truncated capture, so the call fails loudly.
  judge.payload = lambda messages: rec['request']['json']
  with pytest.raises(JudgeUnavailableError, match=r'gave up on 2 of 2 items \(1 retries exhausted; last error: '
                                                  r'1 item\(s\) without a valid verdict letter'):
    judge.judge(QS[:2], THOUGHTS[:2])
  judge.close()


def test_openai_json_schema_parses_complete_json(server):
  judge = make_judge(fast_cfg('openai', server.url, openai_constraint='json_schema'))
  assert judge.judge(QS[:4], THOUGHTS[:4]).letters == EXPECTED[:4]
  body = posts(server, '/v1/chat/completions')[0].body
  assert body['response_format']['json_schema']['schema']['properties']['answer']['enum'] == ['A', 'B', 'C', 'D']
  judge.close()


@pytest.mark.parametrize('constraint, key', [('regex', 'regex'), ('structured_outputs', 'structured_outputs'),
                                             ('guided_regex', 'guided_regex')])
def test_openai_constraint_variants(server, constraint, key):
  judge = make_judge(fast_cfg('openai', server.url, openai_constraint=constraint))
  judge.judge(QS[:1], THOUGHTS[:1])
  body = posts(server, '/v1/chat/completions')[0].body
  assert body[key] in ('[A-D]', {'regex': '[A-D]'}) and body['temperature'] == 0
  judge.close()


def test_batches_are_chunked_and_ordered(server, backend):
  judge = make_judge(fast_cfg(backend, server.url))
  res = judge.judge(QS, THOUGHTS)
  judge.close()
  assert res.letters == EXPECTED == RuleJudge().judge(QS, THOUGHTS).letters
  if backend == 'sglang':
    sizes = sorted(len(s.body['text']) for s in posts(server, '/generate'))
    assert sizes == [2, 4, 4]  # max_batch=4, one list-valued /generate per chunk
    assert {s.body['text'][0] for s in posts(server, '/generate')} <= {build_judge_prompt(QUESTION, t)
                                                                        for t in THOUGHTS}
  else:
    assert len(posts(server, '/v1/chat/completions')) == len(THOUGHTS)  # one chat request per rollout
    assert posts(server, '/v1/chat/completions')[0].body['messages'] in [
        build_judge_messages(QUESTION, t) for t in THOUGHTS]
  assert judge.metrics['retries'] == 0 and judge.metrics['items'] == len(THOUGHTS)


def test_judge_requests_never_carry_the_answer(server, backend):
  sentinel = 'ZEBRA-7731'
  comps = [f'<think>{t}</think><answer>{v} {sentinel}</answer>' for t, v in zip(THOUGHTS, EXPECTED)]
  judge = make_judge(fast_cfg(backend, server.url))
  out = R.score_batch(comps, answers=['A'] * len(comps), questions=QS, options=[['Brain', 'Liver', 'Lung',
                                                                                  'Skin']] * len(comps),
                      judge=judge)
  judge.close()
  assert out.con.tolist() == [1.0] * len(comps)
  for s in server.seen:
    raw = json.dumps(s.body)
    assert sentinel not in raw and '<answer>' not in raw and '</think>' not in raw


def test_http_400_is_raised_at_once_with_the_server_message(server):
  judge = make_judge(fast_cfg('sglang', server.url, on_failure='fallback_local'), local_scorer=rule_scorer)
  judge.sampling_params = lambda: {'regex': '([A-D', 'max_new_tokens': 4}  # the captured bad regex
  with pytest.raises(JudgeRequestError, match=r'HTTP 400: Failed to compile regex grammar'):
    judge.generate_letters(['x'])
  with pytest.raises(JudgeRequestError, match=r'HTTP 400: Failed to compile regex grammar'):
    judge.judge(['x'], ['y'])  # no retry and no fallback: the request itself is wrong
  assert judge.metrics['http_400'] == 2 and judge.metrics['retries'] == 0 and judge.metrics['fallback_items'] == 0
  judge.close()
  judge = OpenAIJudge(fast_cfg('openai', server.url))
  with pytest.raises(JudgeRequestError, match="'role' must be one of"):
    judge.chat_letters([[{'role': 'wizard', 'content': 'x'}]])
  judge.close()


# ------------------------------------------------------------------------------------------- faults


@pytest.mark.parametrize('fault, counter', [
    ('500', 'http_500'), ('503', 'http_503'), ('drop', 'disconnects'), ('garbage', 'malformed_bodies'),
    ('truncate', 'malformed_bodies'), ('abort_item', 'invalid_verdicts'), ('slow', 'timeouts'),
])
def test_transient_faults_are_retried_and_counted(server, fault, counter):
  server.slow_s = 3.0  # past the 1s request timeout
  judge = make_judge(fast_cfg('sglang', server.url, concurrency=1))
  server.inject(fault)
  res = judge.judge(QS, THOUGHTS)
  judge.close()
  assert res.letters == EXPECTED and not any(res.fallback)
  assert judge.metrics[counter] == 1 and judge.metrics['retries'] == 1
  if fault == 'abort_item':  # only the aborted item is sent again
    assert [len(s.body['text']) for s in posts(server, '/generate')] == [4, 1, 4, 2]


@pytest.mark.parametrize('fault', ['500', 'drop', 'garbage', 'slow'])
def test_openai_faults_are_retried(server, fault):
  server.slow_s = 3.0
  judge = make_judge(fast_cfg('openai', server.url, concurrency=1))
  server.inject(fault, fault)
  assert judge.judge(QS[:3], THOUGHTS[:3]).letters == EXPECTED[:3]
  assert judge.metrics['retries'] == 2
  judge.close()


def test_slow_server_hits_the_deadline(server, backend):
  server.delay_s = 3.0
  judge = make_judge(fast_cfg(backend, server.url, timeout_s=0.3, deadline_s=1.0, max_retries=10))
  t0 = time.monotonic()
  with pytest.raises(JudgeUnavailableError, match=r'deadline of 1s exceeded; last error: timeout'):
    judge.judge(QS[:2], THOUGHTS[:2])
  assert time.monotonic() - t0 < 2.5  # deadline + one request timeout + slack, far below the 3s of one reply
  assert judge.metrics['timeouts'] >= 2 and judge.metrics['deadline_exceeded'] >= 1
  assert judge.metrics['failed_calls'] == 1
  server.delay_s = 0.0
  judge.close()


def test_judge_down_raises_by_default(backend):
  srv = FakeSGLangServer(FIXTURES).start()
  url = srv.url
  srv.stop()  # nothing listens on the port any more: connection refused
  judge = make_judge(fast_cfg(backend, url, max_retries=2))
  with pytest.raises(JudgeUnavailableError, match=rf'{backend} judge at {url} gave up on 3 of 3 items '
                                                  r'\(2 retries exhausted; last error: cannot connect'):
    judge.judge(QS[:3], THOUGHTS[:3])
  expected_attempts = 3 if backend == 'sglang' else 9  # one request per chunk vs per item
  assert judge.metrics['connect_errors'] == expected_attempts and judge.metrics['failed_items'] == 3
  judge.close()


def test_judge_down_falls_back_to_local_when_configured(backend, caplog):
  srv = FakeSGLangServer(FIXTURES).start()
  url = srv.url
  srv.stop()
  calls = []
  def scorer(prompts, letters):
    calls.append(len(prompts))
    return rule_scorer(prompts, letters)
  judge = make_judge(fast_cfg(backend, url, max_retries=1, on_failure='fallback_local'), local_scorer=scorer)
  with caplog.at_level(logging.WARNING):
    res = judge.judge(QS, THOUGHTS)
  assert res.letters == EXPECTED and res.fallback == [True] * len(THOUGHTS) and res.num_fallback == 10
  assert judge.metrics['fallback_items'] == 10 and judge.metrics['fallback_calls'] == 1
  assert calls == [4, 4, 2]  # the failed items, batched by max_batch
  assert any('judging them with the local fallback' in r.message for r in caplog.records)
  judge.close()


def test_partial_failure_falls_back_only_for_failed_items(server):
  # concurrency=1: the first chunk (items 0-3) exhausts its retries on 500s, the others succeed.
  cfg = fast_cfg('sglang', server.url, concurrency=1, max_retries=2, on_failure='fallback_local')
  judge = make_judge(cfg, local_scorer=lambda p, letters: np.tile([0.0, -1, -1, -1], (len(p), 1)))  # always A
  server.inject('500', '500', '500')
  res = judge.judge(QS, THOUGHTS)
  assert res.fallback == [True] * 4 + [False] * 6
  assert res.letters == ['A'] * 4 + EXPECTED[4:]
  assert judge.metrics['http_500'] == 3 and judge.metrics['fallback_items'] == 4
  judge.close()


def test_server_restart_mid_run(server, backend):
  judge = make_judge(fast_cfg(backend, server.url, backoff_s=0.1, backoff_max_s=0.2, max_retries=20))
  assert judge.judge(QS[:4], THOUGHTS[:4]).letters == EXPECTED[:4]  # warm pooled connections
  server.stop()
  restart = threading.Timer(0.6, server.start)
  restart.start()
  t0 = time.monotonic()
  res = judge.judge(QS, THOUGHTS)
  restart.join()
  assert res.letters == EXPECTED and not any(res.fallback)
  assert time.monotonic() - t0 >= 0.5  # it really waited for the outage to end
  down = judge.metrics['connect_errors'] + judge.metrics['disconnects']
  assert down >= 1 and judge.metrics['retries'] >= 1
  judge.close()


def test_concurrency_is_bounded(server, backend):
  server.hold()
  judge = make_judge(fast_cfg(backend, server.url, concurrency=3, max_batch=1, timeout_s=30.0, deadline_s=60.0))
  fut = judge.submit(QS[:9], THOUGHTS[:9])
  deadline = time.monotonic() + 10
  while len(server.seen) < 3 and time.monotonic() < deadline:
    time.sleep(0.01)
  time.sleep(0.3)  # room for a 4th request, were the limit not enforced
  assert len(server.seen) == 3  # three requests in parallel, and no more while they are unanswered
  server.release()
  assert fut.result(timeout=30).letters == EXPECTED[:9]
  assert server.max_in_flight == 3 and len(server.seen) == 9
  judge.close()


def test_judge_call_overlaps_device_work(server):
  import jax
  import jax.numpy as jnp

  server.hold()  # the judge answers only when the test says so
  judge = make_judge(fast_cfg('sglang', server.url, timeout_s=30.0, deadline_s=60.0))
  comps = [f'<think>{t}</think><answer>{v}</answer>' for t, v in zip(THOUGHTS, EXPECTED)]
  t0 = time.monotonic()
  pending = R.start_scoring(comps, answers=EXPECTED, questions=QS, options=None, judge=judge)
  assert time.monotonic() - t0 < 0.5  # submitting does not wait for the network
  deadline = time.monotonic() + 10
  while len(server.seen) < 3 and time.monotonic() < deadline:  # 3 chunks of max_batch=4
    time.sleep(0.01)
  assert len(server.seen) == 3  # all judge requests are in flight ...

  @jax.jit
  def device_work(x_NN):
    for _ in range(4):
      x_NN = jnp.tanh(x_NN @ x_NN)
    return x_NN.sum()

  value = float(device_work(jnp.ones((256, 256)) / 256))  # ... while the "reference log-probs" step runs
  assert np.isfinite(value) and not pending.done()  # the device finished first; the judge is still out
  server.release()
  out = pending.result(timeout=30)
  assert out.con.tolist() == [1.0] * len(comps) and out.judge_result.letters == EXPECTED
  assert judge.metrics['retries'] == 0
  judge.close()


def test_api_key_is_sent_but_never_logged(server, monkeypatch, caplog):
  secret = 'sk-test-5f0c2e9a'
  monkeypatch.setenv('MEDAD_TEST_JUDGE_KEY', secret)
  cfg = fast_cfg('openai', server.url, api_key_env='MEDAD_TEST_JUDGE_KEY')
  with caplog.at_level(logging.DEBUG):
    judge = make_judge(cfg)
    server.inject('500')
    assert judge.judge(QS[:2], THOUGHTS[:2]).letters == EXPECTED[:2]
    judge.close()
  auth = {k.lower(): v for k, v in server.seen[0].headers.items()}['authorization']
  assert auth == f'Bearer {secret}'
  assert secret not in caplog.text and secret not in repr(judge) and secret not in repr(cfg)
  monkeypatch.delenv('MEDAD_TEST_JUDGE_KEY')
  with pytest.raises(ValueError, match="'MEDAD_TEST_JUDGE_KEY' is not set"):
    make_judge(cfg)


def test_scoring_surfaces_a_down_judge():
  srv = FakeSGLangServer(FIXTURES).start()
  url = srv.url
  srv.stop()
  judge = make_judge(fast_cfg('sglang', url, max_retries=1))
  comps = [f'<think>{t}</think><answer>{v}</answer>' for t, v in zip(THOUGHTS, EXPECTED)]
  pending = R.start_scoring(comps, answers=EXPECTED, questions=QS, options=None, judge=judge)
  assert pending.fmt.tolist() == [1.0] * 10 and pending.acc.tolist() == [1.0] * 10  # ready without the judge
  with pytest.raises(JudgeUnavailableError, match="on_failure='raise'"):
    pending.result(timeout=30)  # never a silent R_con of 0
  judge.close()
