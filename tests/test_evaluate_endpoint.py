"""The evaluation's ``endpoint`` policy (``evaluate.endpoint_generator`` / ``endpoint_preprocess``) against a real
localhost HTTP server: the fake SGLang server (``medad_jax.testing.fake_server``) speaking ``/v1/chat/completions``.

What goes over the wire (one multimodal user message: the record's image as a PNG data URL, then the formatted
question; greedy = temperature 0, ``max_tokens``, ``seed``), what comes back (``message.content`` in input order
under concurrency), retries (5xx / 429 / dropped connection / garbage body retried with backoff, other 4xx fail
at once, exhaustion names the question and the last failure), and the whole ``--config=eval:endpoint`` launcher
stage scoring a server that always answers right (accuracy 1) and one that always answers ``A``.
"""

import base64
import io
import json
import os
import threading
import time
import types

import numpy as np
import pytest
from PIL import Image

from medad_jax import launch
from medad_jax.testing.fake_server import FakeSGLangServer
from medad_jax.rewards import LETTERS
from medad_jax.train import evaluate
from medad_jax.train import pipeline as pl

N = 6  # questions: eval.max_examples below
MAX_NEW_TOKENS = 37  # not a default anywhere, so the request's max_tokens must come from the config
DATA_ARGS = ['--config.data.synth_images=20', '--config.data.image_size=56', f'--config.eval.max_examples={N}',
             '--config.eval.batch_size=4', '--config.mesh.devices=1', '--config.judge.backend=rule']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """The launcher's own config and the first ``N`` questions of its test split (built once in a shared cache)."""
  cache = str(tmp_path_factory.mktemp('endpoint_cache'))
  config, _ = launch.parse(['launch', '--config=eval:endpoint', f'--config.data.cache_dir={cache}', *DATA_ARGS,
                            f'--config.eval.max_new_tokens={MAX_NEW_TOKENS}'])
  test = pl.build_data(config).test
  records = [test[i] for i in range(N)]
  return types.SimpleNamespace(config=config, cache=cache, records=records,
                               examples=[evaluate.endpoint_preprocess(r) for r in records])


def generator(data, url, *, greedy=True, **kwargs):
  # endpoint_generator reads only run.config (sampling.temperature, eval.max_new_tokens)
  return evaluate.endpoint_generator(types.SimpleNamespace(config=data.config), url=url, model='test-vlm',
                                     greedy=greedy, timeout_s=10.0, **kwargs)


@pytest.fixture
def sleeps(monkeypatch):
  """The generator's backoff sleeps, recorded instead of slept (only ``evaluate``'s view of ``time`` changes)."""
  record = []

  class _Time:
    def __getattr__(self, name):
      return getattr(time, name)

    def sleep(self, s):
      record.append(s)

  monkeypatch.setattr(evaluate, 'time', _Time())
  return record


def reply_for(question: str) -> str:
  return f'<think>Reply to {question.splitlines()[0]!r}.</think><answer>{len(question) % 4}</answer>'


def chat_posts(server):
  return [s for s in server.seen if s.path == '/v1/chat/completions']


def decode_data_url(url: str) -> Image.Image:
  prefix = 'data:image/png;base64,'
  assert url.startswith(prefix), url[:40]
  im = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):], validate=True)))
  assert im.format == 'PNG'
  return im


# ------------------------------------------------------------------------------------------------ the request


def test_preprocess_gives_the_decoded_image_and_metadata(data):
  for r, ex in zip(data.records, data.examples):
    assert ex['meta'] == pl.record_meta(r)
    assert isinstance(ex['image'], Image.Image) and ex['image'].mode == 'RGB'


@pytest.mark.parametrize('greedy', [True, False])
def test_each_question_is_one_multimodal_chat_request(data, greedy):
  prompts = []

  def verdict(prompt):
    prompts.append(prompt)
    return reply_for(prompt)

  with FakeSGLangServer(verdict_fn=verdict) as server:
    out = generator(data, server.url, greedy=greedy)(data.examples, 7, 0)
  questions = [pl.record_meta(r)['question'] for r in data.records]
  assert len(set(questions)) == N  # so each request is matched to its record by its text
  posts = chat_posts(server)
  assert len(posts) == len(server.seen) == N
  by_question = {}
  for p in posts:
    body = p.body
    assert isinstance(body, dict), body
    assert body['model'] == 'test-vlm'
    assert body['temperature'] == (0.0 if greedy else data.config.sampling.temperature)
    assert body['max_tokens'] == MAX_NEW_TOKENS and body['seed'] == 7
    (msg,) = body['messages']
    assert msg['role'] == 'user'
    image_part, text_part = msg['content']
    assert image_part['type'] == 'image_url' and set(image_part) == {'type', 'image_url'}
    assert text_part == {'type': 'text', 'text': text_part['text']}
    by_question[text_part['text']] = decode_data_url(image_part['image_url']['url'])
  assert sorted(by_question) == sorted(questions)
  for r in data.records:  # the pixels the server got are the record's image, decoded independently here
    want = np.asarray(Image.open(io.BytesIO(r.image)).convert('RGB'))
    got = np.asarray(by_question[pl.record_meta(r)['question']].convert('RGB'))
    assert got.shape == want.shape and np.array_equal(got, want), r.id
  # the fake server read the question text out of the multimodal content (the text part, nothing else)
  assert sorted(prompts) == sorted(questions)
  assert out == [reply_for(q) for q in questions]


