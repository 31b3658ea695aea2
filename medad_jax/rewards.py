"""Con-GRPO rewards (paper Eq. 3-6), host-side and vectorised over a rollout batch.

    R(Y) = λ_fmt·R_fmt(Y) + λ_acc·R_acc(A, A*) + λ_con·R_con(T, A, Q)          λ = 1/3 each by default

Every reward is a pure function ``fn(completions, **meta) -> np.ndarray`` (float32, shape ``[N]``) that never runs
inside jit. A completion is parsed once (:func:`parse_completions`) and the parse is passed to every reward via
``parsed=`` so the tags and the answer are read a single time per rollout.

Completion grammar (what :func:`parse_completion` reads)::

    <think> T </think> <answer> A </answer>

* ``R_fmt = 1`` iff each of the four tags occurs exactly once, in that order (so nothing is nested, duplicated or
  unclosed), only whitespace lies outside the two blocks, and both T and A contain non-whitespace. An empty
  ``<think></think>`` scores 0 on purpose: a format reward that accepts it is the classic GRPO collapse (the policy
  learns to skip reasoning), and R_con has nothing to judge.
* The answer A is read only from a *single* ``<answer>…</answer>`` block (even when the rest of the format is
  broken); an output without one has no answer, so an untagged "The answer is B" earns neither R_acc nor R_con.
* The thought T exists only when all four tags are present once and in order; otherwise T would contain, or be
  mixed with, the answer block, and the judge must never see the model's answer.

``R_con`` needs a judge verdict ``F(T, Q)``; :func:`judge_inputs` picks the rollouts worth judging (a thought and a
parsed answer) and :func:`start_scoring` submits them to a judge so the network call overlaps device work.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import numpy as np

LETTERS: tuple[str, ...] = ('A', 'B', 'C', 'D')
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = '<think>', '</think>', '<answer>', '</answer>'
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


# ----------------------------------------------------------------------------------------------- answer parser

# "(B)", "[b]", "B", "b.", "B)", "B:" -- the whole answer is one letter, possibly wrapped or followed by a delimiter.
_BARE_LETTER = re.compile(r'^[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:)]?$')
# "The answer is b", "Answer: (C)", "option D", "answer choice: b", "answer is option C".
_CUE_LETTER = re.compile(
    r'\b(?:answer|option|choice)s?\b(?:\s*(?:is\b|:|=|-|option\b|choice\b))*\s*[(\[]?([A-Za-z])(?![\w\'’-])',
    re.IGNORECASE)
# "(B) Liver", "[c]" -- but not the "(s)" of "lesion(s)".
_PAREN_LETTER = re.compile(r'(?<!\w)[(\[]([A-Za-z])[)\]]')
# A standalone upper-case A-D: "B", "B. Liver", "B or C". Lower-case letters count only with a cue or in
# parentheses ("a" is an English word).
_UPPER_LETTER = re.compile(r'(?<![\w\'’-])([A-D])(?![\w\'’-])')
# "A lesion ..." / "answer is a lesion" is the article, not option A. "A or B", "A is correct" still name A
# (the article cannot precede these words).
_ARTICLE_A = re.compile(r'[Aa]\s+(?!(?:or|and|nor|vs|is|was|seems|appears|fits|matches)\b)[a-z]')
_MARKDOWN = re.compile(r'[*_`"“”]+')


def _norm_space(s: str) -> str:
  return ' '.join(s.split())


def _option_pattern(option: str) -> re.Pattern | None:
  words = _norm_space(option).rstrip('.').split(' ')
  if not words or not words[0] or len(''.join(words)) < 2:
    return None  # a one-character option text cannot be told apart from a letter
  return re.compile(r'(?<!\w)' + r'\s+'.join(re.escape(w) for w in words) + r'(?!\w)', re.IGNORECASE)


def letter_mentions(text: str, options: Sequence[str] | None = None) -> set[str]:
  """Every option a free-text span names, as upper-case letters (may include letters outside ``options``).

  An option is named by its full text (case-insensitive, whitespace-insensitive; when option texts overlap the
  longest wins, so "Lung nodule" does not also name "Lung"), by a cue ("answer is b", "option C"), by a
  parenthesised letter ("(B)"), or by a standalone upper-case letter ("B", "B. Liver", "B or C") other than the
  article in "A lesion …". Option texts are blanked out before letters are read, so "Hepatitis B" names that
  option and not option B.
  """
  if options is not None and len(options) > len(LETTERS):
    raise ValueError(f'options: expected at most {len(LETTERS)} option texts, got {len(options)}')
  found: set[str] = set()
  buf = list(text)
  if options:
    order = sorted(range(len(options)), key=lambda i: -len(_norm_space(options[i])))
    for i in order:
      pat = _option_pattern(options[i])
      if pat is None:
        continue
      for m in pat.finditer(''.join(buf)):
        found.add(LETTERS[i])
        buf[m.start():m.end()] = ' ' * (m.end() - m.start())
  rest = ''.join(buf)
  for m in _CUE_LETTER.finditer(rest):
    # "option A is correct" names A; "the answer is a lesion" does not.
    if m.group(1) == 'a' and _ARTICLE_A.match(text, m.start(1)):
      continue
    found.add(m.group(1).upper())
  for m in _PAREN_LETTER.finditer(rest):
    found.add(m.group(1).upper())
  for m in _UPPER_LETTER.finditer(rest):
    if m.group(1) == 'A' and _ARTICLE_A.match(text, m.start(1)):  # the original words, not the blanks
      continue
    found.add(m.group(1))
  return found


def parse_answer(text: str | None, options: Sequence[str] | None = None) -> str | None:
  """The option letter an answer names, or ``None`` when it names none or more than one.

  Specification (``options`` are the option texts in letter order; ``valid`` = the first ``len(options)`` of
  A-D, or all four when ``options`` is None):

  1. Markdown emphasis and quotes are dropped and whitespace is collapsed.
  2. A lone letter in any case, optionally wrapped or followed by a delimiter -- ``B``, ``b``, ``(B)``, ``[b]``,
     ``B.``, ``B)``, ``B:`` -- is that letter.
  3. Otherwise every mention is collected with :func:`letter_mentions`: option texts (``Liver``), cues
     (``The answer is b``, ``Option C``), ``(B) Liver``, ``B. Liver``. Exactly one distinct letter -> that
     letter; a letter and a *different* option's text (``B. Brain`` when Brain is A), two letters (``B or C``,
     ``A and C``, ``B, C``), or no mention at all -> ``None``.
  4. A letter outside ``valid`` (``E``, or ``D`` on a three-option question) -> ``None``.

  ``None`` never matches a ground truth, so unparsable answers earn neither R_acc nor R_con.
  """
  if options is not None and len(options) > len(LETTERS):
    raise ValueError(f'options: expected at most {len(LETTERS)} option texts, got {len(options)}')
  if text is None:
    return None
  valid = LETTERS[:len(options)] if options else LETTERS
  s = _norm_space(_MARKDOWN.sub(' ', text))
  if not s:
    return None
  m = _BARE_LETTER.match(s)
  if m:
    letter = m.group(1).upper()
    return letter if letter in valid else None
  found = letter_mentions(s, options)
  if len(found) != 1:
    return None
  (letter,) = found
  return letter if letter in valid else None


def normalize_letter(value: Any, *, where: str = 'answer') -> str:
  """A ground-truth letter, upper-cased; anything but one of A-D raises ``ValueError`` naming ``where``."""
  if isinstance(value, str) and value.strip().upper() in LETTERS:
    return value.strip().upper()
  raise ValueError(f'{where}: expected a ground-truth letter in {"/".join(LETTERS)}, got {value!r}')


# ----------------------------------------------------------------------------------------------- completion parser


@dataclasses.dataclass(frozen=True)
class ParsedCompletion:
  """One rollout, read once.

  Attributes:
    well_formed: the R_fmt condition (see the module docstring).
    thought: the think block (stripped) when all four tags occur once and in order, else None.
    answer_text: the answer block (stripped) when exactly one ``<answer>…</answer>`` block exists, else None.
    letter: :func:`parse_answer` of ``answer_text``.
    problem: why the output is not well formed ('' when it is); for logs and tests.
  """
  well_formed: bool
  thought: str | None
  answer_text: str | None
  letter: str | None
  problem: str


def parse_completion(text: str, options: Sequence[str] | None = None) -> ParsedCompletion:
  """Parse one completion; see the module docstring for the grammar."""
  if not isinstance(text, str):
    raise TypeError(f'completion: expected str, got {type(text).__name__}')
  counts = {t: text.count(t) for t in _TAGS}
  answer_text = None
  a0, a1 = text.find(ANSWER_OPEN), text.find(ANSWER_CLOSE)
  if counts[ANSWER_OPEN] == 1 and counts[ANSWER_CLOSE] == 1 and a0 < a1:
    answer_text = text[a0 + len(ANSWER_OPEN):a1].strip()
  letter = parse_answer(answer_text, options)

  problem = ''
  for t in _TAGS:
    if counts[t] == 0:
      problem = f'missing {t}'
      break
    if counts[t] > 1:
      problem = f'{t} occurs {counts[t]} times'
      break
  thought = None
  if not problem:
    t0, t1 = text.find(THINK_OPEN), text.find(THINK_CLOSE)
    if not t0 < t1 < a0 < a1:
      problem = 'tags nested or out of order'
    else:
      thought = text[t0 + len(THINK_OPEN):t1].strip()
      outside = text[:t0] + text[t1 + len(THINK_CLOSE):a0] + text[a1 + len(ANSWER_CLOSE):]
      if outside.strip():
        problem = 'text outside the tags'
      elif not thought:
        problem = 'empty think'
      elif not answer_text:
        problem = 'empty answer'
  return ParsedCompletion(well_formed=not problem, thought=thought, answer_text=answer_text, letter=letter,
                          problem=problem)


def _check_len(name: str, seq: Sequence | None, n: int) -> None:
  if seq is not None and len(seq) != n:
    raise ValueError(f'{name}: expected {n} entries (one per completion), got {len(seq)}')


def parse_completions(completions: Sequence[str],
                      options: Sequence[Sequence[str]] | None = None) -> list[ParsedCompletion]:
  """:func:`parse_completion` over a batch; ``options[i]`` are the option texts of completion ``i``."""
  _check_len('options', options, len(completions))
  out = []
  for i, c in enumerate(completions):
    opts = options[i] if options is not None else None
    if opts is not None and not 1 <= len(opts) <= len(LETTERS):
      raise ValueError(f'options[{i}]: expected 1-{len(LETTERS)} option texts, got {len(opts)}')
    out.append(parse_completion(c, opts))
  return out


def _parsed(completions, parsed, options):
  if parsed is None:
    return parse_completions(completions, options)
  _check_len('parsed', parsed, len(completions))
  return parsed


# ----------------------------------------------------------------------------------------------- rewards


def format_reward(completions: Sequence[str], *, parsed: Sequence[ParsedCompletion] | None = None,
                  **_) -> np.ndarray:
  """Eq. 4: ``[N]`` float32, 1 where the completion is well formed."""
  p = _parsed(completions, parsed, None)
  return np.asarray([x.well_formed for x in p], np.float32).reshape(len(p))


def accuracy_reward(completions: Sequence[str], *, answers: Sequence[str],
                    options: Sequence[Sequence[str]] | None = None,
                    parsed: Sequence[ParsedCompletion] | None = None, **_) -> np.ndarray:
  """Eq. 5: ``[N]`` float32, 1 where the parsed answer equals the ground-truth letter ``answers[i]``."""
  p = _parsed(completions, parsed, options)
  _check_len('answers', answers, len(p))
  gt = [normalize_letter(a, where=f'answers[{i}]') for i, a in enumerate(answers)]
  return np.asarray([x.letter is not None and x.letter == g for x, g in zip(p, gt)], np.float32).reshape(len(p))


def consistency_reward(completions: Sequence[str], *, verdicts: Sequence[str | None],
                       options: Sequence[Sequence[str]] | None = None,
                       parsed: Sequence[ParsedCompletion] | None = None, **_) -> np.ndarray:
  """Eq. 6: ``[N]`` float32, 1 where the judge's verdict ``F(T, Q)`` equals the model's own parsed answer.

  ``verdicts[i]`` is None where the rollout was not judged (no thought or no parsed answer) or the judge
  named no option; such rollouts score 0.
  """
  p = _parsed(completions, parsed, options)
  _check_len('verdicts', verdicts, len(p))
  return np.asarray([x.letter is not None and v is not None and x.letter == v for x, v in zip(p, verdicts)],
                    np.float32).reshape(len(p))


@dataclasses.dataclass(frozen=True)
class RewardWeights:
  """λ of Eq. 3; the paper uses 1/3 each (Table 3 ablates e.g. 0.1/0.1/0.8). ``evidence``: the weights of the
  evidence-aware R_con's parts (``judge.con_mode='evidence'``; None = equal), see ``medad_jax.judge.evidence``."""
  fmt: float = 1 / 3
  acc: float = 1 / 3
  con: float = 1 / 3
  evidence: Any = None

  def __post_init__(self):
    if self.evidence is not None:
      from medad_jax.judge.evidence import normalised_weights
      normalised_weights(self.evidence)  # raises naming the bad weight
    for f in dataclasses.fields(self):
      if f.name == 'evidence':
        continue
      v = getattr(self, f.name)
      if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f'RewardWeights.{f.name}: expected a finite number >= 0, got {v!r}')


