"""The offline Qwen2 tokenizer against the rank file and tiktoken, and the small trainable tokenizer."""

import base64
import logging
import random
import unicodedata

import pytest
import regex

from medad_jax import tokenizer as T
from medad_jax.model.config import Qwen25VLConfig

# Public Qwen2.5-VL tokenizer_config.json: added tokens in id order from 151643, with their `special` flag.
PUBLIC_ADDED_TOKENS = {
    151643: ('<|endoftext|>', True), 151644: ('<|im_start|>', True), 151645: ('<|im_end|>', True),
    151646: ('<|object_ref_start|>', True), 151647: ('<|object_ref_end|>', True), 151648: ('<|box_start|>', True),
    151649: ('<|box_end|>', True), 151650: ('<|quad_start|>', True), 151651: ('<|quad_end|>', True),
    151652: ('<|vision_start|>', True), 151653: ('<|vision_end|>', True), 151654: ('<|vision_pad|>', True),
    151655: ('<|image_pad|>', True), 151656: ('<|video_pad|>', True), 151657: ('<tool_call>', False),
    151658: ('</tool_call>', False), 151659: ('<|fim_prefix|>', False), 151660: ('<|fim_middle|>', False),
    151661: ('<|fim_suffix|>', False), 151662: ('<|fim_pad|>', False), 151663: ('<|repo_name|>', False),
    151664: ('<|file_sep|>', False),
}

TRICKY_TEXTS = [
    'Hello world!',
    '你好，世界！这是一个医学影像的异常检测任务。',
    'emoji 😀🎉 family 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽',
    'def f(x):\n\treturn {"k": x ** 2}  # square\n\n\n',
    '    leading and trailing spaces    ',
    'tabs\t\tand\r\nCRLF\r\n\r\n  mixed \n \n',
    "I'm sure they'll say WE'VE done it; it's John's.",
    'ΑΒΓ абв אבג العربية हिन्दी 한국어 日本語のテキスト',
    '1234567890 3.14159 -2e-10 0x1F',
    '<think>The opacity is in the left lower lobe.</think><answer>pneumonia</answer>',
    'Precomposed é vs decomposed e\u0301; Å vs A\u030a',
    '\u00a0non-breaking\u2003em-space\u200bzero-width',
]


@pytest.fixture(scope='module')
def ranks():
  return T.load_tiktoken_ranks(T.qwen_tiktoken_path())


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tok_cache'))


@pytest.fixture(scope='module')
def qwen_tok(cache_dir):
  return T.qwen2_tokenizer(cache_dir=cache_dir)


@pytest.fixture(scope='module')
def tiktoken_enc(ranks):
  import tiktoken  # pinned in requirements.txt: an independent (Rust) implementation of rank-based BPE
  return tiktoken.Encoding('qwen_ref', pat_str=T.QWEN2_PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={})


# ------------------------------------------------------------------------------------------ rank file and merges


def test_rank_file_is_byte_level_bpe(ranks):
  assert len(ranks) == T.QWEN2_NUM_BPE_TOKENS
  assert sorted(ranks[bytes([b])] for b in range(256)) == list(range(256))


def test_merges_rebuild_every_token_in_rank_order(ranks):
  merges = T.bpe_merges_from_ranks(ranks)
  by_rank = sorted((r, t) for t, r in ranks.items() if len(t) > 1)
  assert len(merges) == len(ranks) - 256
  assert [a + b for a, b in merges] == [t for _, t in by_rank]
  # Both halves exist before the merge that joins them.
  assert all(ranks[a] < r and ranks[b] < r for (a, b), (r, _) in zip(merges, by_rank))


def test_pretokenize_regex_is_transformers_qwen2():
  from transformers.models.qwen2 import tokenization_qwen2
  assert T.QWEN2_PRETOKENIZE_REGEX == tokenization_qwen2.PRETOKENIZE_REGEX