def test_replies_come_back_in_input_order_under_concurrency(data):
  """The first question is answered last (its reply waits until every other reply has been made), yet the
  generator returns the replies in input order; the server saw several requests at once."""
  first = pl.record_meta(data.records[0])['question']
  others_done, lock, answered = threading.Event(), threading.Lock(), []
  waited = []

  def verdict(prompt):
    if prompt == first:
      waited.append(others_done.wait(10))
    else:
      with lock:
        answered.append(prompt)
        if len(answered) == N - 1:
          others_done.set()
    return reply_for(prompt)

  with FakeSGLangServer(verdict_fn=verdict) as server:
    out = generator(data, server.url, concurrency=3)(data.examples, 0, 0)
  assert waited == [True]  # not a timeout: the other five were answered while the first was held
  assert out == [reply_for(pl.record_meta(r)['question']) for r in data.records]
  assert 1 < server.max_in_flight <= 3


def test_null_content_is_an_empty_completion(data, monkeypatch):
  with FakeSGLangServer() as server:
    real = server.respond

    def respond(path, raw):
      status, payload = real(path, raw)
      payload['choices'][0]['message']['content'] = None
      return status, payload

    monkeypatch.setattr(server, 'respond', respond)
    assert generator(data, server.url)(data.examples[:2], 0, 0) == ['', '']


# ---------------------------------------------------------------------------------------------------- retries


@pytest.mark.parametrize('faults', [('503',), ('drop',), ('garbage',), ('429',), ('503', 'drop', 'garbage', '429')])
def test_transient_failures_are_retried_then_succeed(data, sleeps, faults):
  ex = data.examples[1]
  with FakeSGLangServer(verdict_fn=reply_for) as server:
    server.inject(*faults)
    out = generator(data, server.url, max_retries=4, concurrency=1)([ex], 0, 0)
  assert out == [reply_for(ex['meta']['question'])]
  posts = chat_posts(server)
  assert len(posts) == len(faults) + 1
  assert all(p.body == posts[0].body for p in posts)  # the same request each time
  assert sleeps == [0.5 * 2 ** k for k in range(len(faults))]


def test_a_client_error_fails_at_once_naming_the_question_and_the_server_message(data, sleeps):
  ex = data.examples[2]
  with FakeSGLangServer(verdict_fn=reply_for) as server:
    server.inject('400')
    with pytest.raises(RuntimeError) as e:
      generator(data, server.url, max_retries=4, concurrency=1)([ex], 0, 0)
  msg = str(e.value)
  assert repr(ex['meta']['id']) in msg and 'HTTP 400' in msg and 'injected HTTP 400' in msg, msg
  assert len(chat_posts(server)) == 1 and sleeps == []


@pytest.mark.parametrize('faults, last', [(('503', '503', 'drop'), 'RemoteProtocolError'),
                                          (('drop', 'garbage', '503'), 'HTTP 503: injected HTTP 503'),
                                          (('503', 'drop', 'garbage'), 'malformed body')])
def test_exhausted_retries_name_the_question_and_the_last_failure(data, sleeps, faults, last):
  ex = data.examples[3]
  with FakeSGLangServer(verdict_fn=reply_for) as server:
    server.inject(*faults, '503')  # one fault more than the attempts: the server is not what ends the retries
    with pytest.raises(RuntimeError) as e:
      generator(data, server.url, max_retries=2, concurrency=1)([ex], 0, 0)
  msg = str(e.value)
  assert repr(ex['meta']['id']) in msg and 'failed after 2 retries' in msg, msg
  assert msg.split('retries: ', 1)[1].startswith(last), msg
  assert len(chat_posts(server)) == 3
  assert sleeps == [0.5, 1.0]  # a backoff between attempts, none after the last