def total_reward(r_fmt: np.ndarray, r_acc: np.ndarray, r_con: np.ndarray,
                 weights: RewardWeights = RewardWeights()) -> np.ndarray:
  """Eq. 3: ``[N]`` float32 weighted sum of the three ``[N]`` rewards."""
  if not r_fmt.shape == r_acc.shape == r_con.shape:
    raise ValueError(f'reward shapes differ: fmt {r_fmt.shape}, acc {r_acc.shape}, con {r_con.shape}')
  return (weights.fmt * r_fmt + weights.acc * r_acc + weights.con * r_con).astype(np.float32)


# ----------------------------------------------------------------------------------------------- with a judge


class BatchJudge(Protocol):
  """What :func:`start_scoring` needs from a judge (``medad_jax.judge.Judge`` is one)."""

  def submit(self, questions: list[str], thoughts: list[str]) -> Future: ...


def judge_inputs(parsed: Sequence[ParsedCompletion],
                 questions: Sequence[str]) -> tuple[list[int], list[str], list[str]]:
  """``(indices, questions, thoughts)`` of the rollouts worth judging: a non-empty thought and a parsed answer.

  Others cannot earn R_con, so they cost no judge call. Only the question (with its options) and the thought go
  out -- never the answer block, the parsed letter or the ground truth.
  """
  _check_len('questions', questions, len(parsed))
  idx = [i for i, p in enumerate(parsed) if p.thought and p.letter is not None]
  return idx, [questions[i] for i in idx], [parsed[i].thought for i in idx]


