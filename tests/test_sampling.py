"""The compiled sampler on the tiny parity checkpoints: greedy == transformers ``generate`` (images, prompts of
different lengths), log-probs == a teacher-forced forward, shared prefill == separate prefills, the sampled
distribution, stops, padding rows, LoRA, a sharded mesh, no retrace within a bucket, and input errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from scipy import stats

from medad_jax.model.checkpoint import load_checkpoint
from medad_jax.model.rope_index import rope_index
from medad_jax.model.vision import vision_meta
from medad_jax.sampling import SamplingConfig, ops, prepare_prompts, sample, trace_counts
from medad_jax.sampling import sampler as sampler_lib

# (text tokens after the image, image grid (t, h, w) in patches) per prompt: different lengths and image sizes.
PROMPTS = ((3, (1, 4, 4)), (9, (1, 6, 4)), (6, (1, 4, 8)))
# Every test decodes N tokens from 3-prompt batches where it can, so compiled programs are shared between tests.
N = 12


def greedy(cfg, stops=None, **kw):
  """Greedy decoding stopping on the config's EOS ids (or ``stops``)."""
  return SamplingConfig(max_new_tokens=N, greedy=True, stop_token_ids=cfg.eos_token_ids if stops is None else stops,
                        **kw)


def sampled(cfg):
  """Temperature + top-k + top-p sampling, stopping on EOS: the sampling and policy distributions differ."""
  return SamplingConfig(max_new_tokens=N, temperature=1.3, top_k=12, top_p=0.8, stop_token_ids=cfg.eos_token_ids)


def _prompts(cfg, specs=PROMPTS, seed=0):
  """Left-padded processor-style inputs: ``(ids[P, T], mask[P, T], pixel_values[L, C], grids, pixels per prompt)``."""
  rng = np.random.default_rng(seed)
  rows, pixels, grids = [], [], []
  for n_text, grid in specs:
    n_img = int(np.prod(grid)) // cfg.vision.spatial_merge_size**2
    rows.append([1, cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
                + rng.integers(0, cfg.text.vocab_size - 8, n_text).tolist())
    pixels.append(rng.normal(size=(int(np.prod(grid)), cfg.vision.patch_dim)).astype(np.float32))
    grids.append(list(grid))
  T = max(map(len, rows))
  ids = np.full((len(rows), T), cfg.pad_token_id, np.int64)
  mask = np.zeros((len(rows), T), np.int64)
  for i, r in enumerate(rows):
    ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
  return ids, mask, np.concatenate(pixels), np.array(grids), pixels


@pytest.fixture(scope='module')
def models(tiny_hf_checkpoints):
  """{name: (cfg, our model, torch model)}; the fixture's config keeps the in-vocabulary pad / eos ids."""
  return {name: (cfg, load_checkpoint(path, cfg=cfg)[0], tm) for name, (cfg, path, tm) in tiny_hf_checkpoints.items()}


@functools.partial(jax.jit, static_argnames='graphdef')
def _forward_jit(graphdef, state, ids, mask, positions, pixels, meta):
  return nnx.merge(graphdef, state)(ids, attention_mask_BT=mask, positions_3BT=positions, pixel_values=pixels,
                                    vision_meta=meta)[0]


def _forward(model, cfg, ids, mask, pixels, grids):
  """Full forward without a cache (positions from ``rope_index``) -> logits ``[B, T, V]`` (numpy)."""
  pos, _ = rope_index(cfg, ids, mask, grids)
  graphdef, state = nnx.split(model)
  return np.asarray(_forward_jit(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos),
                                 jnp.asarray(pixels), vision_meta(grids, cfg.vision)))


def _batch(cfg, specs=PROMPTS, seed=0, **kw):
  ids, mask, pix, grids, _ = _prompts(cfg, specs, seed)
  return prepare_prompts(cfg, ids, attention_mask=mask, pixel_values=pix, image_grid_thw=grids, **kw)


def _hf_generate(tm, cfg, ids, mask, pix, grids, n, eos):
  with torch.no_grad():
    out = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      pixel_values=torch.tensor(pix), image_grid_thw=torch.tensor(grids),
                      mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64)),
                      max_new_tokens=n, do_sample=False, eos_token_id=list(eos), pad_token_id=cfg.pad_token_id)
  return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize('name', ['untied_gqa2_win56', 'tied_gqa4_win112'])
