"""Full Qwen2.5-VL against transformers: rope index, logits with images + padding (both parity configs), KV cache
with images, and greedy generation equal to ``generate(do_sample=False)``."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.processing_utils import ProcessorMixin

from medad_jax.model import vision as vision_lib
from medad_jax.model.checkpoint import load_hf_tensors
from medad_jax.model.qwen25vl import Qwen25VL, continuation_positions, greedy_generate
from medad_jax.model.rope_index import rope_index
from medad_jax.testing.inputs import prompt_batch

TOL_MODEL = 1e-4  # fp32, whole model
CONFIGS = ['untied_gqa2_win56', 'tied_gqa4_win112']


# ----------------------------------------------------------------------------- prompt batches


_prompt_batch = prompt_batch  # token ids built directly; see medad_jax/testing/inputs.py


def _mm_token_type_ids(cfg, ids):
  """Exactly the processor's ``create_mm_token_type_ids`` (1 at image tokens, 2 at video tokens, else 0)."""
  proc = types.SimpleNamespace(image_token_ids=[cfg.image_token_id], video_token_ids=[cfg.video_token_id],
                               audio_token_ids=[None])
  return np.asarray(ProcessorMixin.create_mm_token_type_ids(proc, ids.tolist()), np.int64)


def _torch_inputs(cfg, batch):
  out = {k: torch.tensor(v) for k, v in batch.items()}
  out['mm_token_type_ids'] = torch.tensor(_mm_token_type_ids(cfg, batch['input_ids']))
  return out


# Two images of different sizes (24 and 15 merged tokens; partial windows for both window sizes), one prompt
# shorter than the other so it is left-padded.
TWO_PROMPTS = [
    [('t', 3), ('img', (1, 8, 12)), ('t', 5)],
    [('t', 2), ('img', (1, 6, 10)), ('t', 3)],
]


@pytest.fixture(scope='module')
def models(tiny_hf_checkpoints):
  """{name: (cfg, ours, torch_model)} with our model loaded from the torch model's tensors."""
  out = {}
  for name in CONFIGS:
    cfg, _, hf = tiny_hf_checkpoints[name]
    ours = load_hf_tensors(Qwen25VL(cfg, rngs=nnx.Rngs(0)), {k: v.numpy() for k, v in hf.state_dict().items()})
    out[name] = (cfg, ours, hf)
  return out


def _forward_fn(model):
  @jax.jit
  def run(ids, mask, pos, pixels=None, meta=None, cache=None, index=0):
    return model(ids, attention_mask_BT=mask, positions_3BT=pos, pixel_values=pixels, vision_meta=meta, cache=cache,
                 cache_index=index)
  return run


# ----------------------------------------------------------------------------- rope index


@pytest.mark.parametrize('left', [True, False], ids=['left_pad', 'right_pad'])
def test_rope_index_matches_transformers(tiny_hf_checkpoints, left):
  cfg, _, hf = tiny_hf_checkpoints['untied_gqa2_win56']
  rows = [
      [('t', 3), ('img', (1, 8, 12)), ('t', 5)],
      [('t', 2), ('img', (1, 6, 10)), ('t', 4), ('img', (1, 4, 4)), ('t', 1)],  # two images, non-square first
      [('t', 7)],                                                                # text only
      [('img', (1, 10, 4)), ('t', 2)],                                           # starts with the image
  ]
  batch = _prompt_batch(cfg, rows, seed=1, left=left)
  with torch.no_grad():
    ref_pos, ref_delta = hf.model.get_rope_index(
        torch.tensor(batch['input_ids']), torch.tensor(_mm_token_type_ids(cfg, batch['input_ids'])),
        image_grid_thw=torch.tensor(batch['image_grid_thw']), attention_mask=torch.tensor(batch['attention_mask']))
  pos, delta = rope_index(cfg, batch['input_ids'], batch['attention_mask'], batch['image_grid_thw'])
  assert pos.shape == (3, 4, batch['input_ids'].shape[1]) and pos.dtype == np.int32
  np.testing.assert_array_equal(pos, ref_pos.numpy())
  # transformers counts the delta from the number of real tokens, ours from the padded length (cache slots).
  n_pad = (batch['attention_mask'] == 0).sum(1)
  np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0] - n_pad)
  # the rows really differ (3D positions for images), so the comparison is not vacuous
  assert (pos[0] != pos[1]).any() and (pos[1] != pos[2]).any()


