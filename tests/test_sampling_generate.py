"""``generate(policy, images, questions)`` with the real processor, a small trained tokenizer and a tiny random
model (texts decode the returned tokens; the result equals the token-level sampler), and stop strings: the
token-level automata against a plain-text reference, in context and for non-canonical splits, and on device."""

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from medad_jax import tokenizer as T
from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.qwen25vl import Qwen25VL
from medad_jax.processor import Qwen25VLProcessor
from medad_jax.sampling import SamplingConfig, generate, prepare_prompts, sample, stops

CORPUS = ['the left lung shows a nodule in the upper lobe.', 'no anomaly is visible; the heart size is normal.',
          '<think>the region looks normal</think><answer>normal</answer>', 'Is there an anomaly in this scan?',
          'Which region holds the lesion? Answer: the liver.', 'answer: right kidney (lower pole).']


@pytest.fixture(scope='module')
def small():
  tok = T.train_small_tokenizer(CORPUS * 20, vocab_size=400)
  cfg = T.config_for_tokenizer(Qwen25VLConfig.tiny(), tok, vocab_multiple=64)
  proc = Qwen25VLProcessor(tok, cfg.vision, min_pixels=56 * 56, max_pixels=112 * 112)
  return tok, cfg, proc, Qwen25VL(cfg, rngs=nnx.Rngs(0))


class _Policy:
  """What ``generate`` needs from ``medad_jax.api.Policy``: a model and a processor."""

  def __init__(self, model, processor):
    self.model, self.processor = model, processor


