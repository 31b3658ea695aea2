"""The judge interface, its configuration, result type, failure counters and errors.

A judge maps a whole rollout batch ``(questions[N], thoughts[N])`` to ``N`` verdict letters (``F(T, Q)`` of
Eq. 6). :meth:`Judge.judge` blocks; :meth:`Judge.submit` returns a ``Future`` so the trainer can overlap the call
with device work. Every backend shares the failure policy implemented here: when a network backend gives up on
some items (after its bounded retries and per-call deadline), ``on_failure='raise'`` stops with
:class:`JudgeUnavailableError` and ``'fallback_local'`` re-judges exactly those items with the local judge,
counting them in the metrics, marking them in :attr:`JudgeResult.fallback` and logging a warning.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)

BACKENDS = ('sglang', 'openai', 'local', 'rule')
ON_FAILURE = ('raise', 'fallback_local')
OPENAI_CONSTRAINTS = ('regex', 'structured_outputs', 'guided_regex', 'json_schema')


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  """How the consistency judge is reached (mirrored by the ml_collections experiment config).

  Attributes:
    backend: 'sglang' (native ``/generate``), 'openai' (``/v1/chat/completions``), 'local' (in-process Flax
      scorer, the default) or 'rule' (deterministic extractive judge for tests and ablations).
    url: server root for 'sglang' / 'openai', e.g. ``http://judge-host:30000`` (no ``/v1``).
    model: model name sent to an OpenAI-compatible endpoint.
    timeout_s: per-HTTP-request timeout (connect, read, write, pool), capped by what is left of ``deadline_s``.
    max_retries: extra attempts per request after the first.
    backoff_s, backoff_max_s: sleep before retry ``k`` (1-based) is ``min(backoff_s * 2**(k-1), backoff_max_s)``.
    concurrency: most requests in flight at once (also the HTTP connection-pool size).
    deadline_s: wall-clock budget for one ``judge()`` call, retries included.
    on_failure: 'raise' (default) or 'fallback_local' when the judge stays down.
    api_key_env: name of the environment variable holding the API key ('' = send none). The key is read once
      and never logged or stored in this config.
    max_batch: most prompts per ``/generate`` request.
    max_new_tokens: generation budget for the one-letter verdict (a few tokens leave room for EOS).
    letters: the verdict alphabet.
    template: judge-prompt template for 'sglang' and 'local' ('chatml' or 'plain').
    openai_constraint: how the one-letter constraint is sent to an OpenAI-compatible server: 'regex'
      (SGLang, top-level ``regex``), 'structured_outputs' (vLLM >= 0.12), 'guided_regex' (older vLLM) or
      'json_schema' (``response_format`` with an enum, for hosted APIs without regex support).
    con_mode: 'deduce' (the paper's Eq. 6: one verdict letter) or 'evidence' (five rubric parts and the deduced
      letter in one JSON verdict, ``medad_jax.judge.evidence``; network backends constrain it with a JSON schema).
    evidence_max_new_tokens: generation budget of the evidence verdict's JSON.
  """
  backend: str = 'local'
  url: str = 'http://127.0.0.1:30000'
  model: str = 'default'
  timeout_s: float = 30.0
  max_retries: int = 4
  backoff_s: float = 0.5
  backoff_max_s: float = 8.0
  concurrency: int = 8
  deadline_s: float = 300.0
  on_failure: str = 'raise'
  api_key_env: str = ''
  max_batch: int = 64
  max_new_tokens: int = 4
  letters: tuple[str, ...] = ('A', 'B', 'C', 'D')
  template: str = 'chatml'
  openai_constraint: str = 'regex'
  con_mode: str = 'deduce'
  evidence_max_new_tokens: int = 128

  def __post_init__(self):
    def bad(field, expected):
      raise ValueError(f'JudgeConfig.{field}: expected {expected}, got {getattr(self, field)!r}')
    if self.backend not in BACKENDS:
      bad('backend', f'one of {BACKENDS}')
    if self.on_failure not in ON_FAILURE:
      bad('on_failure', f'one of {ON_FAILURE}')
    if self.openai_constraint not in OPENAI_CONSTRAINTS:
      bad('openai_constraint', f'one of {OPENAI_CONSTRAINTS}')
    if self.con_mode not in ('deduce', 'evidence'):
      bad('con_mode', "'deduce' or 'evidence'")
    if self.template not in ('chatml', 'plain'):
      bad('template', "'chatml' or 'plain'")
    for f in ('timeout_s', 'deadline_s'):
      if not getattr(self, f) > 0:
        bad(f, 'a positive number of seconds')
    for f in ('backoff_s', 'backoff_max_s'):
      if not getattr(self, f) >= 0:
        bad(f, 'a number of seconds >= 0')
    if not (isinstance(self.max_retries, int) and self.max_retries >= 0):
      bad('max_retries', 'an int >= 0')
    for f in ('concurrency', 'max_batch', 'max_new_tokens', 'evidence_max_new_tokens'):
      if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 1):
        bad(f, 'an int >= 1')
    if (not self.letters or len(set(self.letters)) != len(self.letters)
        or not all(isinstance(c, str) and len(c) == 1 and c.isupper() for c in self.letters)):
      bad('letters', 'distinct single upper-case letters')
    if self.backend in ('sglang', 'openai') and not self.url.startswith(('http://', 'https://')):
      bad('url', 'an http:// or https:// server root')


class JudgeError(RuntimeError):
  """Base class of judge failures."""


class JudgeUnavailableError(JudgeError):
  """The judge could not produce verdicts within its retries and deadline (the service is down or broken)."""


class JudgeCheckError(JudgeError):
  """The startup check of a served judge failed (down, slow, unhealthy or serving another model); the message
  names the URL, what answered and what to do."""


class JudgeRequestError(JudgeError):
  """The server rejected the request itself (a 4xx other than 408/429): a configuration or protocol bug that a
  retry or a fallback would only hide, so it is raised whatever ``on_failure`` says."""


class JudgeMetrics:
  """Thread-safe counters the trainer logs; every failure mode has its own key.

  Keys: ``calls``, ``items``, ``requests``, ``retries``, ``timeouts``, ``connect_errors``, ``disconnects``
  (connection dropped mid-request), ``transport_errors``, ``http_<status>`` (every non-2xx status),
  ``malformed_bodies``, ``invalid_verdicts`` (an item whose text is not a verdict letter), ``deadline_exceeded``,
  ``failed_items``, ``failed_calls``, ``fallback_items``, ``fallback_calls``, ``seconds`` (summed call time).
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._counts: collections.Counter = collections.Counter()

  def inc(self, key: str, n: float = 1) -> None:
    with self._lock:
      self._counts[key] += n

  def __getitem__(self, key: str) -> float:
    with self._lock:
      return self._counts[key]

  def snapshot(self, prefix: str = 'judge/') -> dict[str, float]:
    with self._lock:
      return {f'{prefix}{k}': v for k, v in sorted(self._counts.items())}