def test_a_failing_question_fails_the_batch(data, sleeps):
  """One question rejected among several in flight: the generator raises for it, not a partial list."""
  bad = pl.record_meta(data.records[4])['question']

  with FakeSGLangServer(verdict_fn=reply_for) as server:
    real = server.respond

    def respond(path, raw):
      if json.loads(raw)['messages'][0]['content'][1]['text'] == bad:
        return 400, {'object': 'error', 'message': 'image too large', 'type': 'BadRequestError', 'code': 400}
      return real(path, raw)

    server.respond = respond
    with pytest.raises(RuntimeError, match=f"{data.records[4].id}.*HTTP 400 image too large"):
      generator(data, server.url, concurrency=3)(data.examples, 0, 0)


# ---------------------------------------------------------------------------------------- through the launcher


def launch_argv(data, workdir, url):
  return ['launch', '--config=eval:endpoint', f'--workdir={workdir}', f'--config.eval.endpoint_url={url}',
          '--config.eval.endpoint_model=served-vlm', f'--config.data.cache_dir={data.cache}', *DATA_ARGS]


def launch_eval(data, workdir, url):
  return launch.main(launch_argv(data, workdir, url))


def endpoint_row(workdir):
  with open(os.path.join(workdir, 'eval', 'results.json')) as f:
    policies = json.load(f)['policies']
  assert [p['name'] for p in policies] == [evaluate.PRIOR_NAME, 'served-vlm', evaluate.control_name('served-vlm')]
  return policies[1]


def test_launcher_scores_a_served_policy(data, tmp_path):
  answers = {}
  for r in data.records:
    q = pl.record_meta(r)['question']
    assert answers.setdefault(q, r.answer) == r.answer  # the question text identifies its answer
  options = {pl.record_meta(r)['question']: r.options for r in data.records}

  def correct(prompt):
    letter = answers[prompt]
    text = options[prompt][LETTERS.index(letter)]
    return f'<think>The image shows the finding of {text}. So the answer is {text}.</think><answer>{letter}</answer>'

  with FakeSGLangServer(verdict_fn=correct) as server:
    summary = launch_eval(data, str(tmp_path / 'right'), server.url)
  assert 'served-vlm' in summary['table']
  posts = chat_posts(server)
  # N questions, then the same N with every image swapped for another test image (eval.image_control)
  assert len(posts) == 2 * N and {p.body['model'] for p in posts} == {'served-vlm'}
  parts = [{c['type']: c for c in p.body['messages'][0]['content']} for p in posts]   # (requests overlap:
  own = {q['text']['text']: q['image_url']['image_url']['url'] for q in parts[:N]}        # matched by question)
  shown = {q['text']['text']: q['image_url']['image_url']['url'] for q in parts[N:]}
  assert len(own) == N and set(shown) == set(own) and all(shown[q] != own[q] for q in own)
  assert set(shown.values()) <= set(own.values())  # the other images are test images of the same questions
  # this server answers from the question alone, so the control scores as well: the row that exposes it
  with open(tmp_path / 'right' / 'eval' / 'results.json') as f:
    assert json.load(f)['policies'][2]['mean']['overall'] == 1.0
  posts = posts[:N]
  launcher_config, _ = launch.parse(launch_argv(data, str(tmp_path / 'right'), server.url))
  assert {p.body['max_tokens'] for p in posts} == {launcher_config.eval.max_new_tokens}
  assert {p.body['temperature'] for p in posts} == {0.0} and launcher_config.eval.greedy
  row = endpoint_row(str(tmp_path / 'right'))
  assert row['num_questions'] == N
  assert row['mean']['overall'] == 1.0 and row['mean']['format_rate'] == 1.0
  assert row['mean']['consistency_rate'] == 1.0  # the rule judge reads the thought's conclusion: the answer
  with open(tmp_path / 'right' / 'eval' / 'completions' / 'served-vlm-seed0.jsonl') as f:
    rows = [json.loads(line) for line in f]
  asked = list(evaluate.by_task(data.records))   # the questions grouped by task (eval.group_by_task)
  assert [x['id'] for x in rows] == [r.id for r in asked]
  assert [x['completion'] for x in rows] == [correct(pl.record_meta(r)['question']) for r in asked]

  with FakeSGLangServer(verdict_fn=lambda _: '<think>Guessing the first option.</think><answer>A</answer>') as srv:
    launch_eval(data, str(tmp_path / 'always_a'), srv.url)
  row = endpoint_row(str(tmp_path / 'always_a'))
  share_a = sum(r.answer == 'A' for r in data.records) / N
  assert 0 < share_a < 1  # so this run tells "always A" from "always right" and from "always wrong"
  assert row['num_questions'] == N
  assert row['mean']['overall'] == pytest.approx(share_a) and row['mean']['format_rate'] == 1.0
