"""GRPO math on hand-computed examples (paper Eq. 7 and 8)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medad_jax.rl import algo

EPS = 0.2


def test_group_advantages_mean_baseline():
  r = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0 / 3.0]])
  adv = algo.group_advantages(r)
  np.testing.assert_allclose(adv, [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-1 / 6, -1 / 6, -1 / 6, 0.5]], atol=1e-7)


def test_group_advantages_std_normalised():
  r = jnp.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
  adv = algo.group_advantages(r, std_norm=True, eps=0.0 + 1e-6)
  # mean 0.5, population std 0.5 -> +-1; the constant group stays exactly 0 (0 / eps).
  np.testing.assert_allclose(adv[0], [1, -1, -1, 1], atol=1e-5)
  np.testing.assert_array_equal(adv[1], [0, 0, 0, 0])


def test_zero_variance_groups():
  r = jnp.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5], [0.3, 0.3, 0.3000001]])
  np.testing.assert_array_equal(algo.zero_variance_groups(r), [True, False, True, False])
  np.testing.assert_array_equal(algo.zero_variance_groups(r, atol=1e-5), [True, False, True, True])


def _surrogate_case(ratio, adv):
  logp = jnp.log(jnp.array([[ratio]], jnp.float32))
  old = jnp.zeros((1, 1))
  pg, aux = algo.clipped_surrogate(logp, old, jnp.array([adv]), eps_low=EPS, eps_high=EPS)
  grad = jax.grad(lambda lp: algo.clipped_surrogate(lp, old, jnp.array([adv]), eps_low=EPS, eps_high=EPS)[0].sum()
                  )(logp)
  return float(pg[0, 0]), float(grad[0, 0]), bool(aux['clipped_low'][0, 0]), bool(aux['clipped_high'][0, 0])


# (ratio, advantage) -> (loss, d loss / d logp, clipped_low, clipped_high), by hand:
#   loss = -min(r A, clip(r, 0.8, 1.2) A); d/dlogp of -r A is -r A (r = exp(logp)), 0 where the clip binds.
@pytest.mark.parametrize('ratio,adv,loss,grad,lo,hi', [
    (1.5, 2.0, -2.4, 0.0, False, True),     # A > 0 above 1+eps: clipped at 1.2, no gradient
    (1.1, 2.0, -2.2, -2.2, False, False),   # A > 0 inside the band
    (0.5, 2.0, -1.0, -1.0, False, False),   # A > 0 below 1-eps: min picks r A (unclipped), gradient flows
    (0.5, -2.0, 1.6, 0.0, True, False),     # A < 0 below 1-eps: clipped at 0.8, no gradient
    (0.9, -2.0, 1.8, 1.8, False, False),    # A < 0 inside the band
    (1.5, -2.0, 3.0, 3.0, False, False),    # A < 0 above 1+eps: min picks r A (unclipped), gradient flows
    (1.5, 0.0, 0.0, 0.0, False, False),     # A = 0: nothing
])
def test_clipped_surrogate_both_sides(ratio, adv, loss, grad, lo, hi):
  got_loss, got_grad, got_lo, got_hi = _surrogate_case(ratio, adv)
  assert got_loss == pytest.approx(loss, abs=1e-6)
  assert got_grad == pytest.approx(grad, abs=1e-6)
  assert (got_lo, got_hi) == (lo, hi)


def test_clipped_surrogate_asymmetric_bounds():
  logp = jnp.log(jnp.array([[1.25, 0.85]]))
  pg, aux = algo.clipped_surrogate(logp, jnp.zeros((1, 2)), jnp.array([1.0]), eps_low=0.1, eps_high=0.28)
  np.testing.assert_allclose(pg, [[-1.25, -0.85]], atol=1e-6)  # 1.25 < 1.28: not clipped
  pg, aux = algo.clipped_surrogate(logp, jnp.zeros((1, 2)), jnp.array([-1.0]), eps_low=0.1, eps_high=0.28)
  np.testing.assert_allclose(pg, [[1.25, 0.9]], atol=1e-6)  # 0.85 < 0.9: clipped up to 0.9
  np.testing.assert_array_equal(aux['clipped_low'], [[False, True]])


def test_k3_kl_values_nonnegative_and_zero_at_equal_policies():
  logp = jnp.log(jnp.array([[0.5, 0.2, 0.9]]))
  ref = jnp.log(jnp.array([[0.25, 0.2, 0.3]]))
  kl = algo.k3_kl(logp, ref)
  # d = ref - logp: log(0.5) -> e^d - d - 1 = 0.5 + log 2 - 1; 0; 1/3 + log 3 - 1
  np.testing.assert_allclose(kl, [[0.5 + math.log(2) - 1, 0.0, 1 / 3 + math.log(3) - 1]], atol=1e-6)
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 64, 33)) * 3
  assert float(jnp.min(algo.k3_kl(jnp.asarray(a), jnp.asarray(b)))) >= 0.0
  np.testing.assert_array_equal(algo.k3_kl(jnp.asarray(a), jnp.asarray(a)), np.zeros_like(a))
  # No gradient flows into the reference; at equal policies the gradient w.r.t. logp is 0 as well.
  g_ref = jax.grad(lambda r: algo.k3_kl(jnp.asarray(a), r).sum())(jnp.asarray(b))
  np.testing.assert_array_equal(g_ref, 0.0)
  np.testing.assert_array_equal(jax.grad(lambda lp: algo.k3_kl(lp, jnp.asarray(a)).sum())(jnp.asarray(a)), 0.0)


def test_k3_kl_is_an_unbiased_estimator_of_the_true_kl():
  p = np.array([0.6, 0.3, 0.1])
  q = np.array([0.2, 0.5, 0.3])
  true = float(np.sum(p * np.log(p / q)))
  expected = float(np.sum(p * np.asarray(algo.k3_kl(jnp.log(jnp.asarray(p))[None], jnp.log(jnp.asarray(q))[None]))))
  assert expected == pytest.approx(true, rel=1e-6)


X = jnp.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
M = jnp.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize('mode,expected', [
    ('seq_mean_token_mean', (2.5 + 15.0) / 2),   # the empty third row is not a sequence
    ('token_mean', (10.0 + 30.0) / 6),
    ('token_sum', 40.0),
])
def test_aggregation_modes(mode, expected):
  assert float(algo.aggregate(X, M, mode)) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize('mode', algo.AGGREGATION_MODES)
def test_padding_contributes_nothing(mode):
  """Garbage (even inf / NaN) at masked positions changes neither the value nor the gradient."""
  junk = X.at[0, 0].set(jnp.nan).at[1, 3].set(jnp.inf).at[2].set(-jnp.inf)
  junk_m = M.at[0, 0].set(0.0)
  clean = X.at[0, 0].set(123.0)
  assert float(algo.aggregate(junk, junk_m, mode)) == float(algo.aggregate(clean, junk_m, mode))
  g = jax.grad(lambda x: algo.aggregate(x, junk_m, mode))(junk)
  assert np.all(np.asarray(g)[np.asarray(junk_m) == 0] == 0.0)
  assert np.all(np.isfinite(np.asarray(g)))
  # Extra padded columns / rows leave the value unchanged.
  wide = jnp.pad(X, ((0, 1), (0, 3)), constant_values=99.0)
  wide_m = jnp.pad(M, ((0, 1), (0, 3)))
  assert float(algo.aggregate(wide, wide_m, mode)) == pytest.approx(float(algo.aggregate(X, M, mode)), rel=1e-7)


def test_aggregate_unknown_mode():
  with pytest.raises(ValueError, match='unknown aggregation mode'):
    algo.aggregate(X, M, 'mean')


def test_token_logprobs_and_entropy_alignment():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
  ids = jnp.array([[2, 1, 1]])
  lp = algo.token_logprobs(logits, ids)
  # token 1 (id 1) is predicted by position 0 (p=0.25), token 2 (id 1) by position 1 (p=0.8)
  np.testing.assert_allclose(lp, [[0.0, math.log(0.25), math.log(0.8)]], atol=1e-6)
  ent = algo.entropy_from_logits(logits)
  h = lambda p: -sum(x * math.log(x) for x in p)
  np.testing.assert_allclose(ent, [[0.0, h([0.5, 0.25, 0.25]), h([0.1, 0.8, 0.1])]], atol=1e-6)
  # Temperature divides the logits before the softmax.
  lp2 = algo.token_logprobs(logits, ids, temperature=2.0)
  p = np.sqrt([0.5, 0.25, 0.25])
  np.testing.assert_allclose(lp2[0, 1], math.log(p[1] / p.sum()), atol=1e-6)


def test_masked_stats():
  x = jnp.array([[5.0, 1.0, -3.0], [100.0, 2.0, 0.0]])
  m = jnp.array([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
  assert float(algo.masked_mean(x, m)) == pytest.approx(0.0)
  lo, hi = algo.masked_min_max(x, m)
  assert (float(lo), float(hi)) == (-3.0, 2.0)
  assert tuple(map(float, algo.masked_min_max(x, jnp.zeros_like(m)))) == (0.0, 0.0)


def test_sft_nll_masks_prompt_tokens():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 7, size=(2, 5)))
  mask = jnp.array([[1, 0, 1, 1, 0], [0, 0, 0, 1, 1]], jnp.float32)  # position 0 is never a target
  loss, nll = algo.sft_nll(logits, ids, mask)
  lsm = jax.nn.log_softmax(logits, -1)
  want = [-lsm[0, 1, ids[0, 2]], -lsm[0, 2, ids[0, 3]], -lsm[1, 2, ids[1, 3]], -lsm[1, 3, ids[1, 4]]]
  assert float(loss) == pytest.approx(float(np.mean(want)), rel=1e-6)
