"""The ``local`` judge backed by our Flax model (``medad_jax/judge/flax_scorer.py``).

On a tiny random model the verdicts themselves mean nothing, so agreement with the ``rule`` judge on
``PLAIN_COTS`` is NOT asserted here (it would pass or fail by chance). What is checked is that the plumbing is
exact: the scorer's letter log-probs equal a direct teacher-forced forward of the same prompt (each prompt alone,
unpadded) within the fp32 whole-model tolerance, whatever the batch and its padding; the judge's verdict is their
argmax; the 'policy' format carries the question and the thought only; and the adapters-off switch really scores
the base weights. Agreement with ``rule`` on a trained policy is measured by the evaluation of the embedded run
(``judge_rule_agreement`` in ``eval/results.json``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medad_jax.judge import JudgeConfig, LocalJudge, build_judge_prompt, make_judge
from medad_jax.judge.flax_scorer import FlaxLetterScorer, policy_prompt
from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.lora import LoraConfig, apply_lora
from medad_jax.model.qwen25vl import Qwen25VL
from medad_jax.model.rope_index import rope_index
from medad_jax.tokenizer import config_for_tokenizer, train_small_tokenizer
from tests.test_judge import PLAIN_COTS, QUESTION

TOL = 1e-4  # whole-model fp32 tolerance (project rule)
LETTERS = ('A', 'B', 'C', 'D')


@pytest.fixture(scope='module')
def setup():
  corpus = [QUESTION, *[t for t, _ in PLAIN_COTS], 'Which option? A. B. C. D. answer reasoning question'] * 4
  tok = train_small_tokenizer(corpus, vocab_size=400)
  base = Qwen25VLConfig.tiny()
  cfg = config_for_tokenizer(base.replace(text=dataclasses.replace(base.text, num_layers=1)), tok, vocab_multiple=8)
  model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  return tok, cfg, model


def direct_letter_logprobs(model, cfg, tok, text):
  """One prompt, no padding, a plain forward: log-softmax at the last position, read at the letters."""
  ids = np.asarray([tok.encode(text, add_special_tokens=False)], np.int32)
  mask = np.ones_like(ids)
  pos, _ = rope_index(cfg, ids, mask, None)
  logits, _ = model(jnp.asarray(ids), attention_mask_BT=jnp.asarray(mask), positions_3BT=jnp.asarray(pos))
  letter_ids = [tok.encode(c, add_special_tokens=False)[0] for c in LETTERS]
  return np.asarray(jax.nn.log_softmax(logits[0, -1]))[letter_ids]


@pytest.mark.parametrize('fmt', ['judge', 'policy'])
def test_scorer_equals_direct_forward_and_verdict_is_argmax(setup, fmt):
  tok, cfg, model = setup
  graphdef, state = nnx.split(model)
  scorer = FlaxLetterScorer(graphdef, lambda: (state,), tok, cfg, adapters=True, prompt_format=fmt)
  prompts = [build_judge_prompt(QUESTION, t) for t, _ in PLAIN_COTS]  # different lengths: left padding differs
  got = scorer(prompts, LETTERS)
  assert got.shape == (len(prompts), 4)
  for i, p in enumerate(prompts):
    want = direct_letter_logprobs(model, cfg, tok, scorer.render(p))
    np.testing.assert_allclose(got[i], want, atol=TOL, rtol=0)
  # the same prompt scored alone (another row count) gives the same numbers
  np.testing.assert_allclose(scorer(prompts[2:3], LETTERS)[0], got[2], atol=TOL, rtol=0)
  judge = make_judge(JudgeConfig(backend='local', max_batch=4), local_scorer=scorer)
  assert isinstance(judge, LocalJudge)
  res = judge.judge([QUESTION] * len(PLAIN_COTS), [t for t, _ in PLAIN_COTS])
  assert res.letters == [LETTERS[k] for k in np.argmax(got, axis=1)]


def test_policy_format_holds_question_and_thought_only(setup):
  tok, cfg, model = setup
  graphdef, state = nnx.split(model)
  scorer = FlaxLetterScorer(graphdef, lambda: (state,), tok, cfg, prompt_format='policy')
  thought = 'The lesion sits in the lower left quadrant. This is option C.'
  text = scorer.render(build_judge_prompt(QUESTION, thought))
  assert text == policy_prompt(QUESTION, thought)
  assert text.endswith(f'<think>{thought}</think><answer>') and QUESTION.strip() in text
  assert '<|image_pad|>' not in text and text.count('<answer>') == 1
  with pytest.raises(ValueError, match='not a judge prompt'):
    scorer.render('just some text')


def test_adapters_off_scores_the_base_weights(setup):
  tok, cfg, _ = setup
  model = Qwen25VL(cfg, rngs=nnx.Rngs(1))
  prompts = [build_judge_prompt(QUESTION, t) for t, _ in PLAIN_COTS[:3]]
  g0, s0 = nnx.split(model)
  base = FlaxLetterScorer(g0, lambda: (s0,), tok, cfg, adapters=True)(prompts, LETTERS)
  apply_lora(model, LoraConfig(rank=4, alpha=8.0))
  for _, m in nnx.iter_modules(model):  # make the adapters matter (lora_b starts at 0)
    if getattr(m, 'lora_b', None) is not None:
      m.lora_b.set_value(jnp.full(m.lora_b.shape, 0.05, m.lora_b.dtype))
  g1, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
  off = FlaxLetterScorer(g1, lambda: (params, frozen), tok, cfg, adapters=False)(prompts, LETTERS)
  on = FlaxLetterScorer(g1, lambda: (params, frozen), tok, cfg, adapters=True)(prompts, LETTERS)
  np.testing.assert_allclose(off, base, atol=TOL, rtol=0)
  assert np.abs(on - base).max() > 1e-3


def test_multi_token_letter_fails_clearly(setup):
  tok, cfg, model = setup
  graphdef, state = nnx.split(model)
  scorer = FlaxLetterScorer(graphdef, lambda: (state,), tok, cfg)
  with pytest.raises(ValueError, match='single token'):
    scorer.letter_ids(('A', 'answer reasoning'))


def direct_continuation_logprob(model, cfg, tok, context, continuation):
  """One row, no padding, a plain forward: the summed log-probs of the continuation's tokens after the context."""
  ctx = tok.encode(context, add_special_tokens=False)
  full = tok.encode(context + continuation, add_special_tokens=False)
  assert full[:len(ctx)] == ctx  # the byte-level BPE splits at '>', so the context tokens are a prefix
  ids = np.asarray([full], np.int32)
  mask = np.ones_like(ids)
  pos, _ = rope_index(cfg, ids, mask, None)
  logits, _ = model(jnp.asarray(ids), attention_mask_BT=jnp.asarray(mask), positions_3BT=jnp.asarray(pos))
  logp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1))
  return float(sum(logp[t - 1, full[t]] for t in range(len(ctx), len(full))))


