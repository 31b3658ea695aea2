"""Sampling math on plain logits: filters against hand-computed cases and transformers' warpers, the sampled
distribution (chi-square at a fixed seed), excluded tokens never drawn, stop-sequence matching, settings checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from medad_jax.sampling import ops
from medad_jax.sampling.ops import SamplingConfig


def test_top_k_and_top_p_hand_computed():
  x = jnp.array([[0.0, 3.0, 1.0, 2.0]])
  np.testing.assert_array_equal(ops.top_k_filter(x, 2), [[-np.inf, 3.0, -np.inf, 2.0]])
  np.testing.assert_array_equal(ops.top_k_filter(x, 0), x)  # off
  np.testing.assert_array_equal(ops.top_k_filter(x, 4), x)
  # probabilities .5 / .3 / .2: mass before each token (sorted) is 0, .5, .8
  logp = jnp.log(jnp.array([[0.2, 0.5, 0.3]]))
  np.testing.assert_array_equal(np.isfinite(ops.top_p_filter(logp, 0.6)), [[False, True, True]])
  np.testing.assert_array_equal(np.isfinite(ops.top_p_filter(logp, 0.5)), [[False, True, False]])
  np.testing.assert_array_equal(np.isfinite(ops.top_p_filter(logp, 0.81)), [[True, True, True]])
  np.testing.assert_array_equal(np.isfinite(ops.top_p_filter(logp, 0.01)), [[False, True, False]])


@pytest.mark.parametrize('temperature,top_k,top_p', [(0.7, 0, 1.0), (1.0, 50, 1.0), (1.3, 0, 0.9),
                                                     (0.8, 40, 0.75)])
def test_sampling_logits_match_transformers_warpers(temperature, top_k, top_p):
  logits = np.random.default_rng(0).normal(size=(6, 300)).astype(np.float32) * 3
  ref = torch.from_numpy(logits.copy())
  if temperature != 1.0:
    ref = TemperatureLogitsWarper(temperature)(None, ref)
  if top_k:
    ref = TopKLogitsWarper(top_k)(None, ref)
  if top_p < 1.0:
    ref = TopPLogitsWarper(top_p)(None, ref)
  ours = np.asarray(ops.sampling_logits(jnp.asarray(logits), SamplingConfig(temperature=temperature, top_k=top_k,
                                                                              top_p=top_p)))
  ref = ref.numpy()
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
  np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6, atol=1e-6)


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
  """Chi-square goodness of fit; tokens with a small expected count are pooled into one bin."""
  n = counts.sum()
  expected = probs * n
  big = expected >= min_expected
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def _draw_many(logits_V: np.ndarray, cfg: SamplingConfig, n: int, seed: int = 0) -> np.ndarray:
  keys = ops.row_keys(jax.random.key(seed), jnp.arange(n))
  logits_BV = jnp.broadcast_to(jnp.asarray(logits_V), (n, logits_V.shape[0]))
  return np.asarray(jax.jit(lambda k, l: ops.draw(k, l, cfg)[0])(keys, logits_BV))


@pytest.mark.parametrize('temperature,top_k,top_p', [(0.7, 0, 1.0), (1.5, 0, 1.0), (1.0, 5, 1.0), (0.9, 0, 0.8),
                                                     (1.2, 8, 0.9)])
def test_draws_follow_the_filtered_distribution(temperature, top_k, top_p):
  logits = np.random.default_rng(1).normal(size=(24,)).astype(np.float32) * 1.5
  cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
  probs = np.asarray(jax.nn.softmax(ops.sampling_logits(jnp.asarray(logits)[None], cfg)[0]), np.float64)
  toks = _draw_many(logits, cfg, 20000)
  counts = np.bincount(toks, minlength=24)
  assert _chi2_pvalue(counts, probs) > 1e-3
  # The same counts must reject a different distribution: the test has power.
  wrong = np.asarray(jax.nn.softmax(jnp.asarray(logits) / (temperature * 1.3)), np.float64)
  assert _chi2_pvalue(counts, wrong) < 1e-6


@pytest.mark.parametrize('top_k,top_p', [(3, 1.0), (0, 0.5), (10, 0.3), (1, 1.0)])
def test_excluded_tokens_are_never_drawn(top_k, top_p):
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(64, 200)).astype(np.float32) * 2
  cfg = SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p)
  # The allowed set, from numpy: top-k by rank, then the nucleus of the renormalised top-k distribution.
  allowed = np.ones(logits.shape, bool)
  order = np.argsort(-logits, axis=1)
  if top_k:
    allowed[:] = False
    np.put_along_axis(allowed, order[:, :top_k], True, axis=1)
  if top_p < 1:
    x = np.where(allowed, logits, -np.inf).astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ps = np.take_along_axis(p, order, 1)
    keep_sorted = (np.cumsum(ps, 1) - ps) < top_p
    nucleus = np.zeros_like(allowed)
    np.put_along_axis(nucleus, order, keep_sorted, axis=1)
    allowed &= nucleus
  keys = ops.row_keys(jax.random.key(3), jnp.arange(64))
  seen = np.zeros(logits.shape, bool)
  draw = jax.jit(lambda step: ops.draw(ops.step_keys(keys, step), jnp.asarray(logits), cfg)[0])
  for step in range(100):
    toks = np.asarray(draw(step))
    assert allowed[np.arange(64), toks].all()
    seen[np.arange(64), toks] = True
  # It does sample: every row with two or more allowed tokens drew at least two different ones.
  assert (seen.sum(1) >= np.minimum(allowed.sum(1), 2)).all()
  assert allowed.sum(1).min() >= 1 and (allowed.sum(1) < 200).all()


def test_draw_log_probs_and_greedy():
  logits = jnp.asarray(np.random.default_rng(4).normal(size=(5, 30)).astype(np.float32))
  keys = ops.row_keys(jax.random.key(0), jnp.arange(5))
  cfg = SamplingConfig(temperature=0.5, top_k=4)
  tok, plp, slp = ops.draw(keys, logits, cfg)
  ref_p = jax.nn.log_softmax(logits)[jnp.arange(5), tok]
  ref_s = jax.nn.log_softmax(ops.top_k_filter(logits / 0.5, 4))[jnp.arange(5), tok]
  np.testing.assert_allclose(plp, ref_p, atol=1e-6)
  np.testing.assert_allclose(slp, ref_s, atol=1e-6)
  tok_g, plp_g, slp_g = ops.draw(keys, logits, SamplingConfig(greedy=True, temperature=0.0))
  np.testing.assert_array_equal(tok_g, jnp.argmax(logits, -1))
  np.testing.assert_allclose(plp_g, jax.nn.log_softmax(logits).max(-1), atol=1e-6)
  np.testing.assert_array_equal(slp_g, 0.0)


def test_row_keys_do_not_depend_on_batch_layout():
  logits = jnp.asarray(np.random.default_rng(5).normal(size=(1, 50)).astype(np.float32))
  cfg = SamplingConfig()
  k = jax.random.key(7)
  full = ops.draw(ops.row_keys(k, jnp.arange(8)), jnp.repeat(logits, 8, 0), cfg)[0]
  part = ops.draw(ops.row_keys(k, jnp.array([5, 2])), jnp.repeat(logits, 2, 0), cfg)[0]
  np.testing.assert_array_equal(part, full[jnp.array([5, 2])])
  assert len(set(np.asarray(full).tolist())) > 1  # different rows get different streams


def test_stop_pattern_with_alternatives():
  cfg = SamplingConfig(stop_sequences=(((3, 5), 8, (9, 10)),))
  assert cfg.stop_sequences == (((3, 5), (8,), (9, 10)),)
  rows = [[5, 8, 10], [3, 8, 9], [4, 8, 9], [3, 8, 11], [8, 5, 8]]  # match, match, no, no, no (too short)
  tail = jnp.full((5, cfg.stop_window), -1, jnp.int32)
  for step in range(3):
    tail = ops.push_tail(tail, jnp.array([r[step] for r in rows], jnp.int32))
  np.testing.assert_array_equal(ops.stop_sequence_hit(tail, cfg.stop_sequences), [True, True, False, False, False])


def test_stop_sequence_window():
  cfg = SamplingConfig(stop_sequences=((7, 8, 9), (4,)))
  tail = jnp.full((3, cfg.stop_window), -1, jnp.int32)
  hits = []
  # Rows are the columns: row 0 samples 7 8 9 3, row 1 samples 1 4 2 8, row 2 samples 8 7 8 9.
  for tok in ([7, 1, 8], [8, 4, 7], [9, 2, 8], [3, 8, 9]):
    tail = ops.push_tail(tail, jnp.array(tok, jnp.int32))
    hits.append(np.asarray(ops.stop_sequence_hit(tail, cfg.stop_sequences)).tolist())
  assert hits == [[False, False, False], [False, True, False], [True, False, False], [False, False, True]]
  np.testing.assert_array_equal(ops.is_stop_token(jnp.array([1, 5, 9]), (5, 9)), [False, True, True])
  np.testing.assert_array_equal(ops.is_stop_token(jnp.array([1, 5]), ()), [False, False])


@pytest.mark.parametrize('kw,msg', [(dict(temperature=0.0), 'temperature'), (dict(top_p=0.0), 'top_p'),
                                    (dict(top_k=-1), 'top_k'), (dict(max_new_tokens=0), 'max_new_tokens'),
                                    (dict(stop_sequences=((1, 2), ())), 'stop_sequences')])
def test_sampling_config_rejects_bad_settings(kw, msg):
  with pytest.raises(ValueError, match=msg):
    SamplingConfig(**kw)


def test_sampling_config_is_hashable_and_normalised():
  a = SamplingConfig(stop_token_ids=[3, 4], stop_sequences=[[1, [2, 6]]])
  b = SamplingConfig(stop_token_ids=(3, 4), stop_sequences=(((1,), (6, 2)),))
  assert a == b and hash(a) == hash(b) and a.stop_window == 2
  with pytest.raises(ValueError, match=r'stop_sequences\[0\]\[1\]'):
    SamplingConfig(stop_sequences=((1, ()),))


@pytest.mark.parametrize('V', [24, 600, 2003])  # 3 blocks of 8; 15 of 40; V prime: padded to 8 of 256
def test_two_level_categorical_is_exact_at_the_edges(V):
  rng = np.random.default_rng(V)
  logits = rng.normal(size=(3, V)).astype(np.float32)
  logits[:, ::3] = -np.inf  # excluded tokens
  x = jnp.asarray(logits)
  probs = np.asarray(jax.nn.softmax(x, axis=-1), np.float64)
  # u -> 1 gives the last token with mass, u -> 0+ the first; a mid u the inverse CDF of the block, then token.
  last = [int(np.flatnonzero(np.isfinite(r))[-1]) for r in logits]
  first = [int(np.flatnonzero(np.isfinite(r))[0]) for r in logits]
  top = jnp.ones((3, 2))
  np.testing.assert_array_equal(ops.categorical(top, x)[0], last)
  np.testing.assert_array_equal(ops.categorical(jnp.full((3, 2), 1e-30), x)[0], first)
  tok, lse = ops.categorical(jnp.full((3, 2), 0.5), x)
  np.testing.assert_allclose(lse, jax.nn.logsumexp(x, axis=-1), atol=1e-5)
  assert np.isfinite(logits[np.arange(3), np.asarray(tok)]).all()
  # Frequencies over many draws (chi-square), the excluded third never drawn.
  u = ops.uniform_open_closed(ops.row_keys(jax.random.key(V), jnp.arange(30000)))
  toks = np.asarray(jax.jit(ops.categorical)(u, jnp.broadcast_to(x[0], (30000, V)))[0])
  assert np.isfinite(logits[0, toks]).all()
  assert _chi2_pvalue(np.bincount(toks, minlength=V), probs[0]) > 1e-3