@dataclasses.dataclass(frozen=True)
class JudgeResult:
  """Verdicts for one batch.

  Attributes:
    letters: ``[N]`` verdict letter per (question, thought), in input order; None where the judge named no
      option (only the 'rule' judge does that -- network judges retry or fail instead).
    backend: the configured backend.
    fallback: ``[N]`` True where the verdict came from the local fallback judge.
    seconds: wall time of the call.
    evidence: ``[N]`` :class:`~medad_jax.judge.evidence.EvidenceVerdict` in ``con_mode='evidence'`` (``letters``
      are then their conclusions), else None.
  """
  letters: list[str | None]
  backend: str
  fallback: list[bool]
  seconds: float
  evidence: list | None = None

  @property
  def num_fallback(self) -> int:
    return sum(self.fallback)


@dataclasses.dataclass
class _Partial:
  """What a backend returns: verdicts where it has them, and the items it gave up on with the reason."""
  letters: list[str | None]
  failed: list[int]
  error: str = ''


class Judge(abc.ABC):
  """A batched consistency judge. Subclasses implement :meth:`_judge_items`."""

  backend: str = ''

  def __init__(self, cfg: JudgeConfig, fallback: Judge | None = None,
               metrics: JudgeMetrics | None = None):
    if cfg.on_failure == 'fallback_local' and fallback is None and cfg.backend in ('sglang', 'openai'):
      raise ValueError("JudgeConfig.on_failure='fallback_local' needs a local fallback judge (pass local_scorer "
                       'to make_judge)')
    self.cfg = cfg
    self.fallback = fallback
    self.metrics = metrics if metrics is not None else JudgeMetrics()
    self._submitter: ThreadPoolExecutor | None = None
    self._submit_lock = threading.Lock()

  @abc.abstractmethod
  def _judge_items(self, questions: list[str], thoughts: list[str]) -> _Partial:
    """Verdicts for one batch; items the backend gave up on are listed in ``failed``."""

  def judge(self, questions: Sequence[str], thoughts: Sequence[str]) -> JudgeResult:
    """Verdict letters for a whole batch (see :class:`JudgeResult`)."""
    questions, thoughts = list(questions), list(thoughts)
    if len(questions) != len(thoughts):
      raise ValueError(f'judge: {len(questions)} questions but {len(thoughts)} thoughts')
    for name, seq in (('questions', questions), ('thoughts', thoughts)):
      for i, s in enumerate(seq):
        if not isinstance(s, str):
          raise TypeError(f'judge: {name}[{i}] must be str, got {type(s).__name__}')
    t0 = time.monotonic()
    self.metrics.inc('calls')
    self.metrics.inc('items', len(questions))
    try:
      part = self._judge_items(questions, thoughts) if questions else _Partial([], [])
      letters, fb = list(part.letters), [False] * len(questions)
      if part.failed:
        self.metrics.inc('failed_items', len(part.failed))
        if self.cfg.on_failure != 'fallback_local' or self.fallback is None:
          self.metrics.inc('failed_calls')
          raise JudgeUnavailableError(
              f'{self.backend} judge at {self.cfg.url} gave up on {len(part.failed)} of {len(questions)} items '
              f'({part.error}); on_failure={self.cfg.on_failure!r}')
        log.warning('%s judge gave up on %d of %d items (%s); judging them with the local fallback',
                    self.backend, len(part.failed), len(questions), part.error)
        self.metrics.inc('fallback_calls')
        self.metrics.inc('fallback_items', len(part.failed))
        sub = self.fallback.judge([questions[i] for i in part.failed], [thoughts[i] for i in part.failed])
        for i, v in zip(part.failed, sub.evidence if sub.evidence is not None else sub.letters):
          letters[i], fb[i] = v, True
    finally:
      self.metrics.inc('seconds', time.monotonic() - t0)
    if self.cfg.con_mode == 'evidence':  # the backends' verdicts are EvidenceVerdict objects
      return JudgeResult(letters=[v.conclusion if v is not None else None for v in letters], backend=self.backend,
                         fallback=fb, seconds=time.monotonic() - t0, evidence=letters)
    return JudgeResult(letters=letters, backend=self.backend, fallback=fb, seconds=time.monotonic() - t0)

  def submit(self, questions: Sequence[str], thoughts: Sequence[str]) -> Future:
    """:meth:`judge` on a background thread; returns a ``Future[JudgeResult]`` at once."""
    with self._submit_lock:
      if self._submitter is None:
        self._submitter = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f'judge-{self.backend}')
      return self._submitter.submit(self.judge, list(questions), list(thoughts))

  def close(self) -> None:
    """Wait for submitted calls and release threads and connections."""
    with self._submit_lock:
      if self._submitter is not None:
        self._submitter.shutdown(wait=True)
        self._submitter = None
    if self.fallback is not None:
      self.fallback.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
