"""The evidence-aware consistency judge (``judge.con_mode='evidence'``): five rubric parts judged separately.

The paper's R_con (Eq. 5-6) is deduce-and-match: the judge deduces an answer from the question and the thought,
and the reward is 1 iff it is the model's answer. The authors' model card for the revised MedAD-R1 (read
2026-11-30) names five parts of an *evidence-aware* consistency reward -- visual grounding, question relevance,
answer support, no hallucination, no contradiction -- and gives no more detail. **The rubric wording below is
this project's**, not the authors'.

One structured-output request per rollout returns the whole verdict (SGLang's ``json_schema`` constraint on
``/generate``, ``response_format: json_schema`` on ``/v1/chat/completions``, the shape of the captured
``medad_jax/testing/fixtures/sglang/chat_json_schema.json``)::

    {"visual_grounding": bool, "question_relevance": bool, "conclusion": "A" | ... | "none",
     "answer_support": bool, "no_hallucination": bool, "no_contradiction": bool}

As in the deduce mode the judge reads the question (with its options) and the thought only -- never the model's
answer, the ground truth or the image. ``conclusion`` is the option the judge deduces, so the *reward* part
``answer_support`` is ``verdict.answer_support and verdict.conclusion == the model's answer``: the reasoning
supports an answer, and that answer is the one the model gave (the deduce mode's match lives here). The other
four reward parts are the judge's booleans. ``R_con = sum_k w_k part_k / sum_k w_k`` with the weights
``judge.evidence_weights`` (default 0.2 each); every part is logged (``reward_con_<part>``).

A reply that is not that JSON object (truncated at the token budget -- the captured fixture shows a random model
rambling until ``max_tokens`` --, a missing key, a non-boolean, a letter outside the options) is *malformed*:
:func:`parse_evidence_verdict` returns None, the network judge counts it (``invalid_verdicts``) and re-asks, and
when it keeps failing the judge's ``on_failure`` policy applies. A malformed verdict never becomes a reward.

``rule`` and ``local`` backends (so the CPU miniature can run this mode) give a documented approximation,
:func:`rule_evidence`: text heuristics for the four rubric booleans, and the conclusion from the deduce judge
(``rule``: :func:`~medad_jax.judge.local.extract_conclusion`; ``local``: the frozen policy's letter scores).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from medad_jax.judge.prompt import (_INSTRUCTION_HEADER, _QUESTION_HEADER, _REASONING_HEADER, _letters_text,
                                    render_chatml, sanitize)

CON_MODES = ('deduce', 'evidence')
PARTS = ('visual_grounding', 'question_relevance', 'answer_support', 'no_hallucination', 'no_contradiction')
BOOL_KEYS = PARTS  # the judge's five booleans; 'conclusion' is the sixth key of the verdict
NO_CONCLUSION = 'none'
DEFAULT_WEIGHTS = {p: 0.2 for p in PARTS}

EVIDENCE_SYSTEM_PROMPT = ('You are a careful medical examiner. You grade a piece of diagnostic reasoning about a '
                          'medical image. You cannot see the image; judge only from the question and the reasoning '
                          'you are given.')

# This project's rubric (the model card names the parts only).
RUBRIC = {
    'visual_grounding': 'The reasoning cites concrete visual findings (what is seen, where, how it looks) rather '
                        'than generic statements.',
    'question_relevance': 'The reasoning addresses what the question asks and the options it offers.',
    'answer_support': 'The findings stated in the reasoning lead to the option it concludes.',
    'no_hallucination': 'The reasoning claims nothing that the question and a medical image of this kind could '
                        'not show (no invented measurements, structures, history or options).',
    'no_contradiction': 'The reasoning never contradicts itself (it does not assert two different options, or a '
                        'finding and its absence).',
}


@dataclasses.dataclass(frozen=True)
class EvidenceVerdict:
  """One parsed verdict: the five booleans and the deduced option (None when the judge found no conclusion)."""
  visual_grounding: bool
  question_relevance: bool
  answer_support: bool
  no_hallucination: bool
  no_contradiction: bool
  conclusion: str | None

  def parts(self, model_letter: str | None) -> dict[str, float]:
    """The five reward parts for a rollout whose parsed answer is ``model_letter`` (see the module docstring)."""
    out = {p: float(getattr(self, p)) for p in PARTS}
    out['answer_support'] = float(self.answer_support and model_letter is not None
                                  and self.conclusion == model_letter)
    return out


# ------------------------------------------------------------------------------------------------ request


def build_evidence_user_message(question: str, thought: str, letters: Sequence[str] = ('A', 'B', 'C', 'D')) -> str:
  """The user turn: the question with options, the reasoning, the rubric and the JSON reply format."""
  rubric = '\n'.join(f'- "{p}": {RUBRIC[p]}' for p in PARTS)
  return (f'{_QUESTION_HEADER}{sanitize(question)}{_REASONING_HEADER}{sanitize(thought)}{_INSTRUCTION_HEADER}'
          'Grade the reasoning above on each criterion, true or false:\n'
          f'{rubric}\n'
          f'Also give "conclusion": the option the reasoning concludes ({_letters_text(letters)}), or '
          f'"{NO_CONCLUSION}" if it concludes none. Reply with one JSON object with the keys '
          f'{", ".join(json.dumps(k) for k in (*PARTS, "conclusion"))}.')


def build_evidence_messages(question: str, thought: str,
                            letters: Sequence[str] = ('A', 'B', 'C', 'D')) -> list[dict[str, str]]:
  """``[system, user]`` messages for an OpenAI-compatible chat endpoint."""
  return [{'role': 'system', 'content': EVIDENCE_SYSTEM_PROMPT},
          {'role': 'user', 'content': build_evidence_user_message(question, thought, letters)}]


def build_evidence_prompt(question: str, thought: str, letters: Sequence[str] = ('A', 'B', 'C', 'D'),
                          template: str = 'chatml') -> str:
  """The full prompt as one string for SGLang's ``/generate`` (``chatml`` or ``plain``, as the deduce prompt)."""
  messages = build_evidence_messages(question, thought, letters)
  if template == 'chatml':
    return render_chatml(messages)
  if template == 'plain':
    return f'{messages[0]["content"]}\n\n{messages[1]["content"]}\nJSON:'
  raise ValueError(f"evidence prompt template: expected 'chatml' or 'plain', got {template!r}")