def test_bad_rank_files_name_file_and_line(tmp_path):
  good = '\n'.join(f'{base64.b64encode(bytes([b])).decode()} {b}' for b in range(256))
  cases = {
      'fields.tiktoken': (good + '\nYWI=\n', r'fields.tiktoken:257: expected'),
      'b64.tiktoken': (good + '\n@@@ 256\n', r'b64.tiktoken:257: bad token'),
      'gap.tiktoken': (good + '\nYWI= 300\n', r'not exactly 0..256'),
      'dup.tiktoken': (good + '\nIQ== 256\n', r'dup.tiktoken:257: token .* repeated'),
      'bytes.tiktoken': ('YWI= 0\n', r'single bytes are not tokens'),
  }
  for name, (text, msg) in cases.items():
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ValueError, match=msg):
      T.load_tiktoken_ranks(str(p))


# ------------------------------------------------------------------------------------------ the Qwen2 tokenizer


def test_special_tokens_have_public_ids_and_flags(qwen_tok):
  assert len(qwen_tok) == 151665
  for i, (content, special) in PUBLIC_ADDED_TOKENS.items():
    assert qwen_tok.convert_tokens_to_ids(content) == i
    assert qwen_tok.convert_ids_to_tokens(i) == content
    assert qwen_tok.encode(f'a{content}b', add_special_tokens=False)[1] == i  # matched inside text
    assert (content in qwen_tok.all_special_tokens) == special
  assert qwen_tok.eos_token == '<|im_end|>' and qwen_tok.eos_token_id == 151645
  assert qwen_tok.pad_token == '<|endoftext|>' and qwen_tok.pad_token_id == 151643
  assert qwen_tok.bos_token is None and qwen_tok.unk_token is None
  ids = qwen_tok.encode('<|im_start|>x<tool_call>y<|im_end|>', add_special_tokens=False)
  assert qwen_tok.decode(ids, skip_special_tokens=True) == 'x<tool_call>y'


def test_config_ids_match_model_preset(qwen_tok):
  ids = T.token_ids_for_config(qwen_tok)
  cfg = Qwen25VLConfig.qwen2_5_vl_3b()
  for k in ('image_token_id', 'video_token_id', 'vision_start_token_id', 'vision_end_token_id', 'eos_token_ids',
            'pad_token_id'):
    assert ids[k] == getattr(cfg, k), k
  assert ids['vocab_size'] == 151665 <= cfg.text.vocab_size


def test_single_tokens_of_the_rank_file_encode_to_their_rank(qwen_tok, ranks):
  """Every token that is one whole pre-tokenisation piece encodes to exactly its own rank, and decodes back."""
  pat = regex.compile(T.QWEN2_PRETOKENIZE_REGEX)
  pieces, want = [], []
  for token, rank in ranks.items():
    try:
      s = token.decode('utf-8')
    except UnicodeDecodeError:
      continue
    if unicodedata.normalize('NFC', s) == s and pat.findall(s) == [s]:
      pieces.append(s)
      want.append([rank])
  assert len(pieces) > 140_000
  got = [e.ids for e in qwen_tok.backend_tokenizer.encode_batch(pieces, add_special_tokens=False)]
  wrong = [(p, w, g) for p, w, g in zip(pieces, want, got) if w != g]
  assert not wrong, wrong[:5]
  assert [qwen_tok.decode(w) for w in want[::997]] == pieces[::997]


def test_matches_tiktoken_reference(qwen_tok, tiktoken_enc, ranks):
  """Same ids as tiktoken's Rust BPE on the same ranks and regex (after Qwen's NFC normalisation)."""
  rng = random.Random(0)
  tokens = sorted(ranks, key=ranks.get)
  texts = list(TRICKY_TEXTS)
  for _ in range(400):  # random runs of vocabulary entries stress merge order across token boundaries
    texts.append(b''.join(rng.choice(tokens) for _ in range(rng.randint(1, 16))).decode('utf-8', errors='replace'))
  for _ in range(100):
    texts.append(''.join(chr(rng.choice([rng.randint(32, 0x2FF), rng.randint(0x4E00, 0x9FFF), 0x20, 0x0A,
                                         rng.randint(0x1F300, 0x1F64F)])) for _ in range(rng.randint(1, 40))))
  mismatches = [s for s in texts if qwen_tok.encode(s, add_special_tokens=False) !=
                tiktoken_enc.encode_ordinary(unicodedata.normalize('NFC', s))]
  assert not mismatches, mismatches[:3]


@pytest.mark.parametrize('text', TRICKY_TEXTS)
def test_round_trip(qwen_tok, text):
  ids = qwen_tok.encode(text, add_special_tokens=False)
  assert qwen_tok.decode(ids) == unicodedata.normalize('NFC', text)
  assert all(0 <= i < 151665 for i in ids)


