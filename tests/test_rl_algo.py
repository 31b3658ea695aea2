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
    ('max_len_sum', 40.0 / (2 * 4)),             # 2 non-empty sequences x width 4
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
  # Extra padded columns / rows leave the value unchanged (max_len_sum: padded rows only -- its normaliser is the
  # completion width by definition, so a wider budget divides by more).
  cols = 0 if mode == 'max_len_sum' else 3
  wide = jnp.pad(X, ((0, 1), (0, cols)), constant_values=99.0)
  wide_m = jnp.pad(M, ((0, 1), (0, cols)))
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


# ------------------------------------------------------------------------------------------ GRPO variants
# Each variant's loss on a hand-computed example (numbers worked out in the comments).

from medad_jax.rl import update as U  # noqa: E402


def test_gspo_sequence_ratio_and_clip_by_hand():
  # Sequence 0: 2 tokens, log-ratio 0.2 and -0.1 -> log s = 0.05, s = e^0.05, A = 2: inside the band,
  #   loss_0 = -2 e^0.05; d loss_0 / d logp_0t = -A s / |y_0| = -e^0.05 for t = 0, 1 (the masked slot gets 0).
  # Sequence 1: 3 tokens of log-ratio 0.3 -> s = e^0.3 = 1.35 > 1.2, A = 1: clipped, loss_1 = -1.2, no gradient.
  # seq_mean_token_mean: (loss_0 + loss_1) / 2.
  old = jnp.zeros((2, 3))
  logp = jnp.array([[0.2, -0.1, 7.0], [0.3, 0.3, 0.3]])
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
  adv = jnp.array([2.0, 1.0])

  def loss(lp):
    pg, _ = algo.gspo_surrogate(lp, old, adv, mask, eps_low=EPS, eps_high=EPS)
    return algo.aggregate(pg, mask, 'seq_mean_token_mean')

  s0 = math.exp(0.05)
  assert float(loss(logp)) == pytest.approx((-2 * s0 - 1.2) / 2, abs=1e-6)
  g = jax.grad(loss)(logp)
  np.testing.assert_allclose(g, [[-s0 / 2, -s0 / 2, 0.0], [0.0, 0.0, 0.0]], atol=1e-6)
  _, aux = algo.gspo_surrogate(logp, old, adv, mask, eps_low=EPS, eps_high=EPS)
  np.testing.assert_array_equal(aux['clipped_high'][:, 0], [False, True])
  np.testing.assert_allclose(aux['ratio'][:, 0], [s0, math.exp(0.3)], rtol=1e-6)
  # A negative advantage below 1 - eps is clipped too (the whole sequence).
  _, aux = algo.gspo_surrogate(-jnp.ones((1, 2)), jnp.zeros((1, 2)), jnp.array([-1.0]), jnp.ones((1, 2)),
                               eps_low=EPS, eps_high=EPS)
  assert bool(aux['clipped_low'][0, 0])


def test_gspo_equals_grpo_for_one_token_sequences():
  # With |y| = 1 the sequence ratio is the token ratio: the two objectives coincide.
  logp, old = jnp.array([[0.1], [-0.4], [0.5]]), jnp.zeros((3, 1))
  adv, mask = jnp.array([1.0, -1.0, 2.0]), jnp.ones((3, 1))
  a, _ = algo.gspo_surrogate(logp, old, adv, mask, eps_low=EPS, eps_high=EPS)
  b, _ = algo.clipped_surrogate(logp, old, adv, eps_low=EPS, eps_high=EPS)
  np.testing.assert_allclose(a, b, atol=1e-7)


def test_dr_grpo_constant_normaliser_by_hand():
  # token sum 1 + 2 + 3 = 6 over (2 non-empty sequences x width 3) = 1; the empty third row does not count.
  x = jnp.array([[1.0, 2.0, 9.0], [3.0, 5.0, 5.0], [4.0, 4.0, 4.0]])
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  num, den = algo.aggregate_parts(x, mask, 'max_len_sum')
  assert (float(num), float(den)) == (6.0, 6.0)
  assert float(algo.aggregate(x, mask, 'max_len_sum')) == 1.0
  # Unlike seq_mean_token_mean ((1.5 + 3) / 2 = 2.25) the per-token weight does not depend on the length.
  assert float(algo.aggregate(x, mask, 'seq_mean_token_mean')) == 2.25


@pytest.mark.parametrize('length,factor,want', [(5, 1.0, 0.0), (6, 1.0, 0.0), (8, 1.0, -0.5), (9, 1.0, -0.75),
                                                (10, 1.0, -1.0), (12, 1.0, -1.0), (8, 0.5, -0.25)])
def test_overlong_penalty_by_hand(length, factor, want):
  # max_len 10, buffer 4: free up to 6 tokens, then linear to -factor at 10 (DAPO Eq. 13).
  got = algo.overlong_penalty(jnp.array([length]), 10, 4, factor)
  assert float(got[0]) == pytest.approx(want, abs=1e-7)


