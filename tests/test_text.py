"""Text decoder parity with transformers (M-RoPE cos/sin, one decoder layer, the whole decoder with padding) and
KV-cache consistency (prefill + decode == one full forward; repeat over batch; masked slots never attended)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from medad_jax.model import text as text_lib
from medad_jax.model.checkpoint import load_hf_tensors

TOL_MODULE = 1e-5  # fp32, one module
TOL_MODEL = 1e-4   # fp32, a whole stack


def _tensors(torch_model):
  return {k: v.numpy() for k, v in torch_model.state_dict().items()}


def _text_model(cfg, torch_model):
  model = text_lib.TextModel(cfg.text, rngs=nnx.Rngs(0))
  return load_hf_tensors(model, _tensors(torch_model))


def _mrope_positions(rng, B, T, max_pos=300):
  """Three *different* position rows (like image tokens), so every M-RoPE section is exercised."""
  return rng.integers(0, max_pos, size=(3, B, T)).astype(np.int64)


def _pad_mask(lengths, T, left=True):
  mask = np.zeros((len(lengths), T), np.int64)
  for b, n in enumerate(lengths):
    if left:
      mask[b, T - n:] = 1
    else:
      mask[b, :n] = 1
  return mask


def _text_positions(mask):
  """1-D positions of real tokens (as generate makes them), pads 0; all three rows equal."""
  pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
  return np.broadcast_to(pos[None], (3, *pos.shape)).copy()


@pytest.mark.parametrize('name', ['untied_gqa2_win56', 'tied_gqa4_win112'])
def test_mrope_cos_sin_match_transformers(tiny_hf_checkpoints, name):
  cfg, _, hf = tiny_hf_checkpoints[name]
  pos = _mrope_positions(np.random.default_rng(0), 2, 13, max_pos=4000)
  x = torch.zeros(2, 13, cfg.text.hidden_size)
  with torch.no_grad():
    cos_ref, sin_ref = hf.model.language_model.rotary_emb(x, torch.tensor(pos))
  model = text_lib.TextModel(cfg.text, rngs=nnx.Rngs(0))
  cos, sin = model.rotary(jnp.asarray(pos))
  assert cos.shape == tuple(cos_ref.shape) == (2, 13, cfg.text.head_dim)
  np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), rtol=0, atol=TOL_MODULE)
  np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), rtol=0, atol=TOL_MODULE)


def test_mrope_sections_pick_rows():
  # head_dim 16 -> 8 frequencies split (2, 3, 3): rows t, t, h, h, h, w, w, w.
  np.testing.assert_array_equal(text_lib.mrope_row_of_freq((2, 3, 3), 16), [0, 0, 1, 1, 1, 2, 2, 2])
  # With 4 sections the 4th wraps to row 0, as in transformers (i % 3).
  np.testing.assert_array_equal(text_lib.mrope_row_of_freq((1, 1, 1, 1), 8), [0, 1, 2, 0])
  with pytest.raises(ValueError, match='sums to 7; expected head_dim/2 = 8'):
    text_lib.mrope_row_of_freq((2, 2, 3), 16)


@pytest.mark.parametrize('name', ['untied_gqa2_win56', 'tied_gqa4_win112'])
def test_decoder_layer_matches_transformers(tiny_hf_checkpoints, name):
  cfg, _, hf = tiny_hf_checkpoints[name]
  rng = np.random.default_rng(1)
  B, T = 2, 11
  x = rng.standard_normal((B, T, cfg.text.hidden_size)).astype(np.float32)
  pos = _mrope_positions(rng, B, T)
  hf_text = hf.model.language_model
  ours = _text_model(cfg, hf)
  cos, sin = ours.rotary(jnp.asarray(pos))
  mask = text_lib.attention_mask_BTS(jnp.ones((B, T), bool), jnp.arange(T))
  for i in range(cfg.text.num_layers):
    with torch.no_grad():
      pe = hf_text.rotary_emb(torch.tensor(x), torch.tensor(pos))
      # attention_mask=None: transformers' SDPA path is then plain causal attention.
      ref = hf_text.layers[i](torch.tensor(x), attention_mask=None, position_embeddings=pe).numpy()
    got, kv = ours.layers[i](jnp.asarray(x), cos, sin, mask)
    assert kv[0].shape == (B, cfg.text.num_kv_heads, T, cfg.text.head_dim)  # this call's keys, head-major
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=TOL_MODULE, err_msg=f'layer {i}')


@pytest.mark.parametrize('name', ['untied_gqa2_win56', 'tied_gqa4_win112'])
@pytest.mark.parametrize('left', [True, False], ids=['left_pad', 'right_pad'])
def test_text_model_matches_transformers_with_padding(tiny_hf_checkpoints, name, left):
  cfg, _, hf = tiny_hf_checkpoints[name]
  rng = np.random.default_rng(2)
  B, T = 3, 17
  mask = _pad_mask([17, 9, 13], T, left=left)
  x = rng.standard_normal((B, T, cfg.text.hidden_size)).astype(np.float32)
  pos = _mrope_positions(rng, B, T) * mask[None]
  with torch.no_grad():
    ref = hf.model.language_model(inputs_embeds=torch.tensor(x), attention_mask=torch.tensor(mask),
                                  position_ids=torch.tensor(pos)).last_hidden_state.numpy()
  got, cache = _text_model(cfg, hf)(jnp.asarray(x), attention_mask_BT=jnp.asarray(mask),
                                    positions_3BT=jnp.asarray(pos))
  assert cache is None
  valid = mask.astype(bool)
  err = np.abs(np.asarray(got) - ref)[valid].max()
  assert err <= TOL_MODEL, err
  if not left:
    return  # with right padding causality alone already hides the pads from every real token
  # The comparison is not vacuous: dropping the padding mask changes the real tokens' outputs by far more.
  unmasked, _ = _text_model(cfg, hf)(jnp.asarray(x), attention_mask_BT=jnp.ones((B, T), jnp.int32),
                                     positions_3BT=jnp.asarray(pos))
  assert np.abs(np.asarray(unmasked) - ref)[valid].max() > 100 * TOL_MODEL


def _decoder(name, tiny_hf_checkpoints):
  cfg, _, hf = tiny_hf_checkpoints[name]
  return cfg, _text_model(cfg, hf)


def _jitted(model):
  """The decoder as one jitted function (eager dispatch of the cache path is slow on CPU)."""
  @jax.jit
  def run(x, mask, pos, cache=None, index=0):
    return model(x, attention_mask_BT=mask, positions_3BT=pos, cache=cache, cache_index=index)
  return run


def test_kv_cache_prefill_then_decode_equals_full_forward(tiny_hf_checkpoints):
  cfg, model = _decoder('tied_gqa4_win112', tiny_hf_checkpoints)
  rng = np.random.default_rng(3)
  B, T0, n_new = 3, 9, 6
  T = T0 + n_new
  prompt_mask = _pad_mask([9, 4, 7], T0, left=True)
  mask = np.concatenate([prompt_mask, np.ones((B, n_new), np.int64)], axis=1)
  pos = _text_positions(mask)
  x = rng.standard_normal((B, T, cfg.text.hidden_size)).astype(np.float32)
  run = _jitted(model)
  full, _ = run(x, mask, pos)
  S = T + 3  # spare, never-written slots must not matter
  cache = text_lib.init_cache(cfg.text, B, S)
  h0, cache = run(x[:, :T0], mask[:, :T0], pos[:, :, :T0], cache, jnp.int32(0))
  steps = [h0]
  # Decode one token at a time, then a chunk of 2 (T > 1 on a partly filled cache is the same code path).
  for t in range(T0, T - 2):
    h, cache = run(x[:, t:t + 1], mask[:, t:t + 1], pos[:, :, t:t + 1], cache, jnp.int32(t))
    steps.append(h)
  h, cache = run(x[:, T - 2:], mask[:, T - 2:], pos[:, :, T - 2:], cache, jnp.int32(T - 2))
  steps.append(h)
  got = np.concatenate([np.asarray(s) for s in steps], axis=1)
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], np.asarray(full)[valid], rtol=0, atol=TOL_MODULE)
  np.testing.assert_array_equal(np.asarray(cache['mask']), np.concatenate([mask, np.zeros((B, 3))], 1) > 0)
  assert len(cache['k']) == cfg.text.num_layers
  assert cache['k'][0].shape == (B, cfg.text.num_kv_heads, S, cfg.text.head_dim)


def test_prefill_once_then_repeat_cache_for_group_samples(tiny_hf_checkpoints):
  cfg, model = _decoder('untied_gqa2_win56', tiny_hf_checkpoints)
  run = _jitted(model)
  rng = np.random.default_rng(4)
  B, T0, G = 2, 8, 3
  mask = _pad_mask([8, 5], T0)
  x = rng.standard_normal((B, T0, cfg.text.hidden_size)).astype(np.float32)
  _, cache = run(x, mask, _text_positions(mask), text_lib.init_cache(cfg.text, B, T0 + 1), 0)
  cache_G = text_lib.repeat_cache(cache, G)
  # G different next tokens per prompt, decoded on the broadcast cache ...
  x_new = rng.standard_normal((B * G, 1, cfg.text.hidden_size)).astype(np.float32)
  pos_new = np.repeat(mask.sum(1), G)[None, :, None].repeat(3, 0)
  got, _ = run(x_new, np.ones((B * G, 1), np.int32), pos_new, cache_G, T0)
  # ... equal a full forward of each repeated prompt followed by its own token.
  x_full = np.concatenate([np.repeat(x, G, 0), x_new], axis=1)
  mask_full = np.concatenate([np.repeat(mask, G, 0), np.ones((B * G, 1), np.int64)], axis=1)
  ref, _ = run(x_full, mask_full, _text_positions(mask_full))
  np.testing.assert_allclose(np.asarray(got)[:, 0], np.asarray(ref)[:, -1], rtol=0, atol=TOL_MODULE)


@pytest.mark.parametrize('name', ['untied_gqa2_win56', 'tied_gqa4_win112'])
def test_shared_prefix_equals_repeated_prompt(tiny_hf_checkpoints, name):
  """G continuations of several tokens each, teacher-forced against their prompt's keys/values as a shared
  ``prefix`` (never copied G times), equal a full forward of each repeated prompt followed by its continuation."""
  cfg, model = _decoder(name, tiny_hf_checkpoints)
  rng = np.random.default_rng(6)
  P, T0, G, N, D = 2, 8, 3, 4, cfg.text.hidden_size
  mask = _pad_mask([8, 5], T0)
  x = rng.standard_normal((P, T0, D)).astype(np.float32)
  cont_mask = np.ones((P * G, N), np.int64)
  cont_mask[1, 2:] = 0  # a finished row: its last tokens are padding
  x_new = rng.standard_normal((P * G, N, D)).astype(np.float32)
  prompt_pos = _text_positions(mask)

  @jax.jit
  def shared(x, mask, x_new, cont_mask):
    _, prefix = model(x, attention_mask_BT=mask, positions_3BT=prompt_pos, return_kv=True)
    start = jnp.repeat(mask.sum(1), G)[:, None] + jnp.arange(N)[None]
    pos = jnp.broadcast_to(start[None], (3, P * G, N))
    return model(x_new, attention_mask_BT=cont_mask, positions_3BT=pos, prefix=prefix)[0]

  got = np.asarray(shared(x, mask, x_new, cont_mask))
  run = _jitted(model)
  x_full = np.concatenate([np.repeat(x, G, 0), x_new], axis=1)
  mask_full = np.concatenate([np.repeat(mask, G, 0), cont_mask], axis=1)
  ref, _ = run(x_full, mask_full, _text_positions(mask_full))
  valid = cont_mask.astype(bool)
  np.testing.assert_allclose(got[valid], np.asarray(ref)[:, T0:][valid], rtol=0, atol=TOL_MODULE)


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_gives_the_same_loss_and_gradients(remat):
  """Rematerialised decoder layers: same loss and gradients as without (fp32, 1e-6)."""
  from medad_jax.model.config import Qwen25VLConfig
  cfg = Qwen25VLConfig.tiny()
  rng = np.random.default_rng(7)
  B, T = 2, 9
  x = jnp.asarray(rng.standard_normal((B, T, cfg.text.hidden_size)).astype(np.float32))
  mask = jnp.asarray(_pad_mask([9, 6], T))
  pos = jnp.asarray(_text_positions(np.asarray(mask)))

  def loss_and_grads(policy):
    model = text_lib.TextModel(cfg.text, rngs=nnx.Rngs(0), remat=policy)
    graphdef, params = nnx.split(model)

    def loss(params):
      h, _ = nnx.merge(graphdef, params)(x, attention_mask_BT=mask, positions_3BT=pos)
      return jnp.sum(jnp.where(mask[..., None] > 0, jnp.sin(h), 0.0))

    return jax.jit(jax.value_and_grad(loss))(params)

  (l0, g0), (l1, g1) = loss_and_grads('none'), loss_and_grads(remat)
  np.testing.assert_allclose(float(l1), float(l0), rtol=0, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0)) > 1e-3  # gradients are not trivially zero


def test_masked_cache_slots_are_never_attended(tiny_hf_checkpoints):
  """A finished row writes its tokens with mask 0; the next token must see the cache as if they never existed."""
  cfg, model = _decoder('tied_gqa4_win112', tiny_hf_checkpoints)
  run = _jitted(model)
  rng = np.random.default_rng(5)
  B, T0, D = 2, 6, cfg.text.hidden_size
  mask = np.ones((B, T0), np.int64)
  x = rng.standard_normal((B, T0, D)).astype(np.float32)
  junk, y = (rng.standard_normal((B, 1, D)).astype(np.float32) for _ in range(2))
  pos_y = np.full((3, B, 1), T0)
  ones, zeros = np.ones((B, 1), np.int32), np.zeros((B, 1), np.int32)
  _, prefilled = run(x, mask, _text_positions(mask), text_lib.init_cache(cfg.text, B, T0 + 2), 0)

  without, _ = run(y, ones, pos_y, prefilled, T0)
  _, c = run(junk, zeros, pos_y, prefilled, T0)
  with_masked_junk, _ = run(y, ones, pos_y, c, T0 + 1)
  np.testing.assert_allclose(np.asarray(with_masked_junk), np.asarray(without), rtol=0, atol=TOL_MODULE)
  # and with the junk token marked valid, the output does change (the mask is what made the difference)
  _, c = run(junk, ones, pos_y, prefilled, T0)
  seen, _ = run(y, ones, pos_y, c, T0 + 1)
  assert np.abs(np.asarray(seen) - np.asarray(without)).max() > 100 * TOL_MODULE


def test_bad_shapes_are_named():
  from medad_jax.model.config import Qwen25VLConfig
  cfg = Qwen25VLConfig.tiny()
  model = text_lib.TextModel(cfg.text, rngs=nnx.Rngs(0))
  x = jnp.zeros((2, 5, cfg.text.hidden_size))
  with pytest.raises(ValueError, match=r'positions_3BT has shape \(2, 5\); expected \(3, 2, 5\)'):
    model(x, attention_mask_BT=jnp.ones((2, 5)), positions_3BT=jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match=r'attention_mask_BT has shape \(2, 4\); expected \(2, 5\)'):
    model(x, attention_mask_BT=jnp.ones((2, 4)), positions_3BT=jnp.zeros((3, 2, 5), jnp.int32))
  cache = text_lib.init_cache(cfg.text, 2, 6)
  with pytest.raises(ValueError, match='cannot write 5 tokens at cache_index 2 into a cache of 6 slots'):
    model(x, attention_mask_BT=jnp.ones((2, 5)), positions_3BT=jnp.zeros((3, 2, 5), jnp.int32), cache=cache,
          cache_index=2)