def test_chat_template(qwen_tok):
  assert qwen_tok.chat_template == T.QWEN2_VL_CHAT_TEMPLATE
  msgs = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Any anomaly?'}]},
          {'role': 'assistant', 'content': 'No.'}]
  text = qwen_tok.apply_chat_template(msgs, tokenize=False)
  assert text == ('<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n'
                  '<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Any anomaly?<|im_end|>\n'
                  '<|im_start|>assistant\nNo.<|im_end|>\n')
  gen = qwen_tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
  assert gen.endswith('Any anomaly?<|im_end|>\n<|im_start|>assistant\n')


def test_cache_is_reused_and_a_broken_entry_rebuilt(qwen_tok, cache_dir, monkeypatch, caplog):
  import os
  [entry] = [d for d in os.listdir(cache_dir) if d.startswith('qwen2_tokenizer-')]
  path = os.path.join(cache_dir, entry, 'tokenizer.json')
  assert os.path.getsize(path) > 1_000_000

  real_build = T._build_qwen2_tokenizer

  def no_build(_):
    raise AssertionError('rebuilt although the cache entry is valid')

  monkeypatch.setattr(T, '_build_qwen2_tokenizer', no_build)
  again = T.qwen2_tokenizer(cache_dir=cache_dir)
  text = TRICKY_TEXTS[2] + TRICKY_TEXTS[1]
  assert again.encode(text) == qwen_tok.encode(text)

  with open(path, 'w') as f:
    f.write('{"truncated": ')
  monkeypatch.setattr(T, '_build_qwen2_tokenizer', real_build)
  with caplog.at_level(logging.WARNING, logger='medad_jax.tokenizer'):
    rebuilt = T.qwen2_tokenizer(cache_dir=cache_dir)
  assert 'rebuilding' in caplog.text
  assert rebuilt.encode(text) == qwen_tok.encode(text)
  assert os.path.getsize(path) > 1_000_000


# ------------------------------------------------------------------------------------------ small tokenizer

SMALL_CORPUS = [
    f'<think>Case {i}: the {side} lung shows a {size} opacity near rib {i % 12}.</think>'
    f'<answer>{label}</answer>'
    for i, (side, size, label) in enumerate(
        [('left', 'small', 'pneumonia'), ('right', 'large', 'effusion'), ('left', 'diffuse', 'normal')] * 60)
] + ['Is there an abnormality in this chest X-ray? Answer with the finding.'] * 20


@pytest.fixture(scope='module')
def small_tok():
  return T.train_small_tokenizer(SMALL_CORPUS, vocab_size=400)


def test_small_tokenizer_keeps_control_and_tag_tokens_whole(small_tok):
  n = len(small_tok)
  added = T.SMALL_SPECIAL_TOKENS + T.SMALL_TAG_TOKENS
  assert [small_tok.convert_tokens_to_ids(t) for t in added] == list(range(n - len(added), n))
  text = '<|im_start|>assistant\n<think>the lung</think><answer>normal</answer><|im_end|><|endoftext|>'
  pieces = small_tok.tokenize(text)
  for t in ('<|im_start|>', '<think>', '</think>', '<answer>', '</answer>', '<|im_end|>', '<|endoftext|>'):
    assert t in pieces, (t, pieces)
  img = small_tok.encode('<|vision_start|><|image_pad|><|image_pad|><|vision_end|>', add_special_tokens=False)
  ids = T.token_ids_for_config(small_tok)
  assert img == [ids['vision_start_token_id'], ids['image_token_id'], ids['image_token_id'],
                 ids['vision_end_token_id']]
  # Tags survive skip_special_tokens (the format reward reads them); control tokens do not.
  assert small_tok.decode(small_tok.encode(text), skip_special_tokens=True) == (
      'assistant\n<think>the lung</think><answer>normal</answer>')