def test_greedy_matches_transformers_generate(models, name):
  cfg, model, tm = models[name]
  ids, mask, pix, grids, _ = _prompts(cfg)
  batch = prepare_prompts(cfg, ids, attention_mask=mask, pixel_values=pix, image_grid_thw=grids)
  run = lambda stops: sample(model, batch, key=jax.random.key(0), num_samples=1,  # noqa: E731
                             config=greedy(cfg, stops))
  free = run(None)
  hf = _hf_generate(tm, cfg, ids, mask, pix, grids, N, cfg.eos_token_ids)
  np.testing.assert_array_equal(np.asarray(free.tokens_BN)[:, :hf.shape[1]], hf)
  # Now a stop token that row 0 emits mid-way: row 0 must stop there and pad afterwards, as transformers does.
  stop = int(np.asarray(free.tokens_BN)[0, 4])
  got = run((stop,))
  hf = _hf_generate(tm, cfg, ids, mask, pix, grids, N, (stop,))
  toks = np.asarray(got.tokens_BN)
  np.testing.assert_array_equal(toks[:, :hf.shape[1]], hf)
  assert (toks[:, hf.shape[1]:] == cfg.pad_token_id).all()
  reasons = got.finish_reasons()
  assert reasons[0] == 'stop_token' and int(got.lengths_B[0]) <= 5 and 'length' in reasons
  lengths = np.asarray(got.lengths_B)
  np.testing.assert_array_equal(np.asarray(got.completion_mask_BN), np.arange(N)[None] < lengths[:, None])
  assert (toks[np.arange(3), lengths - 1][np.array(reasons) == 'stop_token'] == stop).all()


