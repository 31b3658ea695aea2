"""A real HTTP server on localhost that speaks SGLang's protocol, replayed from captured fixtures.

It stands in for ``python -m sglang.launch_server`` wherever no GPU judge is available: contract tests of the
``sglang`` / ``openai`` backends, fault injection, the launcher's start/wait/stop test, and trainer smoke runs.
The fixtures (``medad_jax/testing/fixtures/sglang/``, package data, captured from SGLang 0.5.23) define the protocol:

* a request equal to a captured one gets the captured response verbatim;
* any other ``/generate`` or ``/v1/chat/completions`` request gets a response built from the captured shapes
  (a list for a list ``text``, ``meta_info.finish_reason``, chat ``choices``), with the verdict chosen by
  ``verdict_fn(prompt_text)`` (for chat, the messages' text; of a multimodal message, its ``text`` parts: the
  ``image_url`` parts are accepted and only recorded in ``seen``); the default plays an *extractive judge*: it
  finds the reasoning in a judge prompt and returns :func:`~medad_jax.judge.local.extract_conclusion` of it (a
  hash-chosen letter for other prompts), so results are deterministic and checkable;
* bad requests get SGLang's 400 bodies (malformed JSON, missing ``text``, uncompilable regex, bad chat role);
* a request constrained by the evidence verdict's JSON schema (``sampling_params.json_schema`` on ``/generate``, a
  ``response_format`` schema with a ``conclusion`` key on chat) gets ``evidence_fn(prompt_text)``'s JSON; the default
  plays the rule judge's :func:`~medad_jax.judge.evidence.rule_evidence` on the prompt's question and reasoning.

Fault injection: :meth:`FakeSGLangServer.inject` queues faults consumed one per POST: ``'drop'`` (close the
connection without a response), ``'slow'`` (answer after ``slow_s``), ``'500'`` / ``'503'`` (and ``'400'`` /
``'429'``: that status with SGLang's error body), ``'garbage'``
(200 with a non-JSON body), ``'truncate'`` (a list reply missing its last item: a partial batch) and
``'abort_item'`` (first item finishes with ``abort``). ``delay_s`` slows every POST; ``hold()`` keeps requests
unanswered until ``release()``; ``stop()`` (which also drops open connections) then ``start()`` on the same port
simulates a restart.

Run as a process: ``python -m medad_jax.testing.fake_server --port 30000 [--startup-delay S] [--unhealthy]``
(unknown arguments such as ``--model-path`` are accepted and ignored, like a drop-in for SGLang's launcher).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import hashlib
import http.server
import json
import logging
import os
import pathlib
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from medad_jax.judge.local import extract_conclusion
from medad_jax.judge.prompt import parse_options, split_judge_prompt

log = logging.getLogger(__name__)

FAULTS = ('drop', 'slow', '500', '503', 'garbage', 'truncate', 'abort_item', '400', '429')
_FAULT_TYPES = {'400': 'BadRequestError', '429': 'RateLimitError', '500': 'InternalServerError',
                '503': 'InternalServerError'}
_CHAT_ROLES = ('system', 'user', 'assistant', 'tool', 'function', 'developer')


def default_fixtures_dir() -> pathlib.Path:
  """``$MEDAD_SGLANG_FIXTURES`` or the captures shipped with the package (``medad_jax/testing/fixtures/sglang``,
  package data, so an installed copy finds them too)."""
  env = os.environ.get('MEDAD_SGLANG_FIXTURES')
  if env:
    return pathlib.Path(env)
  from importlib import resources
  return pathlib.Path(str(resources.files('medad_jax.testing') / 'fixtures' / 'sglang'))


def load_fixtures(fixtures_dir: str | os.PathLike | None = None) -> dict[str, dict]:
  """``{name: {'request': …, 'response': …}}`` for every ``*.json`` capture in ``fixtures_dir``."""
  d = pathlib.Path(fixtures_dir) if fixtures_dir else default_fixtures_dir()
  files = sorted(d.glob('*.json'))
  if not files:
    raise FileNotFoundError(f'SGLang fixtures: no *.json captures in {d}')
  out = {}
  for f in files:
    rec = json.loads(f.read_text())
    if not isinstance(rec, dict) or 'request' not in rec or 'response' not in rec:
      raise ValueError(f'SGLang fixture {f}: expected an object with "request" and "response"')
    out[f.stem] = rec
  return out


def evidence_verdict(prompt: str, letters: str = 'ABCD') -> str:
  """The fake evidence judge: :func:`~medad_jax.judge.evidence.rule_evidence` of the prompt's question and
  reasoning as the JSON verdict (all parts false and no conclusion for other prompts)."""
  from medad_jax.judge.evidence import NO_CONCLUSION, PARTS, rule_evidence
  parts = split_judge_prompt(prompt)
  if parts is None:
    return json.dumps({**{p: False for p in PARTS}, 'conclusion': NO_CONCLUSION})
  v = rule_evidence(parts[0], parts[1], tuple(letters))
  return json.dumps({**{p: getattr(v, p) for p in PARTS}, 'conclusion': v.conclusion or NO_CONCLUSION})


def _is_evidence_schema(schema: Any) -> bool:
  if isinstance(schema, str):
    try:
      schema = json.loads(schema)
    except ValueError:
      return False
  return isinstance(schema, dict) and 'conclusion' in (schema.get('properties') or {})


def extractive_verdict(prompt: str, letters: str = 'ABCD') -> str:
  """The fake judge model: the conclusion of the reasoning in a judge prompt, else a hash-chosen letter."""
  parts = split_judge_prompt(prompt)
  if parts is not None:
    question, thought = parts
    v = extract_conclusion(thought, parse_options(question), tuple(letters))
    if v is not None:
      return v
  return letters[hashlib.sha256(prompt.encode()).digest()[0] % len(letters)]


@dataclasses.dataclass
class Seen:
  """One POST as the server received it."""
  path: str
  body: Any  # decoded JSON, or the raw bytes when the body was not JSON
  t_arrival: float  # time.monotonic()
  headers: dict[str, str]


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'  # keep-alive, as the client pools connections

  def log_message(self, format, *args):  # noqa: A002 -- http.server's signature
    log.debug('fake sglang: ' + format, *args)

  def _send(self, status: int, payload: Any = None, *, raw: bytes | None = None,
            content_type: str = 'application/json') -> None:
    data = raw if raw is not None else (b'' if payload is None else json.dumps(payload).encode())
    self.send_response(status)
    self.send_header('Content-Type', content_type)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def do_GET(self):  # noqa: N802
    fake: FakeSGLangServer = self.server.fake
    if self.path == '/health':
      if fake.unhealthy:
        self._send(503, raw=b'', content_type='text/plain')
      else:
        self._send(fake.fixtures['health']['response']['status'], raw=b'', content_type='text/plain')
    elif self.path == '/model_info':
      self._send(200, fake.fixtures['model_info']['response']['json'])
    else:
      self._send(404, {'detail': 'Not Found'})

  def do_POST(self):  # noqa: N802
    fake: FakeSGLangServer = self.server.fake
    raw = self.rfile.read(int(self.headers.get('Content-Length') or 0))
    with fake._in_flight():
      try:
        body = json.loads(raw)
      except ValueError:
        body = raw
      fake.seen.append(Seen(self.path, body, time.monotonic(), dict(self.headers.items())))
      fault = fake._next_fault()
      while not fake._go.wait(0.02) and not fake._stopping.is_set():
        pass  # held: answer only after release()
      if fake.delay_s:
        fake._stopping.wait(fake.delay_s)
      if fault == 'drop':
        self.close_connection = True  # no response at all: the client sees the connection close
        return
      if fault == 'slow':
        fake._stopping.wait(fake.slow_s)
      if fault in _FAULT_TYPES:
        self._send(int(fault), {'object': 'error', 'message': f'injected HTTP {fault}', 'type': _FAULT_TYPES[fault],
                                'param': None, 'code': int(fault)})
        return
      if fault == 'garbage':
        self._send(200, raw=b'<html><body>502 Bad Gateway</body></html>', content_type='text/html')
        return
      status, payload = fake.respond(self.path, raw)
      if status == 200 and isinstance(payload, list) and fault == 'truncate':
        payload = payload[:-1]
      if status == 200 and isinstance(payload, list) and payload and fault == 'abort_item':
        payload = copy.deepcopy(payload)
        payload[0]['text'] = ''
        payload[0]['meta_info']['finish_reason'] = {'type': 'abort', 'message': 'injected abort'}
      self._send(status, payload)


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  allow_reuse_address = True

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.open_sockets: set[socket.socket] = set()
    self.sockets_lock = threading.Lock()

  def process_request(self, request, client_address):
    with self.sockets_lock:
      self.open_sockets.add(request)
    super().process_request(request, client_address)

  def shutdown_request(self, request):
    with self.sockets_lock:
      self.open_sockets.discard(request)
    super().shutdown_request(request)

  def drop_connections(self) -> None:
    """Close every established connection, as a dying server process would (keep-alive ones included)."""
    with self.sockets_lock:
      socks = list(self.open_sockets)
    for s in socks:
      with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)

  def handle_error(self, request, client_address):
    log.debug('fake sglang: connection from %s ended with an error', client_address, exc_info=True)


class FakeSGLangServer:
  """SGLang's HTTP protocol on ``host:port`` (port 0 = ephemeral) in a background thread."""

  def __init__(self, fixtures_dir: str | os.PathLike | None = None, *, host: str = '127.0.0.1', port: int = 0,
               verdict_fn: Callable[[str], str] | None = None, delay_s: float = 0.0, slow_s: float = 5.0,
               unhealthy: bool = False, evidence_fn: Callable[[str], str] | None = None):
    self.fixtures = load_fixtures(fixtures_dir)
    self.evidence_fn = evidence_fn or evidence_verdict
    self.host, self.port = host, port
    self.verdict_fn = verdict_fn or extractive_verdict
    self.delay_s, self.slow_s, self.unhealthy = delay_s, slow_s, unhealthy
    self.seen: list[Seen] = []
    self.max_in_flight = 0
    self._faults: collections.deque[str] = collections.deque()
    self._lock = threading.Lock()
    self._in_flight_n = 0
    self._stopping = threading.Event()
    self._go = threading.Event()
    self._go.set()
    self._httpd: _Server | None = None
    self._thread: threading.Thread | None = None

  # -- lifecycle -------------------------------------------------------------------------------------------------

  @property
  def url(self) -> str:
    return f'http://{self.host}:{self.port}'

  def start(self) -> FakeSGLangServer:
    self._stopping.clear()
    self._httpd = _Server((self.host, self.port), _Handler)
    self._httpd.fake = self
    self.port = self._httpd.server_address[1]  # keep the port across stop()/start() (a restart)
    self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={'poll_interval': 0.05},
                                    name=f'fake-sglang-{self.port}', daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    """Stop listening and abandon in-flight slow requests (their clients see a dropped connection)."""
    if self._httpd is None:
      return
    self._stopping.set()
    self._httpd.shutdown()
    self._httpd.server_close()
    self._httpd.drop_connections()
    self._thread.join(timeout=5)
    self._httpd = self._thread = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  # -- fault injection and bookkeeping ----------------------------------------------------------------------------

  def inject(self, *faults: str) -> None:
    for f in faults:
      if f not in FAULTS:
        raise ValueError(f'fake sglang fault: expected one of {FAULTS}, got {f!r}')
    with self._lock:
      self._faults.extend(faults)

  def hold(self) -> None:
    """Keep every POST waiting (received, unanswered) until :meth:`release`."""
    self._go.clear()

  def release(self) -> None:
    self._go.set()

  def _next_fault(self) -> str | None:
    with self._lock:
      return self._faults.popleft() if self._faults else None

  @contextlib.contextmanager
  def _in_flight(self):
    with self._lock:
      self._in_flight_n += 1
      self.max_in_flight = max(self.max_in_flight, self._in_flight_n)
    try:
      yield
    finally:
      with self._lock:
        self._in_flight_n -= 1

  # -- protocol ---------------------------------------------------------------------------------------------------

  def respond(self, path: str, raw: bytes) -> tuple[int, Any]:
    """``(status, json)`` SGLang would send for a POST of ``raw`` to ``path``."""
    try:
      body = json.loads(raw)
    except ValueError as e:
      tmpl = copy.deepcopy(self.fixtures['error_bad_json_body']['response'])
      pos, msg = getattr(e, 'pos', 0), getattr(e, 'msg', str(e))
      tmpl['json']['message'] = (f"1 validation error:\n  {{'type': 'json_invalid', 'loc': ('body', {pos}), "
                                 f"'msg': 'JSON decode error', 'input': {{}}, 'ctx': {{'error': '{msg}'}}}}")
      return tmpl['status'], tmpl['json']
    for rec in self.fixtures.values():  # a captured request replays its captured response
      req = rec['request']
      if req.get('method') == 'POST' and req.get('path') == path and req.get('json') == body:
        return rec['response']['status'], copy.deepcopy(rec['response']['json'])
    if path == '/generate':
      return self._generate(body)
    if path == '/v1/chat/completions':
      return self._chat(body)
    return 404, {'detail': 'Not Found'}

  def _constrained(self, prompt: str, regex: str | None) -> str:
    v = self.verdict_fn(prompt)
    if regex is None or re.fullmatch(regex, v):
      return v
    # A grammar-constrained server can only emit a matching string: take the first letter that matches.
    return next((c for c in 'ABCDEFGHIJKLMNOPQRSTUVWXYZ' if re.fullmatch(regex, c)), v)

  def _regex_error(self, regex: Any) -> tuple[int, Any] | None:
    if regex is None:
      return None
    try:
      re.compile(regex)
    except (re.error, TypeError) as e:
      return 400, {'error': {'message': f'Failed to compile regex grammar: Regex parsing error: {e}\n'}}
    return None

  def _generate(self, body: Any) -> tuple[int, Any]:
    if not isinstance(body, dict) or not any(k in body for k in ('text', 'input_ids', 'input_embeds')):
      rec = self.fixtures['error_missing_text']['response']
      return rec['status'], copy.deepcopy(rec['json'])
    sp = body.get('sampling_params') or {}
    regex = sp.get('regex')
    err = self._regex_error(regex)
    if err:
      return err
    texts = body['text'] if isinstance(body.get('text'), list) else [body.get('text', '')]
    template = self.fixtures['generate_batch_regex']['response']['json'][0]
    items = []
    evidence = _is_evidence_schema(sp.get('json_schema'))
    for t in texts:
      item = copy.deepcopy(template)
      v = self.evidence_fn(str(t)) if evidence else self._constrained(str(t), regex)
      item['text'] = v
      item['output_ids'] = [ord(v[0]) - 29 if v else 0, 2]
      item['meta_info'].update(id=uuid.uuid4().hex, prompt_tokens=max(1, len(str(t)) // 4),
                               response_sent_to_client_ts=time.time())
      items.append(item)
    return 200, items if isinstance(body.get('text'), list) else items[0]

  def _chat(self, body: Any) -> tuple[int, Any]:
    msgs = body.get('messages') if isinstance(body, dict) else None
    bad = [i for i, m in enumerate(msgs or []) if not isinstance(m, dict) or m.get('role') not in _CHAT_ROLES]
    if not msgs or bad:
      tmpl = copy.deepcopy(self.fixtures['error_chat_bad_role']['response'])
      i = bad[0] if bad else 0
      tmpl['json']['message'] = (f"1 validation error:\n  {{'type': 'value_error', 'loc': ('body', 'messages', {i}, "
                                 f"'role'), 'msg': \"Value error, 'role' must be one of {', '.join(_CHAT_ROLES)}\"}}")
      return tmpl['status'], tmpl['json']
    regex = body.get('regex')
    err = self._regex_error(regex)
    if err:
      return err
    prompt = '\n'.join(_content_text(m.get('content', '')) for m in msgs)
    fmt = body.get('response_format') or {}
    if fmt.get('type') == 'json_schema' and _is_evidence_schema((fmt.get('json_schema') or {}).get('schema')):
      content = self.evidence_fn(prompt)
    else:
      v = self._constrained(prompt, regex)
      content = json.dumps({'answer': v}) if fmt.get('type') == 'json_schema' else v
    out = copy.deepcopy(self.fixtures['chat_regex']['response']['json'])
    out.update(id=uuid.uuid4().hex, created=int(time.time()), model=body.get('model', 'default'))
    out['choices'][0]['message']['content'] = content
    return 200, out


def _content_text(content: Any) -> str:
  """A chat message's text: a string as is; a multimodal list (OpenAI parts, as SGLang accepts) its ``text``
  parts joined by newlines (``image_url`` and other parts carry no text)."""
  if isinstance(content, list):
    return '\n'.join(str(p.get('text', '')) for p in content if isinstance(p, dict) and p.get('type') == 'text')
  return str(content)


def main(argv: list[str] | None = None) -> None:
  """Serve until SIGTERM / SIGINT (a stand-in for ``python -m sglang.launch_server``)."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--host', default='127.0.0.1')
  ap.add_argument('--port', type=int, default=30000)
  ap.add_argument('--fixtures', default=None, help='fixture directory (default: the packaged captures)')
  ap.add_argument('--startup-delay', type=float, default=0.0, help='seconds before the port opens')
  ap.add_argument('--unhealthy', action='store_true', help='answer /health with 503 forever')
  ap.add_argument('--pid-file', default=None)
  args, ignored = ap.parse_known_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(message)s')
  if ignored:
    log.info('ignoring launcher arguments %s', ignored)
  if args.pid_file:
    pathlib.Path(args.pid_file).write_text(str(os.getpid()))
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
  if stop.wait(args.startup_delay):
    return
  server = FakeSGLangServer(args.fixtures, host=args.host, port=args.port, unhealthy=args.unhealthy).start()
  log.info('fake SGLang server listening on %s', server.url)
  stop.wait()
  server.stop()
  log.info('fake SGLang server stopped')


if __name__ == '__main__':
  main()