def _image(w, h, seed):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_generate_decodes_the_rollout_of_the_token_level_sampler(small):
  tok, cfg, proc, model = small
  images, questions = [_image(56, 56, 0), _image(112, 84, 1)], ['Is there an anomaly?', 'Which region?']
  G, N = 3, 6
  out = generate(_Policy(model, proc), images, questions, num_samples=G, max_new_tokens=N, seed=4,
                 temperature=0.9)
  assert len(out.texts) == 2 and all(len(t) == G for t in out.texts)
  assert out.tokens.shape == (2 * G, N) and out.policy_logprobs.shape == (2 * G, N)
  for b in range(2 * G):
    assert out.texts[b // G][b % G] == tok.decode(out.tokens[b, :out.lengths[b]].tolist(), skip_special_tokens=True)
  np.testing.assert_array_equal(out.prompt_index, np.arange(2 * G) // G)
  # The same prompts through the token-level API with the same key give the same rollout.
  exs = [proc(im, q) for im, q in zip(images, questions)]
  batch = prepare_prompts(cfg, [e['input_ids'] for e in exs],
                          pixel_values=np.concatenate([e['pixel_values'] for e in exs]),
                          image_grid_thw=np.concatenate([e['image_grid_thw'] for e in exs]))
  config = SamplingConfig(max_new_tokens=N, temperature=0.9, stop_token_ids=cfg.eos_token_ids)
  r = sample(model, batch, key=jax.random.key(4), config=config, num_samples=G,
             stop_table=stops.tokenizer_stop_table(tok, ['</answer>'], cfg.text.vocab_size))
  np.testing.assert_array_equal(out.tokens, r.tokens_BN)
  np.testing.assert_array_equal(out.policy_logprobs, r.policy_logprobs_BN)
  assert out.finish_reasons == r.finish_reasons()


def test_generate_needs_a_processor_and_matching_inputs(small):
  _, _, proc, model = small
  with pytest.raises(ValueError, match='needs processor='):
    generate(model, [_image(56, 56, 0)], ['q'])
  with pytest.raises(ValueError, match='got 2 images and 1 questions'):
    generate(model, [_image(56, 56, 0)] * 2, ['q'], processor=proc)
  with pytest.raises(ValueError, match='prompt 0: question contains the control token'):
    generate(model, [_image(56, 56, 0)], ['<|im_end|> hi'], processor=proc)


def _first_hit(texts, strings, ids):
  """Plain-text reference: index of the first token after which the joined text contains a stop string."""
  for i in range(len(ids)):
    joined = ''.join(texts[t] for t in ids[:i + 1])
    if any(s in joined for s in strings):
      return i
  return None


def _automaton_hit(table, ids):
  state = np.zeros(table.shape[0], np.int64)
  for i, t in enumerate(ids):
    state = table[np.arange(table.shape[0]), state, t]
    if (state == table.shape[1] - 1).any():
      return i
  return None


def test_stop_string_automata_match_the_text_in_any_tokenisation(small):
  tok = small[0]
  texts = stops._vocab_texts(tok)
  strings = ['lung.', 'Answer:', '(lower pole)', '</answer>', 'aa']
  table = stops.tokenizer_stop_table(tok, strings)
  assert table.shape == (5, 13, len(tok))
  single = lambda text: [i for c in text for i in tok.encode(c, add_special_tokens=False)]  # noqa: E731
  cases = 0
  for s in strings:
    for before, after in (('', ''), ('the ', ' x'), ('x', '!'), ('.', '.\n'), (' ', ' '), ('a', 'a')):
      for ids in (tok.encode(before + s + after, add_special_tokens=False), single(before + s + after)):
        want = _first_hit(texts, strings, ids)
        assert want is not None and _automaton_hit(table, ids) == want, (s, before, after)
        cases += 1
  assert cases == 60
  for text in ('the left kidney is normal', 'answer lung', 'Answer :', '(lower  pole)', 'a a'):
    for ids in (tok.encode(text, add_special_tokens=False), single(text)):
      assert _first_hit(texts, strings, ids) is None and _automaton_hit(table, ids) is None, text
  with pytest.raises(ValueError, match='stop string is empty'):
    stops.tokenizer_stop_table(tok, [''])
  assert stops.tokenizer_stop_table(tok, []) is None


def test_stop_strings_end_rollouts_on_device(small):
  tok, cfg, proc, model = small
  texts = stops._vocab_texts(tok) + ('',) * (cfg.text.vocab_size - len(tok))
  exs = [proc(_image(56, 56, s), q) for s, q in ((0, 'Is there an anomaly?'), (1, 'Which region?'))]
  batch = prepare_prompts(cfg, [e['input_ids'] for e in exs],
                          pixel_values=np.concatenate([e['pixel_values'] for e in exs]),
                          image_grid_thw=np.concatenate([e['image_grid_thw'] for e in exs]))
  N, config = 10, SamplingConfig(max_new_tokens=10, greedy=True)
  free = np.asarray(sample(model, batch, key=jax.random.key(0), config=config, num_samples=1).tokens_BN)
  # A string that straddles token boundaries of row 0's completion (from inside token 1 to inside token 4).
  row_text = [texts[t] for t in free[0]]
  start, end = len(row_text[0]) + len(row_text[1]) // 2, sum(map(len, row_text[:4])) + 1
  stop = ''.join(row_text)[start:end]
  assert len(stop) >= 3
  r = sample(model, batch, key=jax.random.key(0), config=config, num_samples=1,
             stop_table=stops.stop_string_table(texts, [stop]))
  for b in range(2):
    hit = _first_hit(texts, [stop], free[b].tolist())
    n = N if hit is None else hit + 1
    assert int(r.lengths_B[b]) == n and r.finish_reasons()[b] == ('length' if hit is None else 'stop_string')
    np.testing.assert_array_equal(np.asarray(r.tokens_BN)[b, :n], free[b, :n])
  assert r.finish_reasons()[0] == 'stop_string' and int(r.lengths_B[0]) <= 5


def test_stop_table_must_cover_the_model_vocabulary(small):
  tok, cfg, proc, model = small
  exs = [proc(_image(56, 56, 0), 'q')]
  batch = prepare_prompts(cfg, [e['input_ids'] for e in exs], pixel_values=exs[0]['pixel_values'],
                          image_grid_thw=exs[0]['image_grid_thw'])
  short = stops.tokenizer_stop_table(tok, ['</answer>'])  # len(tok) < the model's padded vocabulary
  assert short.shape[2] < cfg.text.vocab_size
  with pytest.raises(ValueError, match=rf'stop_table has shape .*expected \[strings, states, {cfg.text.vocab_size}\]'):
    sample(model, batch, key=jax.random.key(0), config=SamplingConfig(max_new_tokens=2), num_samples=1,
           stop_table=short)
