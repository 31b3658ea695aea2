"""The consistency judge's prompt: the question with its options and the thought -- nothing else.

``F(T, Q)`` of Eq. 6 deduces an answer from the thought alone, so the prompt carries exactly two inputs: the
formatted question ``Q`` (with its ``A. …``-``D. …`` lines) and the thought ``T``. The model's answer, the ground
truth and the image never reach it; the builders do not even take them as arguments.

Two renderings of the same conversation:

* :func:`build_judge_messages` -- OpenAI-style ``[{'role', 'content'}]`` for ``/v1/chat/completions``;
* :func:`build_judge_prompt` -- the same conversation rendered with the Qwen ChatML template and ending in the
  assistant header, so the *next token* is the verdict letter. SGLang's ``/generate`` and the in-process ``local``
  judge (which reads the letters' log-probs at that position) use it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SYSTEM_PROMPT = ('You are a careful medical examiner. You check which answer a piece of diagnostic reasoning '
                 'supports. You cannot see the image; judge only from the reasoning you are given.')

_QUESTION_HEADER = '### Question\n'
_REASONING_HEADER = '\n\n### Reasoning\n'
_INSTRUCTION_HEADER = '\n\n### Instruction\n'

# Chat-template control tokens the policy could emit in its thought to close the user turn and write the
# judge's verdict itself (a reward hack); they are removed from anything placed inside the prompt.
_CONTROL_TOKENS = re.compile(r'<\|[^|<>\s]{1,40}\|>')
_OPTION_LINE = re.compile(r'^[ \t]*\(?([A-Z])[.):][ \t]+(\S.*?)[ \t]*$', re.MULTILINE)


def _letters_text(letters: Sequence[str]) -> str:
  return ', '.join(letters[:-1]) + ' or ' + letters[-1] if len(letters) > 1 else letters[0]


def sanitize(text: str) -> str:
  """``text`` without chat control tokens (``<|im_end|>`` …), stripped."""
  return _CONTROL_TOKENS.sub(' ', text).strip()


def build_judge_user_message(question: str, thought: str, letters: Sequence[str] = ('A', 'B', 'C', 'D')) -> str:
  """The user turn: the question with options, the reasoning, and the instruction to reply with one letter."""
  return (f'{_QUESTION_HEADER}{sanitize(question)}{_REASONING_HEADER}{sanitize(thought)}{_INSTRUCTION_HEADER}'
          'Based only on the reasoning above, which option does it conclude? '
          f'Reply with a single letter: {_letters_text(letters)}.')


def build_judge_messages(question: str, thought: str,
                         letters: Sequence[str] = ('A', 'B', 'C', 'D')) -> list[dict[str, str]]:
  """``[system, user]`` messages for an OpenAI-compatible chat endpoint."""
  return [{'role': 'system', 'content': SYSTEM_PROMPT},
          {'role': 'user', 'content': build_judge_user_message(question, thought, letters)}]


def render_chatml(messages: Sequence[dict[str, str]]) -> str:
  """Qwen's ChatML with the generation prompt (``<|im_start|>assistant\\n``) appended."""
  parts = [f'<|im_start|>{m["role"]}\n{m["content"]}<|im_end|>\n' for m in messages]
  return ''.join(parts) + '<|im_start|>assistant\n'


def build_judge_prompt(question: str, thought: str, letters: Sequence[str] = ('A', 'B', 'C', 'D'),
                       template: str = 'chatml') -> str:
  """The full judge prompt as one string; the verdict letter is the next token.

  ``template='chatml'`` (Qwen2 / Qwen2.5 / Qwen2.5-VL instruct models) or ``'plain'`` (system and user text
  followed by ``Answer:`` -- for base models without a chat template).
  """
  messages = build_judge_messages(question, thought, letters)
  if template == 'chatml':
    return render_chatml(messages)
  if template == 'plain':
    return f'{messages[0]["content"]}\n\n{messages[1]["content"]}\nAnswer:'
  raise ValueError(f"judge prompt template: expected 'chatml' or 'plain', got {template!r}")


def split_judge_prompt(prompt: str) -> tuple[str, str] | None:
  """Inverse of the builders: ``(question, thought)`` from a rendered prompt or user message, else None.

  Used by the fake SGLang server to play an extractive judge, and by tests to check what a prompt contains.
  """
  q0 = prompt.find(_QUESTION_HEADER)
  r0 = prompt.find(_REASONING_HEADER, q0 + 1)
  i0 = prompt.rfind(_INSTRUCTION_HEADER)
  if q0 < 0 or r0 < 0 or i0 < r0:
    return None
  return prompt[q0 + len(_QUESTION_HEADER):r0], prompt[r0 + len(_REASONING_HEADER):i0]


def parse_options(question: str) -> list[str] | None:
  """Option texts from a formatted question's ``A. …`` lines (also ``A) …``, ``(A) …``), in letter order.

  Returns None unless the lines found are exactly ``A``, ``B``, ``C``, … in order (at least two).
  """
  found = _OPTION_LINE.findall(question)
  # Keep the last run that starts at A: a question stem could itself contain a line like "B. something".
  start = max((i for i, (letter, _) in enumerate(found) if letter == 'A'), default=None)
  if start is None:
    return None
  run = found[start:]
  letters = [letter for letter, _ in run]
  if len(run) < 2 or letters != [chr(ord('A') + i) for i in range(len(run))]:
    return None
  return [text for _, text in run]


def letter_regex(letters: Sequence[str]) -> str:
  """The constraint for a one-letter verdict: ``[A-D]`` for contiguous letters, else an alternation."""
  codes = [ord(c) for c in letters]
  if all(len(c) == 1 for c in letters) and codes == list(range(codes[0], codes[0] + len(codes))):
    return f'[{letters[0]}-{letters[-1]}]' if len(letters) > 1 else f'[{letters[0]}]'
  return '(' + '|'.join(re.escape(c) for c in letters) + ')'