def test_overlong_penalty_rejects_a_bad_buffer():
  with pytest.raises(ValueError, match='0 < buffer <= max_len'):
    algo.overlong_penalty(jnp.array([1]), 10, 0)


def test_tis_weights_and_mismatch_by_hand():
  old = jnp.log(jnp.array([[0.5, 0.2, 0.3]]))
  sampler = jnp.log(jnp.array([[0.25, 0.4, 0.3]]))
  # ratios pi_old / pi_sampler = 2, 0.5, 1 -> capped at 1.5: 1.5, 0.5, 1.
  np.testing.assert_allclose(algo.tis_weights(old, sampler, 1.5), [[1.5, 0.5, 1.0]], rtol=1e-6)
  # |log 2|, |log 0.5|, 0 over the first two tokens (the third masked) -> log 2.
  mask = jnp.array([[1.0, 1.0, 0.0]])
  assert float(algo.logp_mismatch(old, sampler, mask)) == pytest.approx(math.log(2), rel=1e-6)


def _obj(cfg, logp, old, adv, mask, **kw):
  num, stats = U.grpo_objective(logp, old, None, adv, mask, cfg, **kw)
  return float(num), {k: float(v) for k, v in stats.items()}


def test_grpo_objective_selects_gspo_and_dr_grpo():
  logp = jnp.array([[0.2, -0.1, 7.0], [0.3, 0.3, 0.3]])
  old = jnp.zeros((2, 3))
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
  adv = jnp.array([2.0, 1.0])
  num, st = _obj(U.GRPOConfig(group_size=2, beta=0.0, loss='gspo'), logp, old, adv, mask)
  assert num == pytest.approx(-2 * math.exp(0.05) - 1.2, abs=1e-5)  # numerator: sum of the sequence losses
  assert st['clip_high_sum'] == 3.0  # sequence 1 clipped: its three tokens
  # Dr. GRPO: token ratios, numerator = token sum of -min(r A, clip(r) A): seq 0 has r = e^0.2 = 1.22 (clipped to
  # 1.2, A = 2) and e^-0.1 (inside); seq 1 has three tokens at e^0.3, clipped to 1.2 (A = 1).
  num, _ = _obj(U.GRPOConfig(group_size=2, beta=0.0, loss='dr_grpo', aggregation='max_len_sum'), logp, old, adv,
                mask)
  assert num == pytest.approx(-2 * (1.2 + math.exp(-0.1)) - 3 * 1.2, abs=1e-5)


def test_grpo_objective_overlong_penalty_enters_as_centred_advantage():
  # One group of 2 rollouts in a width-10 budget, lengths 10 and 5, buffer 4: penalties -1 and 0, centred
  # -0.5 and +0.5. Ratio 1, A = 0, token_mean: numerator = -sum_i A'_i L_i = -(-0.5 * 10 + 0.5 * 5) = 2.5.
  mask = jnp.array([[1.0] * 10, [1.0] * 5 + [0.0] * 5])
  z = jnp.zeros((2, 10))
  cfg = U.GRPOConfig(group_size=2, beta=0.0, aggregation='token_mean', overlong_penalty=1.0, overlong_buffer=4)
  num, st = _obj(cfg, z, z, jnp.zeros(2), mask)
  assert num == pytest.approx(2.5, abs=1e-6)
  assert (st['overlong_sum'], st['overlong_rows']) == (-1.0, 1.0)
  num_off, _ = _obj(U.GRPOConfig(group_size=2, beta=0.0, aggregation='token_mean'), z, z, jnp.zeros(2), mask)
  assert num_off == 0.0


def test_grpo_objective_tis_weights_the_surrogate():
  # Ratio 1 (logp = old), A = 1: token loss -1 each, weighted by min(pi_old / pi_sampler, 1.5) = 1.5 and 0.5.
  old = jnp.log(jnp.array([[0.5, 0.2]]))
  sampler = jnp.log(jnp.array([[0.25, 0.4]]))
  cfg = U.GRPOConfig(group_size=1, beta=0.0, aggregation='token_sum', tis_cap=1.5)
  num, st = _obj(cfg, old, old, jnp.ones(1), jnp.ones((1, 2)), sampler_logp_BN=sampler)
  assert num == pytest.approx(-2.0, abs=1e-6)
  assert st['tis_sum'] == pytest.approx(2.0) and st['tis_capped_sum'] == 1.0
  assert st['mismatch_sum'] == pytest.approx(2 * math.log(2), rel=1e-6)
  with pytest.raises(ValueError, match='needs sampler_logp_BN'):
    _obj(cfg, old, old, jnp.ones(1), jnp.ones((1, 2)))


def test_grpo_objective_mismatch_without_sampler_logp():
  # Without sampler_logp_BN the mismatch is |logp - old_logp|: 0 when they agree, as the fp32 sampler's do.
  logp = jnp.array([[-1.0, -2.0, -3.0]])
  mask = jnp.array([[1.0, 1.0, 0.0]])
  _, st = _obj(U.GRPOConfig(group_size=1, beta=0.0), logp, logp, jnp.ones(1), mask)
  assert st['mismatch_sum'] == 0.0
  _, st = _obj(U.GRPOConfig(group_size=1, beta=0.0), logp, logp + jnp.array([[0.1, -0.3, 5.0]]), jnp.ones(1), mask)
  assert st['mismatch_sum'] == pytest.approx(0.4, abs=1e-6)


