"""Tokenizers for the policy: the real Qwen2 / Qwen2.5-VL tokenizer rebuilt offline, and a small trainable one.

``qwen2_tokenizer()``
  The byte-level BPE of Qwen2 / Qwen2.5-VL (151,643 BPE tokens + 22 added tokens, ids 151643..151664), rebuilt
  without a model hub from the ``qwen.tiktoken`` rank file that ships inside the PyPI package ``dashscope``.
  The BPE merges are recovered from the ranks in the standard tiktoken -> Hugging Face way: the merge that creates
  the token of rank ``r`` is the last step of byte-pair-encoding that token's bytes using only ranks below ``r``
  (exactly two parts remain). This reproduces the public ``merges.txt`` of Qwen2 (151,387 merges, same order).
  The pipeline (NFC normaliser, the Qwen2 split regex, byte-level pre-tokeniser/decoder) is transformers' own
  ``Qwen2Tokenizer``; the special tokens, their ids and flags follow the public Qwen2.5-VL ``tokenizer_config.json``.
  The result is cached as ``tokenizer.json`` under ``~/.cache/medad_jax/`` (or ``$MEDAD_JAX_CACHE``).

``train_small_tokenizer(texts, vocab_size)``
  The same pipeline and the same special-token strings, with a vocabulary learned from ``texts`` (the synthetic
  benchmark for the CPU run); ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` are single tokens.

``token_ids_for_config(tok)`` / ``config_for_tokenizer(cfg, tok)``
  The token ids a :class:`~medad_jax.model.config.Qwen25VLConfig` needs, read from a tokenizer.

transformers is imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

# The Qwen2 pre-tokenisation regex (identical in dashscope's tiktoken tokenizer and transformers' Qwen2Tokenizer).
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# The 22 added tokens of Qwen2.5 / Qwen2.5-VL in id order from 151643, with their ``special`` flag
# (``special`` tokens are dropped by ``decode(skip_special_tokens=True)``; the tool / FIM tokens are not special).
QWEN2_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ('<|endoftext|>', True), ('<|im_start|>', True), ('<|im_end|>', True),
    ('<|object_ref_start|>', True), ('<|object_ref_end|>', True), ('<|box_start|>', True), ('<|box_end|>', True),
    ('<|quad_start|>', True), ('<|quad_end|>', True), ('<|vision_start|>', True), ('<|vision_end|>', True),
    ('<|vision_pad|>', True), ('<|image_pad|>', True), ('<|video_pad|>', True),
    ('<tool_call>', False), ('</tool_call>', False), ('<|fim_prefix|>', False), ('<|fim_middle|>', False),
    ('<|fim_suffix|>', False), ('<|fim_pad|>', False), ('<|repo_name|>', False), ('<|file_sep|>', False),
)
QWEN2_NUM_BPE_TOKENS = 151643
QWEN2_EOS_TOKEN = '<|im_end|>'
QWEN2_PAD_TOKEN = '<|endoftext|>'
QWEN2_MODEL_MAX_LENGTH = 131072

# The Qwen2-VL / Qwen2.5-VL chat template (``chat_template.json`` of the public checkpoints).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

# Added tokens of the small tokenizer: Qwen's strings for the control tokens, plus the reasoning-format tags kept
# whole (not ``special``, so ``decode(skip_special_tokens=True)`` keeps them for the format reward).
SMALL_SPECIAL_TOKENS: tuple[str, ...] = ('<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|vision_start|>',
                                         '<|vision_end|>', '<|image_pad|>', '<|video_pad|>')
SMALL_TAG_TOKENS: tuple[str, ...] = ('<think>', '</think>', '<answer>', '</answer>')

_TIKTOKEN_RESOURCE = 'dashscope/resources/qwen.tiktoken'
# Bump when the way the cached tokenizer is built changes, so stale caches are rebuilt.
_BUILD_VERSION = 1


# ---------------------------------------------------------------------------------------------- tiktoken ranks


def qwen_tiktoken_path() -> str:
  """Path of ``qwen.tiktoken`` inside the installed ``dashscope`` distribution (found without importing it)."""
  try:
    dist = importlib.metadata.distribution('dashscope')
  except importlib.metadata.PackageNotFoundError as e:
    raise FileNotFoundError(
        'the Qwen BPE ranks come from the PyPI package dashscope (pinned in requirements.txt): '
        '`pip install dashscope==2.0.2`') from e
  path = str(dist.locate_file(_TIKTOKEN_RESOURCE))
  if not os.path.isfile(path):
    raise FileNotFoundError(f'dashscope {dist.version} is installed but has no {_TIKTOKEN_RESOURCE} (looked at '
                            f'{path!r}); expected dashscope==2.0.2')
  return path


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
  """Reads a tiktoken BPE file (``<base64 token> <rank>`` per line) into ``{token bytes: rank}``.

  Ranks must be exactly ``0..N-1`` and every single byte must be a token (byte-level BPE); anything else raises
  naming the file and line.
  """
  ranks: dict[bytes, int] = {}
  with open(path, 'rb') as f:
    for lineno, line in enumerate(f, start=1):
      line = line.strip()
      if not line:
        continue
      fields = line.split()
      if len(fields) != 2:
        raise ValueError(f'{path}:{lineno}: expected "<base64 token> <rank>", got {line[:80]!r}')
      try:
        token = base64.b64decode(fields[0], validate=True)
        rank = int(fields[1])
      except (binascii.Error, ValueError) as e:
        raise ValueError(f'{path}:{lineno}: bad token or rank in {line[:80]!r} ({e})') from e
      if not token:
        raise ValueError(f'{path}:{lineno}: empty token')
      if token in ranks:
        raise ValueError(f'{path}:{lineno}: token {token!r} repeated (ranks {ranks[token]} and {rank})')
      ranks[token] = rank
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise ValueError(f'{path}: ranks are not exactly 0..{len(ranks) - 1} (duplicates or gaps)')
  missing = [b for b in range(256) if bytes([b]) not in ranks]
  if missing:
    raise ValueError(f'{path}: not a byte-level BPE, {len(missing)} single bytes are not tokens (e.g. {missing[:4]})')
  return ranks


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
  """Byte-pair-encodes ``token`` merging only pairs whose merged rank is below ``max_rank``."""
  parts = [bytes([b]) for b in token]
  while len(parts) > 1:
    best_i, best_rank = -1, max_rank
    for i in range(len(parts) - 1):
      r = ranks.get(parts[i] + parts[i + 1])
      if r is not None and r < best_rank:
        best_i, best_rank = i, r
    if best_i < 0:
      break
    parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
  return parts


def bpe_merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
  """The merge list (in priority order) that makes Hugging Face BPE reproduce tiktoken ranks.

  One merge per multi-byte token: the two parts left when the token is encoded with all lower-ranked merges.
  """
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    if len(token) == 1:
      continue
    parts = _bpe_parts(ranks, token, rank)
    if len(parts) != 2:
      raise ValueError(f'token of rank {rank} ({token!r}) is not the merge of two lower-ranked tokens: '
                       f'{len(parts)} parts {parts[:4]!r}')
    merges.append((parts[0], parts[1]))
  return merges


def _byte_level_str(b: bytes, table: dict[int, str]) -> str:
  return ''.join(table[x] for x in b)


# ---------------------------------------------------------------------------------------------- Qwen2 tokenizer


def _cache_root(cache_dir: str | None) -> str:
  if cache_dir is not None:
    return cache_dir
  return os.environ.get('MEDAD_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'medad_jax')


def _file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  h.update(f'build-{_BUILD_VERSION}'.encode())
  return h.hexdigest()[:16]


def _build_qwen2_tokenizer(tiktoken_path: str):
  from tokenizers import AddedToken
  from transformers import Qwen2Tokenizer
  from transformers.convert_slow_tokenizer import bytes_to_unicode

  ranks = load_tiktoken_ranks(tiktoken_path)
  if len(ranks) != QWEN2_NUM_BPE_TOKENS:
    raise ValueError(f'{tiktoken_path}: {len(ranks)} BPE ranks, expected {QWEN2_NUM_BPE_TOKENS} for Qwen2')
  table = bytes_to_unicode()
  vocab = {_byte_level_str(tok, table): rank for tok, rank in ranks.items()}
  merges = [(_byte_level_str(a, table), _byte_level_str(b, table)) for a, b in bpe_merges_from_ranks(ranks)]
  added = {
      QWEN2_NUM_BPE_TOKENS + i: AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                                           single_word=False)
      for i, (content, special) in enumerate(QWEN2_SPECIAL_TOKENS)
  }
  extra = [c for c, special in QWEN2_SPECIAL_TOKENS if special and c != QWEN2_PAD_TOKEN]
  tok = Qwen2Tokenizer(
      vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=QWEN2_EOS_TOKEN,
      pad_token=QWEN2_PAD_TOKEN, added_tokens_decoder=added, extra_special_tokens=extra, errors='replace',
      clean_up_tokenization_spaces=False, split_special_tokens=False, model_max_length=QWEN2_MODEL_MAX_LENGTH)
  tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
  return tok


def _check_qwen2_tokenizer(tok, where: str) -> None:
  want = {content: QWEN2_NUM_BPE_TOKENS + i for i, (content, _) in enumerate(QWEN2_SPECIAL_TOKENS)}
  got = {content: tok.convert_tokens_to_ids(content) for content in want}
  if got != want or len(tok) != QWEN2_NUM_BPE_TOKENS + len(QWEN2_SPECIAL_TOKENS):
    bad = {k: v for k, v in got.items() if want[k] != v}
    raise ValueError(f'{where}: not the Qwen2 tokenizer: {len(tok)} tokens, wrong special ids {bad}')


def qwen2_tokenizer(cache_dir: str | None = None, rebuild: bool = False):
  """The Qwen2 / Qwen2.5-VL tokenizer (a transformers ``Qwen2Tokenizer``), built offline and cached.

  Args:
    cache_dir: where ``qwen2_tokenizer-<hash>/tokenizer.json`` is kept; default ``$MEDAD_JAX_CACHE`` or
      ``~/.cache/medad_jax``. The hash covers the rank file and the build recipe.
    rebuild: ignore an existing cache entry and build again.

  Returns a fresh tokenizer object on every call (callers may change e.g. ``padding_side``).
  """
  from transformers import Qwen2Tokenizer

  src = qwen_tiktoken_path()
  target = os.path.join(_cache_root(cache_dir), f'qwen2_tokenizer-{_file_digest(src)}')
  if os.path.isfile(os.path.join(target, 'tokenizer.json')) and not rebuild:
    try:
      tok = Qwen2Tokenizer.from_pretrained(target)
      _check_qwen2_tokenizer(tok, target)
      if tok.chat_template != QWEN2_VL_CHAT_TEMPLATE:
        raise ValueError(f'{target}: chat template differs from the Qwen2-VL one')
      return tok
    except Exception as e:  # a truncated / foreign cache entry is rebuilt rather than trusted
      log.warning('cached Qwen2 tokenizer at %s is unusable (%s); rebuilding', target, e)

  log.info('building the Qwen2 tokenizer from %s', src)
  tok = _build_qwen2_tokenizer(src)
  _check_qwen2_tokenizer(tok, src)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  # Write to a private directory and rename, so a concurrent reader never sees a half-written entry.
  tmp = tempfile.mkdtemp(prefix='.qwen2_tokenizer-', dir=os.path.dirname(target))
  try:
    tok.save_pretrained(tmp)
    if os.path.isdir(target):
      shutil.rmtree(target, ignore_errors=True)
    try:
      os.rename(tmp, target)
    except OSError:  # another process won the race; its entry is equivalent
      pass
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return tok


# ---------------------------------------------------------------------------------------------- small tokenizer


def train_small_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
  """Learns a small byte-level BPE with Qwen2's pipeline and special-token strings.

  The added tokens (:data:`SMALL_SPECIAL_TOKENS` then :data:`SMALL_TAG_TOKENS`) take the last ids, after the
  learned vocabulary, as in Qwen. Their strings cut the training text into the segments an encoding sees (an added
  token splits the text before BPE runs), so no merge spells them and each segment -- e.g. ``assistant`` right after
  ``<|im_start|>``, ``Chest`` right after ``<answer>`` -- is learned as it is encoded, without a space before it.

  Args:
    texts: training strings (e.g. every conversation of the synthetic benchmark's training split as the chat
      template renders it).
    vocab_size: total size including the 256 byte tokens and the 11 added tokens; the result may be smaller when
      the corpus runs out of pairs seen ``min_frequency`` times.

  Returns a transformers ``Qwen2Tokenizer`` with the Qwen2-VL chat template.
  """
  from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
  from transformers import Qwen2Tokenizer

  added = SMALL_SPECIAL_TOKENS + SMALL_TAG_TOKENS
  n_learned = vocab_size - len(added)
  if n_learned < 257:
    raise ValueError(f'vocab_size={vocab_size} is too small: need at least {257 + len(added)} '
                     f'(256 byte tokens, one merge, {len(added)} added tokens)')
  if isinstance(texts, str):
    raise TypeError('texts must be an iterable of strings, got a single str')
  strip = re.compile('|'.join(re.escape(t) for t in added))
  corpus = []
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f'texts[{i}] is {type(t).__name__}, expected str')
    corpus.extend(seg for seg in strip.split(t) if seg)
  if not any(s.strip() for s in corpus):
    raise ValueError('texts is empty (or only whitespace / special tokens): nothing to learn a vocabulary from')

  bpe = Tokenizer(models.BPE())
  bpe.normalizer = normalizers.NFC()
  bpe.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior='isolated', invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  trainer = trainers.BpeTrainer(vocab_size=n_learned, min_frequency=min_frequency, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
  bpe.train_from_iterator(corpus, trainer=trainer, length=len(corpus))

  model = json.loads(bpe.to_str())['model']
  vocab = model['vocab']
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(' ')) for m in model['merges']]
  n = len(vocab)
  decoder = {n + i: AddedToken(t, special=t in SMALL_SPECIAL_TOKENS, normalized=False) for i, t in enumerate(added)}
  tok = Qwen2Tokenizer(
      vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=QWEN2_EOS_TOKEN,
      pad_token=QWEN2_PAD_TOKEN, added_tokens_decoder=decoder,
      extra_special_tokens=[t for t in SMALL_SPECIAL_TOKENS if t != QWEN2_PAD_TOKEN], errors='replace',
      clean_up_tokenization_spaces=False, split_special_tokens=False, model_max_length=QWEN2_MODEL_MAX_LENGTH)
  tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
  ids = [tok.convert_tokens_to_ids(t) for t in added]
  if ids != list(range(n, n + len(added))):
    raise RuntimeError(f'added tokens got ids {ids}, expected {n}..{n + len(added) - 1}')
  return tok


# ---------------------------------------------------------------------------------------------- config ids


def _required_id(tok, token: str) -> int:
  i = tok.convert_tokens_to_ids(token)
  if i is None or tok.convert_ids_to_tokens(i) != token:
    raise KeyError(f'tokenizer has no token {token!r} (needed by the Qwen2.5-VL model config)')
  return int(i)


def token_ids_for_config(tok, vocab_multiple: int = 1) -> dict[str, Any]:
  """``image_token_id, video_token_id, vision_start_token_id, vision_end_token_id, eos_token_ids, pad_token_id,
  vocab_size`` of ``tok``; ``vocab_size`` is ``len(tok)`` rounded up to ``vocab_multiple``."""
  if vocab_multiple < 1:
    raise ValueError(f'vocab_multiple must be >= 1, got {vocab_multiple}')
  n = len(tok)
  return {
      'image_token_id': _required_id(tok, '<|image_pad|>'),
      'video_token_id': _required_id(tok, '<|video_pad|>'),
      'vision_start_token_id': _required_id(tok, '<|vision_start|>'),
      'vision_end_token_id': _required_id(tok, '<|vision_end|>'),
      'eos_token_ids': (_required_id(tok, '<|im_end|>'), _required_id(tok, '<|endoftext|>')),
      'pad_token_id': _required_id(tok, '<|endoftext|>'),
      'vocab_size': -(-n // vocab_multiple) * vocab_multiple,
  }


def config_for_tokenizer(cfg, tok, vocab_multiple: int = 1):
  """``cfg`` (a ``Qwen25VLConfig``) with the token ids and text vocabulary size of ``tok``."""
  ids = token_ids_for_config(tok, vocab_multiple)
  vocab_size = ids.pop('vocab_size')
  return cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=vocab_size), **ids)