@dataclasses.dataclass(frozen=True)
class RewardBreakdown:
  """Per-rollout rewards, each ``[N]`` float32, plus the verdicts and the judge's own result object."""
  fmt: np.ndarray
  acc: np.ndarray
  con: np.ndarray
  total: np.ndarray
  judged: np.ndarray  # [N] bool: sent to the judge
  verdicts: list[str | None]
  judge_result: Any = None
  con_parts: dict[str, np.ndarray] | None = None  # evidence mode: [N] float32 per rubric part

  def metrics(self, prefix: str = 'reward/') -> dict[str, float]:
    """Batch means for logging (plus ``con_<part>`` in the evidence mode)."""
    out = {f'{prefix}{k}': float(getattr(self, k).mean()) if len(self.total) else 0.0
           for k in ('fmt', 'acc', 'con', 'total', 'judged')}
    out.update(self.con_part_metrics(f'{prefix}con_'))
    return out

  def con_part_metrics(self, prefix: str = 'reward_con_') -> dict[str, float]:
    """Batch mean of every evidence part (empty in the deduce mode)."""
    if self.con_parts is None:
      return {}
    return {f'{prefix}{k}': float(v.mean()) if len(v) else 0.0 for k, v in self.con_parts.items()}


class PendingRewards:
  """Rewards whose judge call is in flight; :meth:`result` blocks until the verdicts are back.

  ``fmt`` and ``acc`` (``[N]`` float32) need no network and are ready at once.
  """

  def __init__(self, completions, parsed, fmt, acc, weights, idx, future, evidence: bool = False):
    self._completions, self._parsed, self._weights = completions, parsed, weights
    self._evidence = evidence
    self._idx, self._future = idx, future
    self.fmt, self.acc = fmt, acc
    # time.monotonic() when the judge call was submitted and when it finished (its wall time, for the overlap
    # metrics: ``finished`` is set by the future's done-callback, not by whoever waits on it)
    self.started = self.finished = time.monotonic()
    if future is not None:
      self.finished = None
      future.add_done_callback(self._mark_finished)

  def _mark_finished(self, _future) -> None:
    self.finished = time.monotonic()

  def done(self) -> bool:
    return self._future is None or self._future.done()

  def result(self, timeout: float | None = None) -> RewardBreakdown:
    n = len(self._parsed)
    verdicts: list[str | None] = [None] * n
    judge_result = None
    if self._future is not None:
      judge_result = self._future.result(timeout)
      letters = list(judge_result.letters)
      if len(letters) != len(self._idx):
        raise RuntimeError(f'judge returned {len(letters)} verdicts for {len(self._idx)} judged rollouts')
      for i, v in zip(self._idx, letters):
        verdicts[i] = v
    judged = np.zeros(n, bool)
    judged[self._idx] = True
    con_parts = None
    if self._evidence or (judge_result is not None and getattr(judge_result, 'evidence', None) is not None):
      from medad_jax.judge.evidence import evidence_reward
      if judge_result is not None and getattr(judge_result, 'evidence', None) is None:
        raise RuntimeError('evidence-mode scoring: the judge returned no evidence verdicts (is judge.con_mode set?)')
      ev: list = [None] * n
      for i, v in zip(self._idx, judge_result.evidence if judge_result is not None else []):
        ev[i] = v
      con, con_parts = evidence_reward(ev, [p.letter for p in self._parsed], judged, self._weights.evidence)
    else:
      con = consistency_reward(self._completions, verdicts=verdicts, parsed=self._parsed)
    return RewardBreakdown(fmt=self.fmt, acc=self.acc, con=con,
                           total=total_reward(self.fmt, self.acc, con, self._weights), judged=judged,
                           verdicts=verdicts, judge_result=judge_result, con_parts=con_parts)