def evidence_json_schema(letters: Sequence[str] = ('A', 'B', 'C', 'D')) -> dict[str, Any]:
  """The JSON schema constraining the verdict (every key required, no others)."""
  props: dict[str, Any] = {p: {'type': 'boolean'} for p in PARTS}
  props['conclusion'] = {'type': 'string', 'enum': [*letters, NO_CONCLUSION]}
  return {'type': 'object', 'properties': props, 'required': [*PARTS, 'conclusion'], 'additionalProperties': False}


def openai_response_format(letters: Sequence[str] = ('A', 'B', 'C', 'D')) -> dict[str, Any]:
  """``response_format`` of a chat request, in the captured fixture's shape (``type``, ``json_schema.name/schema``)."""
  return {'type': 'json_schema', 'json_schema': {'name': 'evidence_verdict', 'schema': evidence_json_schema(letters)}}


# ------------------------------------------------------------------------------------------------ parsing


def parse_evidence_verdict(text: Any, letters: Sequence[str] = ('A', 'B', 'C', 'D')) -> EvidenceVerdict | None:
  """The verdict in a reply's text, or None when it is malformed.

  Malformed: not a string, not complete JSON (e.g. cut at the token budget), not an object, a part missing or not
  a JSON boolean (``"true"`` or 1 do not count), ``conclusion`` missing or neither one of ``letters`` nor
  ``"none"``. Keys beyond these are ignored.
  """
  if not isinstance(text, str):
    return None
  try:
    obj = json.loads(text)
  except ValueError:
    return None
  if not isinstance(obj, dict):
    return None
  if not all(isinstance(obj.get(p), bool) for p in PARTS):
    return None
  c = obj.get('conclusion')
  if not isinstance(c, str) or (c not in letters and c != NO_CONCLUSION):
    return None
  return EvidenceVerdict(**{p: obj[p] for p in PARTS}, conclusion=None if c == NO_CONCLUSION else c)


# ------------------------------------------------------------------------------- rule / local approximation

# Words that describe what is seen in an image: appearance, position, intensity, shape.
_VISUAL = re.compile(
    r'\b(image|shows?|shown|seen|see|visible|visuali[sz]ed|appear(s|ance)?|looks?|region|left|right|upper|lower|'
    r'central|cent(re|er)|middle|quadrant|bright|dark|dens(e|ity)|opaci(ty|ties)|lesion|mass|nodule|texture|'
    r'outline|shape|margins?|contrast|intensity|hyper\w*|hypo\w*|focal|uniform|signal|shadow|field|contours?)\b',
    re.IGNORECASE)
_NEGATION = re.compile(r"\b(not|no|never|without|unlikely|rule[sd]? out|excludes?|isn't|is not|cannot)\b",
                       re.IGNORECASE)
