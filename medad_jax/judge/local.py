"""In-process judges: ``local`` (an LMM's letter log-probs) and ``rule`` (deterministic extraction).

``local`` renders the judge prompt (:func:`~medad_jax.judge.prompt.build_judge_prompt`, ending in the assistant
header), asks a :class:`LetterScorer` for the log-prob of each verdict letter as the next token, and takes the
argmax. That is exactly greedy decoding of one letter under the ``[A-D]`` constraint, done in one batched forward
pass. The scorer is any Qwen2.5 / Qwen2.5-VL checkpoint or the frozen reference policy (the trainer supplies it).

``rule`` reads the conclusion straight from the thought: the last sentence that names an option decides (see
:func:`extract_conclusion`). It is free and deterministic -- for tests and cheap ablations, not a model of F.

In ``con_mode='evidence'`` both return :class:`~medad_jax.judge.evidence.EvidenceVerdict` objects: the rubric
parts from :func:`~medad_jax.judge.evidence.rule_evidence` (text heuristics) and the conclusion from the letter
scores (``local``) or the extraction (``rule``) -- a documented approximation of the served judge.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from medad_jax.judge.base import Judge, JudgeConfig, JudgeMetrics, _Partial
from medad_jax.judge.evidence import rule_evidence
from medad_jax.judge.prompt import build_judge_prompt, parse_options
from medad_jax.rewards import letter_mentions


class LetterScorer(Protocol):
  """``score_letters(prompts[N], letters[K]) -> float array [N, K]``: log p(letter_k | prompt_n) as the next
  token after each prompt (any normalisation: only the argmax per row is used)."""

  def __call__(self, prompts: list[str], letters: tuple[str, ...] = ('A', 'B', 'C', 'D')) -> np.ndarray: ...


class LocalJudge(Judge):
  """Judge with an in-process LMM: argmax of the letters' next-token log-probs, ``max_batch`` prompts a call.

  Ties go to the earlier letter (``np.argmax``). A scorer output of the wrong shape or with NaN raises
  ``ValueError`` naming the batch rows -- a verdict is never invented.
  """

  backend = 'local'

  def __init__(self, cfg: JudgeConfig, score_letters: LetterScorer, metrics: JudgeMetrics | None = None):
    super().__init__(cfg, None, metrics)
    self.score_letters = score_letters

  def prompts(self, questions: Sequence[str], thoughts: Sequence[str]) -> list[str]:
    return [build_judge_prompt(q, t, self.cfg.letters, self.cfg.template) for q, t in zip(questions, thoughts)]

  def _judge_items(self, questions, thoughts):
    prompts = self.prompts(questions, thoughts)
    letters = self.cfg.letters
    out: list[str | None] = []
    for s in range(0, len(prompts), self.cfg.max_batch):
      chunk = prompts[s:s + self.cfg.max_batch]
      logp_NK = np.asarray(self.score_letters(chunk, letters), dtype=np.float64)
      if logp_NK.shape != (len(chunk), len(letters)):
        raise ValueError(f'local judge scorer: expected log-probs of shape {(len(chunk), len(letters))} for '
                         f'{len(chunk)} prompts and letters {letters}, got {logp_NK.shape}')
      bad = np.flatnonzero(np.isnan(logp_NK).any(axis=1))
      if bad.size:
        raise ValueError(f'local judge scorer returned NaN log-probs for batch rows {(bad + s).tolist()}')
      out.extend(letters[k] for k in np.argmax(logp_NK, axis=1))
    if self.cfg.con_mode == 'evidence':  # approximation: the scorer's conclusion, rule heuristics for the rest
      out = [rule_evidence(q, t, letters, conclusion=v) for q, t, v in zip(questions, thoughts, out)]
    return _Partial(out, [])


_SENTENCE_END = re.compile(r'\n+|(?<=[.!?])\s+|(?<=[.!?]["\')\]])\s+')
_LETTER_MARKER = re.compile(r'^\(?[A-Za-z][.)]$')


def _sentences(text: str) -> list[str]:
  """Split at line breaks and sentence ends; an option marker ("B.") stays with the text after it."""
  out: list[str] = []
  for s in _SENTENCE_END.split(text):
    s = s.strip()
    if not s:
      continue
    if out and _LETTER_MARKER.match(out[-1]):
      out[-1] = f'{out[-1]} {s}'
    else:
      out.append(s)
  return out


def extract_conclusion(thought: str, options: Sequence[str] | None = None,
                       letters: Sequence[str] = ('A', 'B', 'C', 'D')) -> str | None:
  """The option the thought concludes: the last sentence naming any option decides.

  Sentences are split at line breaks and at ``.``/``!``/``?`` followed by whitespace; an option marker such as
  ``B.`` stays with the text after it (``B. Liver`` is one sentence). Walking back from the end, the first
  sentence with a mention (:func:`medad_jax.rewards.letter_mentions`: option text, "answer is C", "(B)", a
  standalone capital) decides: exactly one letter in ``letters`` -> it, several -> None (the conclusion is
  ambiguous). No mention -> None.
  """
  for sentence in reversed(_sentences(thought)):
    found = letter_mentions(sentence, options)
    if found:
      if len(found) == 1:
        (letter,) = found
        return letter if letter in letters else None
      return None
  return None


class RuleJudge(Judge):
  """Deterministic extractive judge: :func:`extract_conclusion` with the options read from the question."""

  backend = 'rule'

  def __init__(self, cfg: JudgeConfig | None = None, metrics: JudgeMetrics | None = None):
    super().__init__(cfg or JudgeConfig(backend='rule'), None, metrics)

  def _judge_items(self, questions, thoughts):
    if self.cfg.con_mode == 'evidence':
      return _Partial([rule_evidence(q, t, self.cfg.letters) for q, t in zip(questions, thoughts)], [])
    out = [extract_conclusion(t, parse_options(q), self.cfg.letters) for q, t in zip(questions, thoughts)]
    return _Partial(out, [])