def start_scoring(completions: Sequence[str], *, answers: Sequence[str], questions: Sequence[str],
                  options: Sequence[Sequence[str]] | None, judge: BatchJudge,
                  weights: RewardWeights = RewardWeights()) -> PendingRewards:
  """Parse the batch, compute R_fmt and R_acc, submit the judge call for R_con, and return at once.

  The trainer calls this right after sampling, runs device work (reference log-probs) and then calls
  ``.result()``, so the accelerator never waits on the network. ``questions[i]`` is the formatted question with
  its options (what the judge reads), ``options[i]`` the option texts (or None: letters only), ``answers[i]``
  the ground-truth letter. Bad metadata raises before anything is sent.
  """
  completions = list(completions)
  parsed = parse_completions(completions, options)
  fmt = format_reward(completions, parsed=parsed)
  acc = accuracy_reward(completions, answers=answers, parsed=parsed)
  idx, qs, ts = judge_inputs(parsed, questions)
  t0 = time.monotonic()
  future = judge.submit(qs, ts) if idx else None
  evidence = getattr(getattr(judge, 'cfg', None), 'con_mode', 'deduce') == 'evidence'
  pending = PendingRewards(completions, parsed, fmt, acc, weights, idx, future, evidence)
  pending.started = t0
  return pending


def score_batch(completions: Sequence[str], **kwargs) -> RewardBreakdown:
  """:func:`start_scoring` and wait: the synchronous form."""
  return start_scoring(completions, **kwargs).result()