@pytest.mark.parametrize('kw,match', [
    (dict(loss='ppo'), 'expected one of'),
    (dict(loss='gspo', aggregation='token_mean'), "expected aggregation='seq_mean_token_mean'"),
    (dict(loss='dr_grpo'), "expects aggregation='max_len_sum'"),
    (dict(loss='dr_grpo', aggregation='max_len_sum', adv_std_norm=True), 'adv_std_norm=False'),
    (dict(overlong_penalty=1.0), 'buffer >= 1'),
    (dict(overlong_penalty=1.0, overlong_buffer=8, adv_std_norm=True), 'mean-only advantage'),
    (dict(tis_cap=-1.0), 'tis_cap'),
])
def test_grpo_config_rejects_inconsistent_variants(kw, match):
  with pytest.raises(ValueError, match=match):
    U.GRPOConfig(**kw)


# ------------------------------------------------------------------------------- DAPO dynamic sampling


class _Draws:
  """A scripted ``draw(n)``: each group's rewards come from ``script`` in order; payloads are the group ids."""

  def __init__(self, script):
    self.script, self.pos, self.calls = script, 0, []

  def __call__(self, n):
    self.calls.append(n)
    rows = self.script[self.pos:self.pos + n]
    ids = list(range(self.pos, self.pos + n))
    self.pos += n
    return ids, np.asarray(rows, np.float32)


def test_refill_keeps_the_batch_size_and_counts_the_drops():
  # target 3: the first draw (groups 0-2) has one informative group; the refill draws 2 (3, 4: one informative),
  # then 1 (5: informative). 3 zero-variance groups dropped, 6 drawn in 3 draws.
  script = [[1, 1], [0, 1], [0, 0], [1, 1], [1, 0], [0.5, 0.0], [0, 1]]
  d = _Draws(script)
  r = algo.dynamic_sampling_refill(d, 3, max_draws=5)
  assert d.calls == [3, 2, 1]
  assert r.groups == [1, 4, 5] and r.rewards_PG.shape == (3, 2)
  np.testing.assert_array_equal(r.rewards_PG, [[0, 1], [1, 0], [0.5, 0.0]])
  assert (r.drawn, r.dropped, r.filler, r.surplus, r.draws) == (6, 3, 0, 0, 3)
  assert r.informative.tolist() == [True, True, True]
  assert r.metrics()['dynamic_sampling/dropped'] == 3.0


def test_refill_with_full_batch_draws_counts_the_surplus():
  # Static shapes: every draw is a whole batch of 3. Draw 1 (groups 0-2): one informative (1). Draw 2 (3-5): all
  # three informative (3, 4, 5) -> 4 informative for a target of 3: group 5 is surplus; 2 dropped.
  script = [[1, 1], [0, 1], [0, 0], [1, 0], [0.5, 0.0], [0, 1]]
  pos = {'i': 0}

  def draw(n):
    i = pos['i']
    pos['i'] += 3
    return list(range(i, i + 3)), np.asarray(script[i:i + 3], np.float32)

  r = algo.dynamic_sampling_refill(draw, 3, max_draws=4)
  assert r.groups == [1, 3, 4] and len(r.rewards_PG) == 3
  assert (r.drawn, r.dropped, r.filler, r.surplus, r.draws) == (6, 2, 0, 1, 2)


def test_refill_cap_fills_with_zero_variance_groups():
  # Every group solved: after max_draws=2 draws (3 + 3 groups) none is informative; the batch still has 3 groups,
  # the earliest zero-variance ones, marked as filler.
  d = _Draws([[1, 1]] * 10)
  r = algo.dynamic_sampling_refill(d, 3, max_draws=2)
  assert d.calls == [3, 3]
  assert r.groups == [0, 1, 2] and r.informative.tolist() == [False] * 3
  assert (r.drawn, r.dropped, r.filler, r.surplus, r.draws) == (6, 3, 3, 0, 2)


def test_refill_no_drop_needed_and_bad_draws():
  r = algo.dynamic_sampling_refill(_Draws([[0, 1], [1, 0]]), 2, max_draws=1)
  assert (r.groups, r.drawn, r.dropped, r.draws) == ([0, 1], 2, 0, 1)
  with pytest.raises(ValueError, match=r'draw\(2\) returned 0 groups'):
    algo.dynamic_sampling_refill(lambda n: ([], np.zeros((0, 2))), 2, max_draws=1)
  with pytest.raises(ValueError, match='cannot fill 2'):
    algo.dynamic_sampling_refill(lambda n: ([0], np.zeros((1, 2))), 2, max_draws=1)
  with pytest.raises(ValueError, match='target >= 1'):
    algo.dynamic_sampling_refill(_Draws([]), 0, max_draws=1)