def test_rope_index_rejects_bad_input():
  from medad_jax.model.config import Qwen25VLConfig
  cfg = Qwen25VLConfig.tiny()
  batch = _prompt_batch(cfg, [[('t', 2), ('img', (1, 4, 6)), ('t', 1)]])
  ids, mask, grid = batch['input_ids'], batch['attention_mask'], batch['image_grid_thw']
  with pytest.raises(ValueError, match=r'row 0: image-token run of length 6 .* grid \(1, 4, 4\) needs 4 tokens'):
    rope_index(cfg, ids, mask, [[1, 4, 4]])
  with pytest.raises(ValueError, match='image_grid_thw has only 0 image'):
    rope_index(cfg, ids, mask, None)
  with pytest.raises(ValueError, match='image_grid_thw has 2 images but input_ids hold image-token runs for 1'):
    rope_index(cfg, ids, mask, np.concatenate([grid, grid]))
  bad = ids.copy()
  bad[0, 0] = cfg.video_token_id
  with pytest.raises(ValueError, match='video tokens'):
    rope_index(cfg, bad, mask, grid)
  with pytest.raises(ValueError, match=r'attention_mask has shape \(1, 3\)'):
    rope_index(cfg, ids, mask[:, :3], grid)


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize('name', CONFIGS)
def test_logits_match_transformers(models, name):
  cfg, model, hf = models[name]
  assert (model.lm_head is None) == cfg.text.tie_word_embeddings
  batch = _prompt_batch(cfg, TWO_PROMPTS, seed=2)
  with torch.no_grad():
    ref = hf(**_torch_inputs(cfg, batch)).logits.numpy()
  pos, _ = rope_index(cfg, batch['input_ids'], batch['attention_mask'], batch['image_grid_thw'])
  meta = vision_lib.vision_meta(batch['image_grid_thw'], cfg.vision)
  run = _forward_fn(model)
  logits, cache = run(batch['input_ids'], batch['attention_mask'], pos, batch['pixel_values'], meta)
  assert cache is None and logits.dtype == jnp.float32
  assert logits.shape == (2, batch['input_ids'].shape[1], cfg.text.vocab_size)
  valid = batch['attention_mask'].astype(bool)
  err = np.abs(np.asarray(logits) - ref)[valid].max()
  assert err <= TOL_MODEL, err
  # Not vacuous: with 1-D positions instead of M-RoPE, or without the images, the logits move far beyond the tolerance.
  pos_1d = np.broadcast_to(np.where(valid, np.cumsum(valid, 1) - 1, 0)[None], pos.shape)
  wrong_pos, _ = run(batch['input_ids'], batch['attention_mask'], pos_1d, batch['pixel_values'], meta)
  assert np.abs(np.asarray(wrong_pos) - ref)[valid].max() > 100 * TOL_MODEL
  no_img, _ = run(batch['input_ids'], batch['attention_mask'], pos)
  assert np.abs(np.asarray(no_img) - ref)[valid].max() > 100 * TOL_MODEL


def test_embed_checks_image_token_count(models):
  cfg, model, _ = models['untied_gqa2_win56']
  batch = _prompt_batch(cfg, TWO_PROMPTS, seed=3)
  one_image = vision_lib.vision_meta(batch['image_grid_thw'][:1], cfg.vision)
  n0 = int(np.prod(batch['image_grid_thw'][0]))
  with pytest.raises(ValueError, match='input_ids hold 39 image tokens .* the images give 24 features'):
    model.embed(jnp.asarray(batch['input_ids']), jnp.asarray(batch['pixel_values'][:n0]), one_image)


# ----------------------------------------------------------------------------- KV cache and generation


