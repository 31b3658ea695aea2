"""Network judges: SGLang's native ``/generate`` and any OpenAI-compatible ``/v1/chat/completions``.

Both send the judge prompt with the verdict constrained to one option letter at temperature 0, through one pooled
``httpx.Client`` (``concurrency`` connections, per-request timeouts). A batch is split into *requests* -- up to
``max_batch`` prompts in one ``/generate`` call (its ``text`` is a list and the reply a list in the same order),
or one chat completion per item -- and at most ``concurrency`` requests run at once.

Faults and what happens (each is counted in :class:`~medad_jax.judge.base.JudgeMetrics`):

=====================================  =========================================================================
timeout, refused connection, dropped   retried with exponential backoff, up to ``max_retries`` times and never
connection, 5xx / 408 / 429, a body    past the call's ``deadline_s`` (each request's timeout is capped by the
that is not JSON or not the expected   time left)
shape (e.g. a list of the wrong
length: a partial batch)
an item that is not a verdict letter   only those items are re-sent, same budget (``con_mode='evidence'``: a
(or evidence JSON)                     reply that is not the complete JSON verdict)
(``finish_reason`` abort, truncated
JSON, text outside the alphabet)
other 4xx (bad regex, bad role, ...)   :class:`JudgeRequestError` at once with the server's message: a bug in our
                                       request, which neither a retry nor a fallback would fix
budget spent                           the items are reported failed; :class:`Judge` applies ``on_failure``
=====================================  =========================================================================
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from medad_jax.judge.base import (Judge, JudgeCheckError, JudgeConfig, JudgeError, JudgeMetrics, JudgeRequestError,
                                  _Partial)
from medad_jax.judge.evidence import (build_evidence_messages, build_evidence_prompt, evidence_json_schema,
                                      openai_response_format, parse_evidence_verdict)
from medad_jax.judge.prompt import build_judge_messages, build_judge_prompt, letter_regex

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = frozenset({408, 429})


class _Retryable(Exception):
  """A failed attempt worth retrying (transport error, 5xx, malformed body)."""


def error_message(body: Any) -> str:
  """The message of an SGLang / OpenAI error body: ``{"error": {"message"}}`` or ``{"object": "error", "message"}``."""
  if isinstance(body, dict):
    err = body.get('error')
    if isinstance(err, dict) and isinstance(err.get('message'), str):
      return err['message']
    if isinstance(err, str):
      return err
    if isinstance(body.get('message'), str):
      return body['message']
  return str(body)[:500]


def _verdict(text: Any, letters: Sequence[str]) -> str | None:
  if isinstance(text, str) and text.strip() in letters:
    return text.strip()
  return None


def parse_generate_response(body: Any, n: int, letters: Sequence[str], parse=None) -> list[Any]:
  """Verdicts from a batched ``/generate`` reply: a list of ``n`` objects with ``text`` and ``meta_info``.

  An item counts when its ``text`` (stripped) is one of ``letters`` and its ``finish_reason.type`` is ``stop``
  or ``length``; anything else (``abort``, an error object, another text) gives None for that item. A body
  that is not a list of ``n`` objects raises ``ValueError``. ``parse(text, letters)`` reads another verdict
  format (the evidence mode's JSON) instead of one letter.
  """
  if not isinstance(body, list) or len(body) != n:
    got = f'a list of {len(body)}' if isinstance(body, list) else type(body).__name__
    raise ValueError(f'/generate: expected a list of {n} results, got {got}')
  out = []
  for item in body:
    if not isinstance(item, dict):
      raise ValueError(f'/generate: expected result objects, got {type(item).__name__}')
    reason = ((item.get('meta_info') or {}).get('finish_reason') or {})
    kind = reason.get('type') if isinstance(reason, dict) else reason
    out.append((parse or _verdict)(item.get('text'), letters) if kind in ('stop', 'length') else None)
  return out


def parse_chat_response(body: Any, letters: Sequence[str], constraint: str = 'regex', parse=None) -> Any:
  """The verdict of one ``/v1/chat/completions`` reply (``choices[0].message.content``), or None.

  With ``constraint='json_schema'`` the content must be complete JSON ``{"answer": "<letter>"}``; a reply cut
  at ``max_tokens`` (``finish_reason='length'``, truncated JSON) gives None. A body without ``choices[0].message``
  raises ``ValueError``.
  """
  try:
    choice = body['choices'][0]
    content = choice['message']['content']
  except (KeyError, IndexError, TypeError) as e:
    raise ValueError(f'/v1/chat/completions: no choices[0].message.content in reply ({e!r})') from None
  if parse is not None:
    return parse(content, letters)
  if constraint == 'json_schema':
    try:
      content = json.loads(content)['answer']
    except (TypeError, ValueError, KeyError):
      return None
  return _verdict(content, letters)


class HTTPJudge(Judge):
  """Retry / deadline / concurrency engine shared by the two network backends."""

  def __init__(self, cfg: JudgeConfig, fallback: Judge | None = None, metrics: JudgeMetrics | None = None):
    super().__init__(cfg, fallback, metrics)
    headers = {}
    if cfg.api_key_env:
      key = os.environ.get(cfg.api_key_env)
      if not key:
        raise ValueError(f'JudgeConfig.api_key_env: environment variable {cfg.api_key_env!r} is not set or empty')
      headers['Authorization'] = f'Bearer {key}'
    self._client = httpx.Client(
        base_url=cfg.url.rstrip('/'), headers=headers, timeout=httpx.Timeout(cfg.timeout_s),
        limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency))
    self._pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix=f'{self.backend}-http')
    self._closed = threading.Event()

  def __repr__(self):  # the API key lives only in the client's headers and never appears here
    return f'{type(self).__name__}(url={self.cfg.url!r}, model={self.cfg.model!r})'

  # -- one HTTP exchange --------------------------------------------------------------------------------------

  def _post(self, path: str, payload: Any, timeout: float) -> Any:
    """POST JSON, return the decoded JSON body; raises _Retryable or JudgeRequestError."""
    m = self.metrics
    m.inc('requests')
    try:
      r = self._client.post(path, json=payload, timeout=timeout)
    except httpx.TimeoutException as e:
      m.inc('timeouts')
      raise _Retryable(f'timeout after {timeout:.2f}s ({type(e).__name__})') from None
    except httpx.ConnectError as e:
      m.inc('connect_errors')
      raise _Retryable(f'cannot connect ({e})') from None
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
      m.inc('disconnects')
      raise _Retryable(f'connection dropped ({type(e).__name__}: {e})') from None
    except httpx.TransportError as e:
      m.inc('transport_errors')
      raise _Retryable(f'transport error ({type(e).__name__}: {e})') from None
    if r.status_code >= 300:
      m.inc(f'http_{r.status_code}')
      try:
        msg = error_message(r.json())[:500]
      except ValueError:
        msg = r.text[:500]
      if r.status_code >= 500 or r.status_code in _RETRYABLE_STATUS:
        raise _Retryable(f'HTTP {r.status_code}: {msg}')
      raise JudgeRequestError(f'{self.backend} judge at {self.cfg.url}{path} rejected the request with HTTP '
                              f'{r.status_code}: {msg}')
    try:
      return r.json()
    except ValueError:
      m.inc('malformed_bodies')
      raise _Retryable(f'HTTP {r.status_code} body is not JSON: {r.text[:120]!r}') from None

  def _parse(self):
    """The verdict parser of ``con_mode``: None (one letter) or the evidence JSON's."""
    return parse_evidence_verdict if self.cfg.con_mode == 'evidence' else None

  # -- one request unit with retries ----------------------------------------------------------------------------

  @abc.abstractmethod
  def _request(self, items: list[Any], timeout: float) -> list[str | None]:
    """Send ``items`` (prompts or message lists) as one unit; verdict per item (None = invalid verdict)."""

  @abc.abstractmethod
  def _units(self, n: int) -> list[list[int]]:
    """How ``n`` items are grouped into requests."""

  def _run_unit(self, items: list[Any], deadline: float) -> tuple[list[str | None], str]:
    """Verdicts for ``items``, retrying failed attempts and re-sending invalid items until the budget is spent.

    Returns the verdicts (None where the budget ran out) and the last error ('' on full success).
    """
    cfg, m = self.cfg, self.metrics
    out: list[str | None] = [None] * len(items)
    pending = list(range(len(items)))
    attempt, last = 0, ''
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        m.inc('deadline_exceeded')
        return out, f'deadline of {cfg.deadline_s:g}s exceeded; last error: {last or "none"}'
      try:
        verdicts = self._request([items[i] for i in pending], min(cfg.timeout_s, left))
        still = [i for i, v in zip(pending, verdicts) if v is None]
        for i, v in zip(pending, verdicts):
          out[i] = v
        if still:
          m.inc('invalid_verdicts', len(still))
          last = f'{len(still)} item(s) without a valid verdict letter'
        pending = still
        if not pending:
          return out, ''
      except _Retryable as e:
        last = str(e)
      attempt += 1
      if attempt > cfg.max_retries:
        return out, f'{cfg.max_retries} retries exhausted; last error: {last}'
      if self._closed.is_set():
        return out, f'judge closed; last error: {last}'
      m.inc('retries')
      pause = min(cfg.backoff_s * 2 ** (attempt - 1), cfg.backoff_max_s, max(0.0, deadline - time.monotonic()))
      log.info('%s judge attempt %d failed (%s); retrying in %.2fs', self.backend, attempt, last, pause)
      self._closed.wait(pause)

  def _judge_with(self, items: list[Any]) -> _Partial:
    deadline = time.monotonic() + self.cfg.deadline_s
    units = self._units(len(items))
    futures = [self._pool.submit(self._run_unit, [items[i] for i in u], deadline) for u in units]
    letters: list[str | None] = [None] * len(items)
    failed, errors = [], []
    for u, f in zip(units, futures):
      verdicts, err = f.result()  # JudgeRequestError propagates from here
      for i, v in zip(u, verdicts):
        letters[i] = v
        if v is None:
          failed.append(i)
      if err:
        errors.append(err)
    return _Partial(letters, sorted(failed), errors[-1] if errors else '')

  def close(self) -> None:
    super().close()
    self._closed.set()
    self._pool.shutdown(wait=True)
    self._client.close()


class SGLangJudge(HTTPJudge):
  """SGLang's native API: ``POST /generate`` with ``text=[prompt, …]`` and ``sampling_params.regex``."""

  backend = 'sglang'

  def sampling_params(self) -> dict[str, Any]:
    if self.cfg.con_mode == 'evidence':
      return {'json_schema': json.dumps(evidence_json_schema(self.cfg.letters)),
              'max_new_tokens': self.cfg.evidence_max_new_tokens, 'temperature': 0}
    return {'regex': letter_regex(self.cfg.letters), 'max_new_tokens': self.cfg.max_new_tokens, 'temperature': 0}

  def _units(self, n):
    b = self.cfg.max_batch
    return [list(range(s, min(n, s + b))) for s in range(0, n, b)]

  def _request(self, items, timeout):
    body = self._post('/generate', {'text': list(items), 'sampling_params': self.sampling_params()}, timeout)
    try:
      return parse_generate_response(body, len(items), self.cfg.letters, self._parse())
    except ValueError as e:
      self.metrics.inc('malformed_bodies')
      raise _Retryable(str(e)) from None

  def generate_letters(self, prompts: Sequence[str]) -> tuple[list[str | None], str]:
    """Verdicts for already-rendered prompts (retries included, no fallback): ``(letters, last_error)``."""
    part = self._judge_with(list(prompts))
    return part.letters, part.error

  def _judge_items(self, questions, thoughts):
    build = build_evidence_prompt if self.cfg.con_mode == 'evidence' else build_judge_prompt
    return self._judge_with([build(q, t, self.cfg.letters, self.cfg.template) for q, t in zip(questions, thoughts)])


class OpenAIJudge(HTTPJudge):
  """Any OpenAI-compatible ``POST /v1/chat/completions``; one request per item, ``concurrency`` at once."""

  backend = 'openai'

  def constraint(self) -> dict[str, Any]:
    rx = letter_regex(self.cfg.letters)
    kind = self.cfg.openai_constraint
    if kind == 'regex':
      return {'regex': rx}
    if kind == 'structured_outputs':
      return {'structured_outputs': {'regex': rx}}
    if kind == 'guided_regex':
      return {'guided_regex': rx}
    return {'response_format': {'type': 'json_schema', 'json_schema': {
        'name': 'verdict', 'schema': {'type': 'object', 'properties': {
            'answer': {'type': 'string', 'enum': list(self.cfg.letters)}}, 'required': ['answer']}}}}

  def payload(self, messages: list[dict[str, str]]) -> dict[str, Any]:
    if self.cfg.con_mode == 'evidence':  # always a JSON schema: the verdict is an object
      return {'model': self.cfg.model, 'messages': messages, 'max_tokens': self.cfg.evidence_max_new_tokens,
              'temperature': 0, 'response_format': openai_response_format(self.cfg.letters)}
    return {'model': self.cfg.model, 'messages': messages, 'max_tokens': self.cfg.max_new_tokens,
            'temperature': 0, **self.constraint()}

  def _units(self, n):
    return [[i] for i in range(n)]

  def _request(self, items, timeout):
    (messages,) = items
    body = self._post('/v1/chat/completions', self.payload(messages), timeout)
    try:
      return [parse_chat_response(body, self.cfg.letters, self.cfg.openai_constraint, self._parse())]
    except ValueError as e:
      self.metrics.inc('malformed_bodies')
      raise _Retryable(str(e)) from None

  def chat_letters(self, conversations: Sequence[list[dict[str, str]]]) -> tuple[list[str | None], str]:
    """Verdicts for ready-made message lists (retries included, no fallback): ``(letters, last_error)``."""
    part = self._judge_with(list(conversations))
    return part.letters, part.error

  def _judge_items(self, questions, thoughts):
    build = build_evidence_messages if self.cfg.con_mode == 'evidence' else build_judge_messages
    return self._judge_with([build(q, t, self.cfg.letters) for q, t in zip(questions, thoughts)])


# ------------------------------------------------------------------------------------------- startup check

# A question whose reasoning plainly concludes one option: any working judge model answers with a letter.
PROBE_QUESTION = 'Which organ is shown in the image?\nA. Liver\nB. Brain\nC. Lung\nD. Kidney'
PROBE_THOUGHT = 'The image shows two air-filled fields with branching vessels, so the organ is the lung (C).'
_SKIP_HINT = ' (--config.judge.check=False skips this check when the server is started later)'


def served_models(cfg: JudgeConfig, client: httpx.Client) -> list[str]:
  """The model name(s) the server reports: SGLang's ``/model_info`` (``served_model_name``, ``model_path``) or the
  OpenAI-compatible ``/v1/models`` ids."""
  path = '/model_info' if cfg.backend == 'sglang' else '/v1/models'
  r = client.get(path)
  if r.status_code != 200:
    raise JudgeCheckError(f'{cfg.backend} judge at {cfg.url}: GET {path} answered HTTP {r.status_code} '
                          f'{r.text[:200]!r}; is this an {cfg.backend} server?' + _SKIP_HINT)
  try:
    body = r.json()
    if cfg.backend == 'sglang':
      names = [body.get('served_model_name'), body.get('model_path')]
    else:
      names = [m.get('id') for m in body['data']]
  except (ValueError, KeyError, TypeError, AttributeError):
    raise JudgeCheckError(f'{cfg.backend} judge at {cfg.url}: GET {path} did not return the expected JSON '
                          f'({r.text[:200]!r})' + _SKIP_HINT) from None
  return [n for n in dict.fromkeys(names) if isinstance(n, str) and n]


def check_server(cfg: JudgeConfig, timeout_s: float = 10.0) -> dict:
  """Startup check of an ``sglang`` / ``openai`` judge, before any training: health (``/health`` or
  ``/v1/models``), the served model (must equal ``cfg.model`` unless that is ``'default'``) and one tiny scoring
  request in the configured form (the prompt, constraint and endpoint training will use), each bounded by
  ``timeout_s``, no retries. Returns ``{'models': [...], 'verdict': letter, 'seconds': s}``; raises
  :class:`JudgeCheckError` naming the URL, the status and what to do.
  """
  if cfg.backend not in ('sglang', 'openai'):
    raise ValueError(f'check_server: backend {cfg.backend!r} has no server to check')
  t0 = time.monotonic()
  url = cfg.url.rstrip('/')
  health = '/health' if cfg.backend == 'sglang' else '/v1/models'
  start_hint = ('start it (launch/judge_sglang.sh --model MODEL) or fix --config.judge.url'
                if cfg.backend == 'sglang' else 'start it or fix --config.judge.url')
  headers = {}
  if cfg.api_key_env and os.environ.get(cfg.api_key_env):
    headers['Authorization'] = f'Bearer {os.environ[cfg.api_key_env]}'
  with httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(timeout_s)) as client:
    try:
      r = client.get(health)
      if r.status_code != 200:
        raise JudgeCheckError(f'{cfg.backend} judge at {url}: GET {health} answered HTTP {r.status_code} (not '
                              'ready: still loading the model, or unhealthy); wait until it answers 200 or restart '
                              'it' + _SKIP_HINT)
      models = served_models(cfg, client)
    except httpx.TimeoutException:
      raise JudgeCheckError(f'{cfg.backend} judge at {url}: no answer to GET {health} within {timeout_s:g} s (the '
                            'server is overloaded or hung); check it, or raise --config.judge.check_timeout_s'
                            + _SKIP_HINT) from None
    except httpx.TransportError as e:
      raise JudgeCheckError(f'{cfg.backend} judge at {url}: cannot connect ({type(e).__name__}: {e}); '
                            f'{start_hint}' + _SKIP_HINT) from None
  if cfg.model != 'default' and cfg.model not in models:
    raise JudgeCheckError(f'{cfg.backend} judge at {url} serves model {models} but config.judge.model is '
                          f'{cfg.model!r}: set --config.judge.model={models[0] if models else "NAME"} (or '
                          "'default'), or point --config.judge.url at the server of that model")
  probe_cfg = dataclasses.replace(cfg, max_retries=0, timeout_s=timeout_s, deadline_s=timeout_s,
                                  on_failure='raise')
  judge = (SGLangJudge if cfg.backend == 'sglang' else OpenAIJudge)(probe_cfg)
  try:
    letters = judge.judge([PROBE_QUESTION], [PROBE_THOUGHT]).letters
  except JudgeRequestError as e:
    raise JudgeCheckError(f'{cfg.backend} judge at {url}: the scoring request was rejected ({e}); check '
                          '--config.judge.* (template, model, constraint) against the server') from None
  except JudgeError as e:
    raise JudgeCheckError(f'{cfg.backend} judge at {url}: one tiny scoring request got no verdict within '
                          f'{timeout_s:g} s ({e}); the server is too slow or not generating' + _SKIP_HINT) from None
  finally:
    judge.close()
  out = {'models': models, 'verdict': letters[0], 'seconds': time.monotonic() - t0}
  log.info('%s judge at %s: healthy, serving %s, scored a probe (%s) in %.2f s', cfg.backend, url, models,
           letters[0], out['seconds'])
  return out
