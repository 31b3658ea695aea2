"""Stop *strings* on device: a character-level string matcher (KMP automaton) lifted to whole tokens.

A stop string such as ``</answer>`` is several tokens under a BPE, and which tokens depends on the neighbours
(Qwen2: ``</ answer >`` alone, ``.</ answer >`` after a full stop) and on the policy (it may sample any split,
``</ ans wer >``). Comparing token ids therefore misses stops. Matching the *text* needs no detokeniser on device:

* on the host, for every automaton state ``q`` (how many characters of the string are matched so far) and every
  token ``t``, feed ``t``'s text character by character through the Knuth-Morris-Pratt automaton of the string:
  ``table[q, t]`` is the state after the token, and the accepting state ``A - 1`` once the string has been
  completed anywhere inside it (absorbing);
* on device, each decode step is one gather per stop string: ``state = table[state, token]``.

The result is exact for any tokenisation of the completion, at the cost of a ``[Q, A, V]`` int32 table
(``A`` = longest string + 1; 6 MB for ``</answer>`` over Qwen's 151,936 tokens), which is a regular array argument
of the decode loop: changing the stop strings does not recompile. Token texts come from decoding each id alone;
a token holding part of a multi-byte UTF-8 character decodes to U+FFFD, so stop strings should be whole
characters (ASCII tags like ``</answer>`` always are).

Axis letters: see ``ops.py`` (Q stop strings, A automaton states).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _failure(text: str) -> list[int]:
  """KMP failure function: ``f[i]`` = length of the longest proper border of ``text[:i + 1]``."""
  f = [0] * len(text)
  k = 0
  for i in range(1, len(text)):
    while k and text[i] != text[k]:
      k = f[k - 1]
    if text[i] == text[k]:
      k += 1
    f[i] = k
  return f


def char_automaton(text: str) -> tuple[np.ndarray, dict[str, int]]:
  """The KMP automaton of ``text`` as a dense table: ``(delta[m + 1, A + 1], symbol of each character)``.

  Symbol 0 stands for every character not in ``text`` (from any state it leads to 0); state ``m`` is absorbing.
  """
  m = len(text)
  symbols = {c: i + 1 for i, c in enumerate(sorted(set(text)))}
  f = _failure(text)
  delta = np.zeros((m + 1, len(symbols) + 1), np.int32)
  delta[m] = m
  for q0 in range(m):
    for c, a in symbols.items():
      q = q0
      while q and c != text[q]:
        q = f[q - 1]
      delta[q0, a] = q + 1 if c == text[q] else q
  return delta, symbols


def string_automaton(token_texts: Sequence[str], text: str, num_states: int | None = None) -> np.ndarray:
  """``[A, V]`` int32 token-level transitions of the matcher for ``text``; state ``A - 1`` = matched (absorbing).

  ``A`` defaults to ``len(text) + 1``; a larger ``num_states`` pads (the extra rows are never reached) so strings of
  different lengths share one table. Vectorised over the tokens that hold a character of ``text`` (the others
  send every state to 0), one character position at a time.
  """
  if not text:
    raise ValueError('stop string is empty')
  m = len(text)
  A = m + 1 if num_states is None else num_states
  if A < m + 1:
    raise ValueError(f'num_states={num_states} < len({text!r}) + 1')
  delta, symbols = char_automaton(text)
  V = len(token_texts)
  table = np.zeros((A, V), np.int32)
  table[m:] = A - 1  # matched: absorbing (and padding rows, never reached)
  chars = set(text)
  ids = [t for t, tok in enumerate(token_texts) if not chars.isdisjoint(tok)]
  if ids:
    longest = max(len(token_texts[t]) for t in ids)
    codes = np.zeros((len(ids), longest), np.int32)
    lengths = np.zeros((len(ids),), np.int32)
    for r, t in enumerate(ids):
      tok = token_texts[t]
      codes[r, :len(tok)] = [symbols.get(c, 0) for c in tok]
      lengths[r] = len(tok)
    state = np.broadcast_to(np.arange(m, dtype=np.int32), (len(ids), m)).copy()  # one column per start state
    for pos in range(longest):
      live = pos < lengths
      state[live] = delta[state[live], codes[live, pos][:, None]]
    table[:m, ids] = np.where(state == m, A - 1, state).T
  return table


def stop_string_table(token_texts: Sequence[str], strings: Sequence[str]) -> np.ndarray | None:
  """``[Q, A, V]`` int32 automata for ``strings`` (None when there are none); see the module docstring."""
  strings = list(strings)
  if not strings:
    return None
  A = max(len(s) for s in strings) + 1
  return np.stack([string_automaton(token_texts, s, A) for s in strings])


@functools.lru_cache(maxsize=4)
def _vocab_texts(tokenizer) -> tuple[str, ...]:
  return tuple(tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False))


def tokenizer_stop_table(tokenizer, strings: Sequence[str], vocab_size: int | None = None) -> np.ndarray | None:
  """:func:`stop_string_table` over a transformers tokenizer's vocabulary (each id decoded alone; cached).

  ``vocab_size`` (the model's, often padded past ``len(tokenizer)``): ids without a token get empty text.
  """
  texts = _vocab_texts(tokenizer)
  if vocab_size is not None:
    if vocab_size < len(texts):
      raise ValueError(f'vocab_size={vocab_size} is smaller than the tokenizer ({len(texts)} tokens)')
    texts = texts + ('',) * (vocab_size - len(texts))
  return stop_string_table(texts, strings)


def init_states(batch: int, table_QAV: jax.Array | None) -> jax.Array:
  """``[B, Q]`` int32 start states (0); ``Q`` = 0 without a table."""
  return jnp.zeros((batch, 0 if table_QAV is None else table_QAV.shape[0]), jnp.int32)


def advance(table_QAV: jax.Array | None, state_BQ: jax.Array, tokens_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One token per row through every automaton -> ``(new state_BQ, hit_B)`` (hit: some string completed)."""
  if table_QAV is None:
    return state_BQ, jnp.zeros(tokens_B.shape, bool)
  Q, A, _ = table_QAV.shape
  state_BQ = table_QAV[jnp.arange(Q)[None, :], state_BQ, tokens_B[:, None]]
  return state_BQ, jnp.any(state_BQ == A - 1, axis=-1)