_MEASUREMENT = re.compile(r'\b\d+(\.\d+)?\s*(mm|cm|ml|hu|%|mg|kg|years?)\b', re.IGNORECASE)
_STOPWORDS = frozenset('what which where there this that with from does image shown show most likely following '
                       'these those their about into based seen visible question option options answer'.split())


def rule_evidence(question: str, thought: str, letters: Sequence[str] = ('A', 'B', 'C', 'D'),
                  conclusion: str | None | type(Ellipsis) = ...) -> EvidenceVerdict:
  """The ``rule`` / ``local`` approximation of the evidence verdict (deterministic text heuristics, documented):

  * ``visual_grounding``: the thought uses a word that describes what is seen (appearance, position, intensity,
    shape: ``_VISUAL``);
  * ``question_relevance``: it names one of the options, or shares a content word (4+ letters, not a stop word)
    with the question stem;
  * ``conclusion``: :func:`~medad_jax.judge.local.extract_conclusion` (the last sentence naming an option), unless
    the caller passes the conclusion (the ``local`` judge: the frozen policy's letter);
  * ``answer_support``: there is a conclusion and at least one other sentence (findings before the conclusion);
  * ``no_hallucination``: no option letter outside the question's options and no measurement (a number with a
    unit) -- nothing the question cannot back;
  * ``no_contradiction``: the non-negated sentences that name exactly one option all name the same one.
  """
  from medad_jax.judge.local import _sentences, extract_conclusion
  from medad_jax.judge.prompt import parse_options
  from medad_jax.rewards import letter_mentions

  options = parse_options(question)
  valid = tuple(letters[:len(options)]) if options else tuple(letters)
  if conclusion is ...:
    conclusion = extract_conclusion(thought, options, valid)
  sentences = _sentences(thought)
  mentions = [letter_mentions(s, options) for s in sentences]
  named = set().union(*mentions) if mentions else set()
  stem = question.split('\n')[0]
  words = lambda s: {w.lower() for w in re.findall(r'[A-Za-z]{4,}', s)} - _STOPWORDS  # noqa: E731
  asserted = {next(iter(m)) for s, m in zip(sentences, mentions) if len(m) == 1 and not _NEGATION.search(s)}
  return EvidenceVerdict(
      visual_grounding=bool(_VISUAL.search(thought)),
      question_relevance=bool(named & set(valid)) or bool(words(stem) & words(thought)),
      answer_support=conclusion is not None and len(sentences) >= 2,
      no_hallucination=not (named - set(valid)) and not _MEASUREMENT.search(thought),
      no_contradiction=len(asserted) <= 1,
      conclusion=conclusion)


# ------------------------------------------------------------------------------------------------ reward


def normalised_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
  """``weights`` over :data:`PARTS` (None: equal), checked (every part, >= 0, positive sum) and summing to 1."""
  w = dict(DEFAULT_WEIGHTS if weights is None else weights)
  if sorted(w) != sorted(PARTS):
    raise ValueError(f'evidence weights: expected one weight for each of {PARTS}, got {sorted(w)}')
  if any(not v >= 0 for v in w.values()) or sum(w.values()) <= 0:
    raise ValueError(f'evidence weights: expected numbers >= 0 with a positive sum, got {w}')
  total = sum(w.values())
  return {p: w[p] / total for p in PARTS}


def evidence_reward(verdicts: Sequence[EvidenceVerdict | None], model_letters: Sequence[str | None],
                    judged: Sequence[bool], weights: Mapping[str, float] | None = None):
  """``(con [N], parts {part: [N]})`` float32: ``R_con = sum_k w_k part_k`` (weights normalised to sum 1).

  Rollouts not judged (no thought or no parsed answer) score 0 on every part. A judged rollout without a verdict
  raises ``RuntimeError``: the judges either return one for every item or fail, so this is a bug, and a missing
  verdict must not turn into a reward.
  """
  import numpy as np
  w = normalised_weights(weights)
  n = len(verdicts)
  if not len(model_letters) == len(judged) == n:
    raise ValueError(f'evidence_reward: {n} verdicts, {len(model_letters)} letters, {len(judged)} judged flags')
  parts = {p: np.zeros(n, np.float32) for p in PARTS}
  for i, (v, letter, j) in enumerate(zip(verdicts, model_letters, judged)):
    if not j:
      continue
    if v is None:
      raise RuntimeError(f'evidence judge: judged rollout {i} has no verdict')
    for p, x in v.parts(letter).items():
      parts[p][i] = x
  con = sum(w[p] * parts[p] for p in PARTS).astype(np.float32) if n else np.zeros(0, np.float32)
  return con, parts