@pytest.mark.parametrize('name', CONFIGS)
def test_kv_cache_with_images_equals_full_forward(models, name):
  cfg, model, _ = models[name]
  n_new = 5
  prompt = _prompt_batch(cfg, TWO_PROMPTS, seed=4)
  B, T = prompt['input_ids'].shape
  new_ids = np.random.default_rng(5).integers(0, cfg.text.vocab_size - 6, (B, n_new))
  ids = np.concatenate([prompt['input_ids'], new_ids], 1)
  mask = np.concatenate([prompt['attention_mask'], np.ones((B, n_new), np.int64)], 1)
  grid, pixels = prompt['image_grid_thw'], prompt['pixel_values']
  meta = vision_lib.vision_meta(grid, cfg.vision)
  run = _forward_fn(model)

  pos_full, _ = rope_index(cfg, ids, mask, grid)
  full, _ = run(ids, mask, pos_full, pixels, meta)

  pos_prompt, deltas = rope_index(cfg, prompt['input_ids'], prompt['attention_mask'], grid)
  # rope_deltas continue the prompt's positions: slot + delta is what the longer sequence's rope index gives.
  np.testing.assert_array_equal(np.asarray(continuation_positions(T, jnp.asarray(deltas), n_new)),
                                pos_full[:, :, T:])
  cache = model.init_cache(B, T + n_new)
  logits, cache = run(prompt['input_ids'], prompt['attention_mask'], pos_prompt, pixels, meta, cache, 0)
  steps = [np.asarray(logits)]
  for i in range(n_new):
    pos = continuation_positions(jnp.int32(T + i), jnp.asarray(deltas))
    logits, cache = run(new_ids[:, i:i + 1], np.ones((B, 1), np.int64), pos, None, None, cache, jnp.int32(T + i))
    steps.append(np.asarray(logits))
  got = np.concatenate(steps, 1)
  valid = mask.astype(bool)
  err = np.abs(got - np.asarray(full))[valid].max()
  assert err <= TOL_MODEL, err


def _hf_greedy(cfg, hf, batch, n_new, eos):
  T = batch['input_ids'].shape[1]
  with torch.no_grad():
    seq = hf.generate(**_torch_inputs(cfg, batch), max_new_tokens=n_new, do_sample=False, eos_token_id=list(eos),
                      pad_token_id=cfg.pad_token_id).numpy()[:, T:]
  ref = np.full((seq.shape[0], n_new), cfg.pad_token_id)  # generate stops once every row is done
  ref[:, :seq.shape[1]] = seq
  return ref


@pytest.mark.parametrize('name', CONFIGS)
def test_greedy_generate_matches_transformers_generate(models, name):
  cfg, model, hf = models[name]
  n_new = 16
  batch = _prompt_batch(cfg, TWO_PROMPTS, seed=6)
  assert batch['attention_mask'][1, 0] == 0  # the second prompt is left-padded
  got = greedy_generate(model, batch, n_new)
  np.testing.assert_array_equal(got, _hf_greedy(cfg, hf, batch, n_new, cfg.eos_token_ids))
  if not cfg.text.tie_word_embeddings:
    # A varied continuation, so every step depends on the cache. (The tied fixture's large embeddings make the
    # tied model repeat its first token; its cache is checked logit by logit in the test above.)
    assert min(len(set(r)) for r in got.tolist()) > 8
  # Early stop: make a token the first row emits the end-of-sequence token; that row then pads, as in transformers.
  eos = (int(got[0, 3]),)
  got_eos = greedy_generate(model, batch, n_new, eos_token_ids=eos)
  np.testing.assert_array_equal(got_eos, _hf_greedy(cfg, hf, batch, n_new, eos))
  assert (got_eos[0, 4:] == cfg.pad_token_id).all()


def test_bfloat16_compute_keeps_float32_logits(models):
  """bf16 compute (fp32 storage): the cache is bf16, logits come out float32 and stay near the fp32 model's."""
  cfg, model32, _ = models['untied_gqa2_win56']
  model = Qwen25VL(cfg.replace(dtype='bfloat16'), rngs=nnx.Rngs(0))
  nnx.update(model, nnx.state(model32, nnx.Param))
  batch = _prompt_batch(cfg, TWO_PROMPTS, seed=7)
  B, T = batch['input_ids'].shape
  pos, _ = rope_index(cfg, batch['input_ids'], batch['attention_mask'], batch['image_grid_thw'])
  meta = vision_lib.vision_meta(batch['image_grid_thw'], cfg.vision)
  args = (batch['input_ids'], batch['attention_mask'], pos, batch['pixel_values'], meta)
  logits, cache = _forward_fn(model)(*args, model.init_cache(B, T), 0)
  ref, _ = _forward_fn(model32)(*args)
  assert logits.dtype == jnp.float32 and cache['k'][0].dtype == jnp.bfloat16
  valid = batch['attention_mask'].astype(bool)
  assert np.isfinite(np.asarray(logits)[valid]).all()
  # bf16 keeps ~3 significant digits; the top-1 token of most positions survives.
  agree = (np.asarray(logits).argmax(-1) == np.asarray(ref).argmax(-1))[valid].mean()
  assert agree > 0.8, agree