def test_small_tokenizer_size_round_trip_and_determinism(small_tok):
  assert len(small_tok) <= 400
  # No learned token spells a tag: the tags were removed from the training text.
  assert not any('think' in t or 'answer' in t for t in small_tok.get_vocab()
                 if small_tok.convert_tokens_to_ids(t) < len(small_tok) - 11)
  for s in SMALL_CORPUS[:5] + TRICKY_TEXTS:
    assert small_tok.decode(small_tok.encode(s)) == unicodedata.normalize('NFC', s)
  assert small_tok.tokenize(SMALL_CORPUS[3]) == T.train_small_tokenizer(SMALL_CORPUS, 400).tokenize(SMALL_CORPUS[3])
  # A learned vocabulary compresses the corpus well below one token per byte.
  assert len(small_tok.encode(SMALL_CORPUS[7])) < 0.5 * len(SMALL_CORPUS[7].encode())


def test_small_tokenizer_learns_each_segment_as_it_is_encoded(small_tok):
  # An added token splits the text before BPE runs, so the word right after one has no space before it; the
  # training text is cut there too, and 'effusion' (only ever after <answer>) is one learned token.
  assert small_tok.tokenize('<answer>effusion</answer>') == ['<answer>', 'effusion', '</answer>']
  assert small_tok.tokenize('<think>Case 3')[:2] == ['<think>', 'Case']


def test_small_tokenizer_config_and_template(small_tok, qwen_tok):
  ids = T.token_ids_for_config(small_tok, vocab_multiple=64)
  assert ids['vocab_size'] % 64 == 0 and len(small_tok) <= ids['vocab_size'] < len(small_tok) + 64
  cfg = T.config_for_tokenizer(Qwen25VLConfig.tiny(), small_tok, vocab_multiple=64)
  assert cfg.text.vocab_size == ids['vocab_size']
  assert cfg.image_token_id == small_tok.convert_tokens_to_ids('<|image_pad|>')
  assert cfg.eos_token_ids == (small_tok.convert_tokens_to_ids('<|im_end|>'),
                               small_tok.convert_tokens_to_ids('<|endoftext|>'))
  assert cfg.pad_token_id == small_tok.pad_token_id
  assert max(cfg.eos_token_ids + (cfg.video_token_id, cfg.vision_start_token_id)) < cfg.text.vocab_size
  msgs = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'q'}]}]
  assert (small_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) ==
          qwen_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))


def test_small_tokenizer_bad_input():
  with pytest.raises(ValueError, match='vocab_size=200 is too small: need at least 268'):
    T.train_small_tokenizer(SMALL_CORPUS, 200)
  with pytest.raises(TypeError, match='single str'):
    T.train_small_tokenizer('just one string', 400)
  with pytest.raises(TypeError, match=r'texts\[1\] is int'):
    T.train_small_tokenizer(['a', 3], 400)
  with pytest.raises(ValueError, match='nothing to learn'):
    T.train_small_tokenizer(['  ', '<think></think>'], 400)


def test_config_ids_need_the_control_tokens():
  from tokenizers import Tokenizer, models
  from transformers import PreTrainedTokenizerFast
  bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={'a': 0}, merges=[])))
  with pytest.raises(KeyError, match=r"no token '<\|image_pad\|>'"):
    T.token_ids_for_config(bare)


def test_the_miniature_tokenizer_learns_the_conversation_the_model_reads():
  """``pipeline.corpus_texts`` renders each training record through the chat template, so the template's words
  (system turn, roles) and each answer right after ``<answer>`` are learned whole, not left to single bytes."""
  from medad_jax.data import synth
  from medad_jax.data.schema import format_question, format_target
  from medad_jax.processor import render_prompt, render_target
  from medad_jax.train.pipeline import corpus_texts
  records = [r for _, rs in synth.generate(synth.SynthConfig(num_images=30, seed=0, image_size=56)) for r in rs]
  tok = T.train_small_tokenizer(corpus_texts(records, 'option'), 2048)
  r = records[0]
  prompt = tok.tokenize(render_prompt(format_question(r)))
  assert prompt[:3] == ['<|im_start|>', 'system', 'Ċ'] and prompt[-3:] == ['<|im_start|>', 'assistant', 'Ċ']
  assert ['You', 'Ġare', 'Ġa', 'Ġhelpful', 'Ġassistant', '.'] == prompt[3:9]
  target = tok.tokenize(render_target(format_target(r, 'option')))
  answer = target[target.index('<answer>') + 1:target.index('</answer>')]
  assert tok.convert_tokens_to_string(answer) == r.answer_text and len(answer) <= 2, answer