def _teacher_forced_logits(model, cfg, specs, rollout, G, seed=0):
  """Logits that predict each completion token, from one full forward (no cache) over prompt + completion, with
  positions from ``rope_index`` over the whole sequence: ``[B, N, V]``."""
  ids, mask, _, grids, pixels = _prompts(cfg, specs, seed)
  rep = lambda a: np.repeat(a, G, axis=0)  # noqa: E731
  toks = np.asarray(rollout.tokens_BN)
  cmask = np.asarray(rollout.completion_mask_BN)
  full_ids = np.concatenate([rep(ids), np.where(cmask, toks, 0)], 1)
  full_mask = np.concatenate([rep(mask), cmask.astype(np.int64)], 1)
  grid_rep = rep(grids)
  pix_rep = np.concatenate([pixels[b // G] for b in range(len(specs) * G)])
  logits = _forward(model, cfg, full_ids, full_mask, pix_rep, grid_rep)
  T, N = ids.shape[1], toks.shape[1]
  return logits[:, T - 1:T + N - 1]


def test_log_probs_equal_teacher_forced_forward_and_filters_hold(models):
  cfg, model, _ = models['untied_gqa2_win56']
  G, config = 4, sampled(cfg)
  r = sample(model, _batch(cfg), key=jax.random.key(3), config=config, num_samples=G)
  logits = _teacher_forced_logits(model, cfg, PROMPTS, r, G)
  toks, cmask = np.asarray(r.tokens_BN), np.asarray(r.completion_mask_BN)
  assert cmask.sum() > 0.5 * cmask.size
  want_policy = np.take_along_axis(jax.nn.log_softmax(logits), toks[..., None], -1)[..., 0]
  filt = np.asarray(ops.sampling_logits(jnp.asarray(logits.reshape(-1, logits.shape[-1])), config)).reshape(
      logits.shape)
  want_sampling = np.take_along_axis(jax.nn.log_softmax(filt), toks[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(r.policy_logprobs_BN)[cmask], want_policy[cmask], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(r.sampling_logprobs_BN)[cmask], want_sampling[cmask], atol=1e-4, rtol=0)
  assert (np.asarray(r.policy_logprobs_BN)[~cmask] == 0).all()
  # The two differ (temperature + truncation), so the test tells them apart.
  assert np.abs(want_policy - want_sampling)[cmask].min() > 1e-3
  # top-k / top-p: every sampled token is inside the filtered set of the teacher-forced logits.
  chosen = np.take_along_axis(filt, toks[..., None], -1)[..., 0]
  assert np.isfinite(chosen[cmask]).all()
  kth = np.sort(logits, -1)[..., -config.top_k]
  assert (np.take_along_axis(logits, toks[..., None], -1)[..., 0][cmask] >= kth[cmask]).all()


def test_next_token_frequencies_follow_softmax_over_temperature(models):
  cfg, model, _ = models['untied_gqa2_win56']
  G, temp = 1400, 0.8
  r = sample(model, _batch(cfg), key=jax.random.key(11), num_samples=G,
             config=SamplingConfig(max_new_tokens=N, temperature=temp))
  first_PG = np.asarray(r.tokens_BN)[:, 0].reshape(len(PROMPTS), G)
  # Reference logits from an independent full forward (no cache) of the prompts.
  ids, mask, pix, grids, _ = _prompts(cfg)
  logits_PV = _forward(model, cfg, ids, mask, pix, grids)[:, -1].astype(np.float64)

  def pvalue(t):
    """Chi-square over all prompts (statistics and degrees of freedom add); rare tokens pooled per prompt."""
    chi2, dof = 0.0, 0
    for p in range(len(PROMPTS)):
      x = logits_PV[p] / t
      probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
      counts = np.bincount(first_PG[p], minlength=probs.size)
      big = probs * G >= 5
      obs = np.append(counts[big], counts[~big].sum())
      exp = np.append(probs[big], probs[~big].sum()) * G
      chi2 += float(((obs - exp) ** 2 / exp).sum())
      dof += obs.size - 1
    return stats.chi2.sf(chi2, dof)

  assert all(len(np.unique(f)) > 10 for f in first_PG)
  assert pvalue(temp) > 1e-3
  assert pvalue(1.0) < 1e-6  # the untempered distribution is rejected: the test has power


def test_shared_prefill_equals_separate_prefills(models):
  cfg, model, _ = models['untied_gqa2_win56']
  G, config = 4, sampled(cfg)
  shared = sample(model, _batch(cfg), key=jax.random.key(5), config=config, num_samples=G)
  # Every prompt written out G times and prefilled separately: B = P*G prefills, G = 1 each.
  ids, mask, _, grids, pixels = _prompts(cfg)
  rep = lambda a: np.repeat(a, G, axis=0)  # noqa: E731
  sep_batch = prepare_prompts(cfg, rep(ids), attention_mask=rep(mask), image_grid_thw=rep(grids),
                              pixel_values=np.concatenate([pixels[b // G] for b in range(len(PROMPTS) * G)]))
  separate = sample(model, sep_batch, key=jax.random.key(5), config=config, num_samples=1)
  np.testing.assert_array_equal(shared.tokens_BN, separate.tokens_BN)
  np.testing.assert_array_equal(shared.lengths_B, separate.lengths_B)
  np.testing.assert_array_equal(shared.finish_reason_B, separate.finish_reason_B)
  np.testing.assert_allclose(shared.policy_logprobs_BN, separate.policy_logprobs_BN, atol=1e-5, rtol=0)
  np.testing.assert_allclose(shared.sampling_logprobs_BN, separate.sampling_logprobs_BN, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(shared.prompt_index_B, np.arange(len(PROMPTS) * G) // G)
  # The G samples of one prompt differ from each other (they share the prefix, not the randomness).
  toks = np.asarray(shared.tokens_BN).reshape(len(PROMPTS), G, -1)
  assert all(len({tuple(t) for t in toks[p]}) > 1 for p in range(len(PROMPTS)))
  # Same key, same rollout; another key, another rollout.
  again = sample(model, _batch(cfg), key=jax.random.key(5), config=config, num_samples=G)
  np.testing.assert_array_equal(shared.tokens_BN, again.tokens_BN)
  other = sample(model, _batch(cfg), key=jax.random.key(6), config=config, num_samples=G)
  assert (np.asarray(other.tokens_BN) != np.asarray(shared.tokens_BN)).any()


def test_no_retrace_for_a_new_batch_in_the_same_bucket(models):
  cfg, model, _ = models['tied_gqa4_win112']
  config = sampled(cfg)
  sample(model, _batch(cfg), key=jax.random.key(0), config=config, num_samples=4)
  before = trace_counts()
  # Other prompt lengths, other image grids (same buckets), another key, and new parameter values.
  other = ((12, (1, 8, 8)), (2, (1, 2, 6)), (7, (1, 4, 4)))
  model2 = load_checkpoint_like(model, scale=1.01)
  shapes = set()
  for m, specs, seed in ((model, other, 1), (model2, PROMPTS, 2)):
    b = _batch(cfg, specs, seed)
    shapes.add((b.input_ids_PT.shape, b.pixel_values_ILC.shape))
    jax.block_until_ready(sample(m, b, key=jax.random.key(seed), config=config, num_samples=4))
  assert shapes == {((3, 32), (3, 64, cfg.vision.patch_dim))}
  assert trace_counts() == before
  # The counter does see compiles: another group size traces a new decode (the prefill is reused).
  sample(model, _batch(cfg), key=jax.random.key(0), config=config, num_samples=2)
  after = trace_counts()
  assert after['prefill'] == before['prefill'] and after['decode'] == before['decode'] + 1


def load_checkpoint_like(model, scale):
  """A copy of ``model`` with every parameter multiplied by ``scale`` (same graph, new values)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x * scale, state))


def _first_stop(row, stop_tokens, stop_seqs, N):
  """Expected (length, reason) of one row, scanned on the host from an unconstrained completion."""
  for i in range(N):
    if row[i] in stop_tokens:
      return i + 1, 'stop_token'
    if any(i + 1 >= len(s) and tuple(row[i + 1 - len(s):i + 1]) == s for s in stop_seqs):
      return i + 1, 'stop_sequence'
  return N, 'length'


def test_stop_tokens_stop_sequences_and_early_exit(models):
  cfg, model, _ = models['untied_gqa2_win56']
  batch = _batch(cfg)
  free_r = sample(model, batch, key=jax.random.key(0), config=greedy(cfg), num_samples=1)
  assert free_r.finish_reasons() == ['length'] * 3  # so it is the unconstrained greedy completion
  free = np.asarray(free_r.tokens_BN)
  # A two-token stop sequence from row 0 and stop tokens from rows 1, 2: every row stops before N.
  seq = (int(free[0, 6]), int(free[0, 7]))
  stop_tokens = (int(free[1, 9]), int(free[2, 3])) + cfg.eos_token_ids
  r = sample(model, batch, key=jax.random.key(0), config=greedy(cfg, stop_tokens, stop_sequences=(seq,)),
             num_samples=1)
  expected = [_first_stop(free[b].tolist(), stop_tokens, (seq,), N) for b in range(3)]
  lengths = np.asarray(r.lengths_B)
  assert [(int(n), why) for n, why in zip(lengths, r.finish_reasons())] == expected
  assert 'stop_sequence' in r.finish_reasons() and 'stop_token' in r.finish_reasons()
  toks = np.asarray(r.tokens_BN)
  for b, (n, _) in enumerate(expected):
    np.testing.assert_array_equal(toks[b, :n], free[b, :n])
    assert (toks[b, n:] == cfg.pad_token_id).all()
  assert int(r.num_steps) == max(n for n, _ in expected) < N  # the loop exits once every row is done


def test_padding_prompts_start_done_and_leave_real_rows_unchanged(models):
  cfg, model, _ = models['untied_gqa2_win56']
  config = sampled(cfg)
  plain = sample(model, _batch(cfg), key=jax.random.key(9), config=config, num_samples=4)
  padded = sample(model, _batch(cfg, num_prompts=5), key=jax.random.key(9), config=config, num_samples=4)
  np.testing.assert_array_equal(np.asarray(padded.tokens_BN)[:12], plain.tokens_BN)
  np.testing.assert_allclose(np.asarray(padded.policy_logprobs_BN)[:12], plain.policy_logprobs_BN, atol=1e-5,
                             rtol=0)
  assert padded.finish_reasons()[12:] == ['masked'] * 8
  assert (np.asarray(padded.lengths_B)[12:] == 0).all() and not np.asarray(padded.completion_mask_BN)[12:].any()


def test_lora_adapters_on_and_off(models, tiny_hf_checkpoints):
  from medad_jax.model.lora import LoraConfig, apply_lora, merge_lora
  cfg, base, _ = models['untied_gqa2_win56']
  path = tiny_hf_checkpoints['untied_gqa2_win56'][1]
  adapted = load_checkpoint(path, cfg=cfg)[0]
  apply_lora(adapted, LoraConfig(rank=4, alpha=8.0))
  rng = np.random.default_rng(0)
  for _, m in nnx.iter_modules(adapted):
    if getattr(m, 'lora_b', None) is not None:  # B = 0 at init would make the adapters a no-op
      m.lora_b.set_value(jnp.asarray(rng.normal(size=m.lora_b.shape).astype(np.float32) * 0.2))
  merged = load_checkpoint_like(adapted, 1.0)
  merge_lora(merged)
  config = greedy(cfg)
  batch = _batch(cfg)
  run = lambda m, **kw: sample(m, batch, key=jax.random.key(0), config=config, num_samples=1, **kw)  # noqa: E731
  on, off = run(adapted), run(adapted, adapters=False)
  ref_on, ref_off = run(merged), run(base)
  np.testing.assert_array_equal(on.tokens_BN, ref_on.tokens_BN)
  np.testing.assert_allclose(on.policy_logprobs_BN, ref_on.policy_logprobs_BN, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(off.tokens_BN, ref_off.tokens_BN)
  np.testing.assert_array_equal(off.policy_logprobs_BN, ref_off.policy_logprobs_BN)  # adapters off is bit-exact
  assert (np.asarray(on.tokens_BN) != np.asarray(off.tokens_BN)).any()  # the adapters do change the policy


def test_sharded_mesh_gives_the_single_device_rollout(models, tiny_hf_checkpoints):
  from medad_jax.sharding import make_mesh, shard_model
  cfg, model, _ = models['tied_gqa4_win112']
  specs = PROMPTS + ((5, (1, 2, 2)), (1, (1, 4, 2)), (4, (1, 2, 8)), (8, (1, 2, 4)), (2, (1, 6, 2)))
  config = sampled(cfg)
  batch = _batch(cfg, specs)
  single = sample(model, batch, key=jax.random.key(4), config=config, num_samples=2)
  mesh = make_mesh(data=2, fsdp=4)
  sharded_model = shard_model(load_checkpoint(tiny_hf_checkpoints['tied_gqa4_win112'][1], cfg=cfg)[0], mesh)
  r = sample(sharded_model, batch, key=jax.random.key(4), config=config, num_samples=2, mesh=mesh)
  assert len(r.tokens_BN.sharding.device_set) == 8
  np.testing.assert_array_equal(r.tokens_BN, single.tokens_BN)
  np.testing.assert_allclose(r.policy_logprobs_BN, single.policy_logprobs_BN, atol=1e-4, rtol=0)


def test_bad_inputs_get_clear_errors(models):
  cfg = models['untied_gqa2_win56'][0]
  ids, mask, pix, grids, _ = _prompts(cfg)
  with pytest.raises(ValueError, match='prompt length .* exceeds the largest bucket 8'):
    prepare_prompts(cfg, ids, attention_mask=mask, pixel_values=pix, image_grid_thw=grids, length_buckets=(8,))
  with pytest.raises(ValueError, match='pixel_values has 71 patches but image_grid_thw'):
    prepare_prompts(cfg, ids, attention_mask=mask, pixel_values=pix[:-1], image_grid_thw=grids)
  with pytest.raises(ValueError, match=r'prompt 1: token ids span .*expected ids in \[0, 512\)'):
    prepare_prompts(cfg, [[1, 2], [3, 9999]])
  with pytest.raises(ValueError, match='prompt 0 has no real tokens'):
    prepare_prompts(cfg, np.ones((2, 4), np.int32), attention_mask=np.array([[0, 0, 0, 0], [1, 1, 1, 1]]))
  with pytest.raises(ValueError, match='prompt 0: token ids have dtype float64; expected integers'):
    prepare_prompts(cfg, np.ones((2, 4)))
  with pytest.raises(ValueError, match=r'image patches per image = 32 exceeds the largest bucket 16'):
    prepare_prompts(cfg, ids, attention_mask=mask, pixel_values=pix, image_grid_thw=grids, patch_buckets=(16,))
  with pytest.raises(ValueError, match=r'input_ids hold 4 image tokens .* gives 18'):
    # prompt 0 alone (4 image tokens) with grids for 16 + 56 = 72 patches (4 + 14 image tokens)
    prepare_prompts(cfg, [ids[0][mask[0] == 1]], pixel_values=pix, image_grid_thw=[[1, 4, 4], [1, 4, 14]])
  with pytest.raises(ValueError, match='pad_token_id=151643 is outside the vocabulary'):
    prepare_prompts(cfg.replace(pad_token_id=151643), [[1, 2]])
  with pytest.raises(ValueError, match='num_prompts=2 is smaller than the 3 prompts'):
    prepare_prompts(cfg, ids, attention_mask=mask, pixel_values=pix, image_grid_thw=grids, num_prompts=2)
  with pytest.raises(ValueError, match='pixel_values and image_grid_thw must be given together'):
    prepare_prompts(cfg, ids, attention_mask=mask, pixel_values=pix)


def test_shared_prefix_attention_equals_attention_over_repeated_prefix():
  from medad_jax.model.text import attention
  rng = np.random.default_rng(0)
  P, G, K, J, H, R, T, S = 2, 3, 2, 2, 8, 5, 2, 4
  B = P * G
  f = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))  # noqa: E731
  q, pk, pv, sk, sv = f(B, T, K * J, H), f(P, K, R, H), f(P, K, R, H), f(B, K, S, H), f(B, K, S, H)
  pmask = jnp.asarray(np.array([[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]], bool))
  own = jnp.asarray(rng.random((B, T, S)) < 0.7)
  got = attention(q, sk, sv, own, prefix=(pk, pv, pmask))
  # Reference: the prompt keys repeated G times next to the own keys, one dot_product_attention.
  to_bskh = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # noqa: E731
  k = jnp.concatenate([jnp.repeat(to_bskh(pk), G, 0), to_bskh(sk)], 1)
  v = jnp.concatenate([jnp.repeat(to_bskh(pv), G, 0), to_bskh(sv)], 1)
  mask = jnp.concatenate([jnp.broadcast_to(jnp.repeat(pmask, G, 0)[:, None], (B, T, R)), own], 2)
  want = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=H**-0.5, implementation='xla')
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@functools.partial(jax.jit, static_argnames=('graphdef', 'G'))
def _group_vs_repeated(graphdef, state, b, tokens_SB, *, G):
  """Logits of ``len(tokens_SB)`` decode steps through the sampler's shared-prefix step and through text.py's
  prompt cache repeated G times."""
  from medad_jax.model.qwen25vl import continuation_positions
  from medad_jax.model.text import repeat_cache
  model = nnx.merge(graphdef, state)
  P, T = b.input_ids_PT.shape
  steps, B = tokens_SB.shape
  x_PTD = sampler_lib.embed_prompts(model, b.input_ids_PT, b.pixel_values_ILC, b.vision_meta_I, b.image_src_PT)
  kw = dict(attention_mask_BT=b.attention_mask_PT, positions_3BT=b.positions_3PT, cache_index=0)
  _, prefix = model.model(x_PTD, return_kv=True, attention_mask_BT=b.attention_mask_PT,
                          positions_3BT=b.positions_3PT)
  _, ref_cache = model.model(x_PTD, cache=model.init_cache(P, T + steps), **kw)
  ref_cache = repeat_cache(ref_cache, G)
  own = model.init_cache(P * G, steps)
  deltas_B = jnp.repeat(b.rope_deltas_P, G)
  got, want = [], []
  for n in range(steps):
    logits, own = sampler_lib.decode_step(model, tokens_SB[n], jnp.int32(n), deltas_B, prefix, own)
    got.append(logits)
    logits, ref_cache = model(tokens_SB[n][:, None], attention_mask_BT=jnp.ones((B, 1), jnp.int32), cache=ref_cache,
                              positions_3BT=continuation_positions(T + n, deltas_B), cache_index=T + n)
    want.append(logits[:, 0])
  return jnp.stack(got), jnp.stack(want)


@pytest.mark.parametrize('name', ['untied_gqa2_win56', 'tied_gqa4_win112'])
def test_group_decode_step_equals_the_model_cached_step(models, name):
  """Three decode steps: shared-prefix cache vs text.py's cache repeated G times, same tokens."""
  cfg, model, _ = models[name]
  G, b = 2, _batch(cfg)
  tokens = np.random.default_rng(1).integers(0, cfg.text.vocab_size - 8, (3, b.num_prompts * G)).astype(np.int32)
  graphdef, state = nnx.split(model)
  got, want = _group_vs_repeated(graphdef, state, jax.device_put(b), jnp.asarray(tokens), G=G)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_text_only_prompts_match_the_model_greedy_loop(models):
  from medad_jax.model.qwen25vl import greedy_generate
  cfg, model, _ = models['untied_gqa2_win56']
  rng = np.random.default_rng(7)
  rows = [rng.integers(0, cfg.text.vocab_size - 8, n).tolist() for n in (5, 11, 8)]
  batch = prepare_prompts(cfg, rows)
  assert batch.pixel_values_ILC is None and (batch.image_src_PT == -1).all()
  r = sample(model, batch, key=jax.random.key(0), config=greedy(cfg), num_samples=1)
  ref = greedy_generate(model, {'input_ids': batch.input_ids_PT, 'attention_mask': batch.attention_mask_PT}, N)
  np.testing.assert_array_equal(r.tokens_BN, ref)


@pytest.mark.parametrize('name', ['untied_gqa2_win56', 'tied_gqa4_win112'])
def test_decode_scan_gives_the_per_layer_loops_rollout(models, tiny_hf_checkpoints, name):
  """``decode_scan`` (the layers as one scan in the decode loop) samples what the per-layer loop samples."""
  cfg, model, _ = models[name]
  scanned = load_checkpoint(tiny_hf_checkpoints[name][1], cfg=cfg.replace(decode_scan=True))[0]
  assert scanned.model.decode_scan and not model.model.decode_scan
  batch, config = _batch(cfg), sampled(cfg)
  want = sample(model, batch, key=jax.random.key(3), config=config, num_samples=2)
  got = sample(scanned, batch, key=jax.random.key(3), config=config, num_samples=2)
  np.testing.assert_array_equal(got.tokens_BN, want.tokens_BN)
  np.testing.assert_array_equal(got.lengths_B, want.lengths_B)
  np.testing.assert_allclose(got.policy_logprobs_BN, want.policy_logprobs_BN, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got.sampling_logprobs_BN, want.sampling_logprobs_BN, atol=1e-5, rtol=0)
  # the model's own greedy loop (cache without a shared prefix, prefill written into the cache) too
  from medad_jax.model.qwen25vl import greedy_generate
  rows = [np.random.default_rng(7).integers(0, cfg.text.vocab_size - 8, n).tolist() for n in (5, 11)]
  tb = prepare_prompts(cfg, rows)
  inputs = {'input_ids': tb.input_ids_PT, 'attention_mask': tb.attention_mask_PT}
  np.testing.assert_array_equal(greedy_generate(scanned, inputs, N), greedy_generate(model, inputs, N))


def test_decode_scan_keeps_one_layers_fp32_weights_on_xla_cpu():
  """bf16 weights on XLA:CPU (no bf16 matmul): the per-layer decode loop holds an fp32 copy of every decoder
  weight for the whole loop; the scan holds one layer's. Read in XLA's memory analysis of the compiled decode of
  the ``small`` preset (abstract weights: nothing allocated)."""
  from medad_jax.model.config import Qwen25VLConfig
  from medad_jax.model.qwen25vl import Qwen25VL
  from medad_jax.plan import prompt_batch
  if jax.default_backend() != 'cpu':
    pytest.skip(f'XLA:CPU memory figure; backend is {jax.default_backend()}')
  temps = {}
  for scan in (False, True):
    cfg = Qwen25VLConfig.preset('small').replace(dtype='bfloat16', param_dtype='bfloat16', decode_scan=scan)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0))))  # noqa: B023
    pb = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), prompt_batch(cfg, 1, 32, 4))
    absd = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), t)  # noqa: E731
    state = absd(state)
    cache, logits = jax.eval_shape(lambda *a: sampler_lib.prefill(graphdef, *a), state, pb.input_ids_PT,  # noqa: B023
                                   pb.attention_mask_PT, pb.positions_3PT, pb.pixel_values_ILC, pb.vision_meta_I,
                                   pb.image_src_PT)
    compiled = sampler_lib.decode.lower(graphdef, state, cache, logits, pb.rope_deltas_P, pb.done_P,
                                        jax.ShapeDtypeStruct((2,), jnp.uint32), None,
                                        config=SamplingConfig(max_new_tokens=8), num_samples=2).compile()
    temps[scan] = compiled.memory_analysis().temp_size_in_bytes
  layers = Qwen25VLConfig.preset('small').text
  decoder_fp32 = 4 * layers.num_layers * (4 * layers.hidden_size**2 + 3 * layers.hidden_size * layers.intermediate_size)
  # The loop keeps (about) the whole decoder in fp32; the scan saves at least half of that.
  assert temps[False] - temps[True] > 0.5 * decoder_fp32, (temps, decoder_fp32)