def test_option_format_scores_each_option_text_as_the_answer(setup):
  """answer_format='option': letter k's score is log p('{option k}</answer>' | question + thought + '<answer>')."""
  tok, cfg, model = setup
  graphdef, state = nnx.split(model)
  scorer = FlaxLetterScorer(graphdef, lambda: (state,), tok, cfg, prompt_format='policy', answer_format='option')
  thoughts = [t for t, _ in PLAIN_COTS[:4]]
  prompts = [build_judge_prompt(QUESTION, t) for t in thoughts]
  got = scorer(prompts, LETTERS)
  assert got.shape == (4, 4) and np.isfinite(got).all()
  options = ['Left Upper', 'Right Upper', 'Left Lower', 'Center Region']
  for i, t in enumerate(thoughts):
    context = policy_prompt(QUESTION, t)
    want = [direct_continuation_logprob(model, cfg, tok, context, f'{o}</answer>') for o in options]
    np.testing.assert_allclose(got[i], want, atol=TOL, rtol=0)
  # Scored alone (other padding, other row count): the same numbers; the verdict is the argmax.
  np.testing.assert_allclose(scorer(prompts[1:2], LETTERS)[0], got[1], atol=TOL, rtol=0)
  judge = make_judge(JudgeConfig(backend='local', max_batch=3), local_scorer=scorer)
  assert judge.judge([QUESTION] * 4, thoughts).letters == [LETTERS[k] for k in np.argmax(got, axis=1)]


def test_option_format_missing_options_and_bad_settings(setup):
  tok, cfg, model = setup
  graphdef, state = nnx.split(model)
  scorer = FlaxLetterScorer(graphdef, lambda: (state,), tok, cfg, prompt_format='policy', answer_format='option')
  three = 'Which region?\nA. Left Upper\nB. Right Upper\nC. Center Region'
  got = scorer([build_judge_prompt(three, 'It is in the centre.')], LETTERS)
  assert np.isfinite(got[0, :3]).all() and got[0, 3] == -np.inf  # no option D: never the verdict
  with pytest.raises(ValueError, match='option lines'):
    scorer([build_judge_prompt('Is it abnormal? Say yes or no.', 'It looks normal.')], LETTERS)
  with pytest.raises(ValueError, match="prompt_format='policy'"):
    FlaxLetterScorer(graphdef, lambda: (state,), tok, cfg, prompt_format='judge', answer_format='option')
  with pytest.raises(ValueError, match='answer_format'):
    FlaxLetterScorer(graphdef, lambda: (state,), tok, cfg, prompt_format='policy', answer_format='text')
