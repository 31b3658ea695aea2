"""Vision tower parity against transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` on identical weights.

Host-side index math (``vision_meta``) is compared with transformers' own ``vision_utils`` helpers; blocks and the
whole tower are compared on the random-weight parity checkpoints of ``medad_jax.testing.hf.tiny_configs()``.
"""

import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

import jax
import jax.numpy as jnp
from medad_jax.model.checkpoint import load_hf_tensors
from medad_jax.model.vision import (VisionTransformer, _check_window_runs, merge_units_permute, rotary_cos_sin,
                                    full_attn_query_chunk, rotary_inv_freq, segment_attention, vision_meta,
                                    window_len, windowed_segment_attention)
from medad_jax.testing.hf import tiny_configs
from medad_jax.testing.vision_ref import dense_tower, forward_temp_bytes

CONFIGS = list(tiny_configs())

# (t, h, w) in patches. Windows are 4x4 patches (config a) or 8x8 (config b); several grids leave partial windows
# at the bottom/right edge, one is an exact multiple of both window sizes, one is a 2-frame video.
GRIDS = {
    'two_images_nonsquare_partial': [[1, 12, 20], [1, 18, 10]],
    'square_exact_multiple': [[1, 16, 16]],
    'video_and_image': [[2, 8, 12], [1, 6, 6]],
    'single_merge_unit': [[1, 2, 2]],
    'tall_thin_three_images': [[1, 30, 4], [1, 4, 2], [1, 10, 14]],
}


def _cu_from_segments(seg_L: np.ndarray) -> np.ndarray:
  """HF-style cumulative boundaries of the runs of equal ids; each id must form exactly one run."""
  starts = np.flatnonzero(np.diff(seg_L)) + 1
  assert len(starts) + 1 == len(np.unique(seg_L)), 'a segment id occurs in two separate runs'
  return np.concatenate([[0], starts, [len(seg_L)]])


def _hf_state(torch_model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in torch_model.state_dict().items() if '.visual.' in k}


def _tower(cfg, torch_model, **kw) -> VisionTransformer:
  vt = VisionTransformer(cfg.vision, rngs=nnx.Rngs(0), **kw)
  return load_hf_tensors(vt, _hf_state(torch_model), where='tiny parity model')


def _hf_meta(grid, vcfg):
  g = torch.tensor(grid)
  pos = get_vision_position_ids(g, vcfg.spatial_merge_size)
  window_index, cu_window = get_vision_window_index(g, spatial_merge_size=vcfg.spatial_merge_size,
                                                    window_size=vcfg.window_size, patch_size=vcfg.patch_size)
  return pos, window_index, cu_window, get_vision_cu_seqlens(g)


@pytest.mark.parametrize('grid', list(GRIDS.values()), ids=list(GRIDS))
@pytest.mark.parametrize('config', CONFIGS)
def test_vision_meta_matches_transformers(config, grid):
  vcfg = tiny_configs()[config].vision
  unit = vcfg.spatial_merge_size**2
  meta = vision_meta(np.array(grid), vcfg)
  pos, window_index, cu_window, cu_full = _hf_meta(grid, vcfg)
  np.testing.assert_array_equal(meta.window_index_M, window_index.numpy())
  np.testing.assert_array_equal(meta.reverse_index_M, torch.argsort(window_index).numpy())
  # HF permutes rotary tables in whole merge units after computing them; we permute the positions up front.
  pos_perm = pos.reshape(-1, unit, 2)[window_index].reshape(-1, 2)
  np.testing.assert_array_equal(meta.pos_L2, pos_perm.numpy())
  np.testing.assert_array_equal(_cu_from_segments(meta.window_seg_L), cu_window.numpy())
  np.testing.assert_array_equal(_cu_from_segments(meta.full_seg_L), cu_full.numpy())
  assert meta.valid_M.all() and meta.valid_M.shape == meta.window_index_M.shape


def test_vision_meta_pads_with_an_isolated_segment():
  vcfg = tiny_configs()[CONFIGS[0]].vision
  grid = np.array(GRIDS['two_images_nonsquare_partial'])
  plain, padded = vision_meta(grid, vcfg), vision_meta(grid, vcfg, pad_to=640)
  n, m = plain.pos_L2.shape[0], plain.window_index_M.shape[0]
  assert padded.pos_L2.shape == (640, 2) and padded.window_index_M.shape == (160,)
  for f in ('pos_L2', 'window_seg_L', 'full_seg_L'):
    np.testing.assert_array_equal(getattr(padded, f)[:n], getattr(plain, f))
  np.testing.assert_array_equal(padded.pos_L2[n:], 0)
  # Padding ids are ids no real patch uses (so no softmax row is empty and padding never mixes with images): one
  # id for the full blocks, consecutive runs of one window's length (16 patches here) for the window blocks.
  pad_ids = np.unique(padded.full_seg_L[n:])
  assert len(pad_ids) == 1 and pad_ids[0] not in plain.full_seg_L
  pad_win = padded.window_seg_L[n:]
  assert not np.isin(pad_win, plain.window_seg_L).any() and n == 420 and window_len(vcfg) == 16
  np.testing.assert_array_equal(pad_win, plain.window_seg_L.max() + 1 + np.arange(220) // 16)
  np.testing.assert_array_equal(padded.window_index_M[:m], plain.window_index_M)
  np.testing.assert_array_equal(padded.window_index_M[m:], np.arange(m, 160))
  np.testing.assert_array_equal(padded.valid_M, np.arange(160) < m)


@pytest.mark.parametrize('grid, pad_to, match', [
    ([[1, 3, 4]], None, r'grid_thw\[0\] = \(1, 3, 4\).*multiples of spatial_merge_size=2'),
    ([[0, 4, 4]], None, r'grid_thw\[0\] = \(0, 4, 4\).*>= 1'),
    ([1, 4, 4], None, r'shape \[num_images, 3\].*\(3,\)'),
    ([[1.0, 4.0, 4.0]], None, r'expected integers'),
    ([[1, 4, 4]], 12, r'pad_to=12 must be >= the patch count 16'),
    ([[1, 4, 4]], 18, r'pad_to=18 .* multiple of spatial_merge_size\*\*2=4'),
])
def test_vision_meta_rejects_bad_input(grid, pad_to, match):
  with pytest.raises(ValueError, match=match):
    vision_meta(np.array(grid), tiny_configs()[CONFIGS[0]].vision, pad_to=pad_to)


@pytest.mark.parametrize('config', CONFIGS)
def test_rotary_matches_transformers(config, tiny_hf_checkpoints):
  cfg, _, torch_model = tiny_hf_checkpoints[config]
  visual = torch_model.model.visual
  grid = GRIDS['video_and_image']
  unit = cfg.vision.spatial_merge_size**2
  np.testing.assert_array_equal(rotary_inv_freq(cfg.vision), visual.rotary_pos_emb.inv_freq.numpy())
  pos, window_index, _, _ = _hf_meta(grid, cfg.vision)
  with torch.no_grad():
    cos_ref, sin_ref = visual.rotary_pos_emb(torch.zeros(1), pos)
  perm = lambda t: t.reshape(-1, unit, t.shape[-1])[window_index].reshape(t.shape).numpy()
  cos, sin = rotary_cos_sin(jnp.asarray(vision_meta(np.array(grid), cfg.vision).pos_L2), cfg.vision)
  np.testing.assert_allclose(cos, perm(cos_ref), rtol=0, atol=1e-5)
  np.testing.assert_allclose(sin, perm(sin_ref), rtol=0, atol=1e-5)


def _block_kinds():
  out = []
  for name, cfg in tiny_configs().items():
    full = cfg.vision.fullatt_block_indexes
    out.append((name, 'full', full[0]))
    out.append((name, 'window', next(i for i in range(cfg.vision.depth) if i not in full)))
  return out


@pytest.mark.parametrize('config, kind, index', _block_kinds())
def test_block_matches_transformers(config, kind, index, tiny_hf_checkpoints):
  cfg, _, torch_model = tiny_hf_checkpoints[config]
  visual = torch_model.model.visual
  grid = GRIDS['two_images_nonsquare_partial']
  unit = cfg.vision.spatial_merge_size**2
  pos, window_index, cu_window, cu_full = _hf_meta(grid, cfg.vision)
  meta = vision_meta(np.array(grid), cfg.vision)
  assert len(cu_window) - 1 > 2 * len(grid), 'the window block must see several windows per image'
  x = torch.randn(len(pos), cfg.vision.hidden_size, generator=torch.Generator().manual_seed(index))
  with torch.no_grad():
    cos, sin = visual.rotary_pos_emb(x, pos)
    perm = lambda t: t.reshape(-1, unit, t.shape[-1])[window_index].reshape(t.shape)
    ref = visual.blocks[index](x, cu_seqlens=cu_full if kind == 'full' else cu_window,
                               position_embeddings=(perm(cos), perm(sin))).numpy()
  block = _tower(cfg, torch_model).blocks[index]
  cos_LH, sin_LH = rotary_cos_sin(jnp.asarray(meta.pos_L2), cfg.vision)
  wl = window_len(cfg.vision)
  # Full blocks: one segment mask over the call; window blocks: the blockwise path the tower uses for them.
  seg, window = (meta.full_seg_L, None) if kind == 'full' else (meta.window_seg_L, wl)
  out = block(jnp.asarray(x.numpy()), cos_LH, sin_LH, jnp.asarray(seg), window=window)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
  # The mask matters: the other segmentation gives a clearly different answer on the same block.
  other_seg, other_window = (meta.window_seg_L, wl) if kind == 'full' else (meta.full_seg_L, None)
  other = block(jnp.asarray(x.numpy()), cos_LH, sin_LH, jnp.asarray(other_seg), window=other_window)
  assert np.abs(np.asarray(other) - ref).max() > 1e-2


def _processor_inputs(cfg):
  """Two RGB images of different sizes through the real (PIL) Qwen2-VL processor: 224x336 and 196x140 pixels."""
  v = cfg.vision
  proc = Qwen2VLImageProcessorPil(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                  merge_size=v.spatial_merge_size, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((224, 336), (196, 140))]
  out = proc(images=images, return_tensors='np')
  return np.asarray(out['pixel_values'], np.float32), np.asarray(out['image_grid_thw'])


@pytest.mark.parametrize('config', CONFIGS)
def test_tower_matches_transformers(config, tiny_hf_checkpoints):
  cfg, _, torch_model = tiny_hf_checkpoints[config]
  pixels, grid = _processor_inputs(cfg)
  assert grid.tolist() == [[1, 16, 24], [1, 14, 10]] and pixels.shape == (16 * 24 + 14 * 10, cfg.vision.patch_dim)
  meta = vision_meta(grid, cfg.vision)
  # Precondition of the test: every image spans more than one attention window.
  per_image = np.split(meta.window_seg_L, np.cumsum(grid.prod(-1))[:-1])
  assert all(len(np.unique(s)) > 1 for s in per_image)
  with torch.no_grad():
    out_ref = torch_model.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid))
  ref = out_ref.pooler_output.numpy()
  vt = _tower(cfg, torch_model)
  forward = nnx.jit(lambda m, px, meta: m(px, meta))
  feats = forward(vt, jnp.asarray(pixels), meta)
  assert feats.shape == ref.shape == (pixels.shape[0] // 4, cfg.vision.out_hidden_size)
  np.testing.assert_allclose(feats, ref, rtol=0, atol=1e-4)
  # Padding to a bucket size leaves the real tokens unchanged and puts the padding rows last.
  padded = forward(vt, jnp.pad(jnp.asarray(pixels), ((0, 76), (0, 0))), vision_meta(grid, cfg.vision, pad_to=600))
  assert padded.shape == (150, cfg.vision.out_hidden_size) and np.isfinite(np.asarray(padded)).all()
  np.testing.assert_allclose(padded[:ref.shape[0]], ref, rtol=0, atol=1e-4)


def test_tower_rejects_mismatched_inputs(tiny_hf_checkpoints):
  cfg, _, torch_model = tiny_hf_checkpoints[CONFIGS[0]]
  vt = _tower(cfg, torch_model)
  meta = vision_meta(np.array([[1, 4, 4]]), cfg.vision)
  with pytest.raises(ValueError, match=r'pixel_values: expected shape \[num_patches, 1176\].*\(16, 1175\)'):
    vt(jnp.zeros((16, 1175)), meta)
  with pytest.raises(ValueError, match=r'pixel_values has 20 patches but the VisionMeta describes 16'):
    vt(jnp.zeros((20, 1176)), meta)


def test_bf16_policy(tiny_hf_checkpoints):
  """bf16 storage + compute: parameters stay bf16, features come out bf16 and track the fp32 tower."""
  cfg, _, torch_model = tiny_hf_checkpoints[CONFIGS[1]]
  pixels, grid = _processor_inputs(cfg)
  meta = vision_meta(grid, cfg.vision)
  ref = np.asarray(_tower(cfg, torch_model)(jnp.asarray(pixels), meta))
  vt = _tower(cfg, torch_model, dtype='bfloat16', param_dtype='bfloat16')
  assert {v[...].dtype for _, v in nnx.to_flat_state(nnx.state(vt, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
  out = vt(jnp.asarray(pixels), meta)
  assert out.dtype == jnp.bfloat16
  # Measured 0.73% on both configs; transformers' own bf16 tower is 0.67% away from its fp32 one.
  rel = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
  assert rel < 2e-2, rel


def test_merge_unit_permutation_round_trips():
  vcfg = tiny_configs()[CONFIGS[1]].vision
  meta = vision_meta(np.array(GRIDS['tall_thin_three_images']), vcfg)
  x = jnp.arange(meta.pos_L2.shape[0] * 3.0).reshape(-1, 3)
  y = merge_units_permute(x, jnp.asarray(meta.window_index_M), 4)
  assert not np.array_equal(y, x)
  np.testing.assert_array_equal(merge_units_permute(y, jnp.asarray(meta.reverse_index_M), 4), x)


# ------------------------------------------------------------------------ blockwise window attention, remat, memory

# Grids for the blockwise-vs-dense comparison, with pad_to (None = no padding): partial edge windows, several
# images in one packed call, a video, padding longer than one window, a call shorter than one window.
WINDOW_CASES = {
    'partial_edges_two_images': ([[1, 12, 20], [1, 18, 10]], None),
    'partial_edges_padded': ([[1, 12, 20], [1, 18, 10]], 640),
    'video_image_padded': ([[2, 8, 12], [1, 6, 6]], 300),
    'three_images': ([[1, 30, 4], [1, 4, 2], [1, 10, 14]], None),
    'shorter_than_a_window': ([[1, 2, 2]], 12),
}


@pytest.mark.parametrize('case', list(WINDOW_CASES))
@pytest.mark.parametrize('config', CONFIGS)
def test_blockwise_attention_equals_segment_mask(config, case):
  vcfg = tiny_configs()[config].vision
  grid, pad_to = WINDOW_CASES[case]
  meta = vision_meta(np.array(grid), vcfg, pad_to=pad_to)
  L, wl, chunk = meta.pos_L2.shape[0], window_len(vcfg), full_attn_query_chunk(vcfg)
  q, k, v = jax.random.normal(jax.random.key(L), (3, L, vcfg.num_heads, vcfg.head_dim))
  vt = VisionTransformer(vcfg, rngs=nnx.Rngs(1), attn_implementation='xla')
  pixels = jax.random.normal(jax.random.key(2), (L, vcfg.patch_dim))

  @nnx.jit
  def both(vt, meta):
    out = {}
    for name, seg in (('window', meta.window_seg_L), ('full', meta.full_seg_L)):
      out[name] = (segment_attention(q, k, v, seg, implementation='xla', query_chunk=chunk // 4),
                   segment_attention(q, k, v, seg, implementation='xla'))
    out['blockwise'] = (windowed_segment_attention(q, k, v, meta.window_seg_L, wl, implementation='xla'),
                        out['window'][1])
    # The whole tower (random weights) against the one-mask-per-block reference, padding rows included.
    out['tower'] = (vt(pixels, meta), dense_tower(vt, pixels, meta))
    return out

  for name, (new, ref) in both(vt, meta).items():
    np.testing.assert_allclose(new, ref, rtol=0, atol=1e-5, err_msg=name)


def test_windowed_attention_needs_short_contiguous_runs():
  """The condition ``vision_meta`` checks is necessary: a run longer than the block loses keys."""
  L, wl = 40, 8
  q, k, v = jax.random.normal(jax.random.key(0), (3, L, 2, 8))
  seg = jnp.asarray(np.repeat([0, 1], [3, 37]))
  dense = segment_attention(q, k, v, seg)
  assert np.abs(np.asarray(windowed_segment_attention(q, k, v, seg, wl)) - np.asarray(dense)).max() > 1e-2
  with pytest.raises(ValueError, match=r'not contiguous runs of at most 8 patches \(run lengths \[3, 37\]\)'):
    _check_window_runs(np.asarray(seg), wl, np.array([[1, 2, 20]]))
  with pytest.raises(ValueError, match='not contiguous runs'):  # one id in two separate runs
    _check_window_runs(np.repeat([0, 1, 0], 4), wl, np.array([[1, 2, 6]]))


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_keeps_output_and_gradients(remat):
  vcfg = tiny_configs()[CONFIGS[0]].vision
  # Two images, one tower call each, vmapped (as the sampler embeds prompts): partial windows, padding, and 3
  # query chunks in the full block.
  metas = [vision_meta(np.array(g), vcfg, pad_to=160) for g in ([[1, 10, 14]], [[1, 8, 8]])]
  meta_I = jax.tree.map(lambda *a: np.stack(a), *metas)
  pixels = jax.random.normal(jax.random.key(3), (2, 160, vcfg.patch_dim))
  target = jax.random.normal(jax.random.key(4), (2, 40, vcfg.out_hidden_size))
  meta = metas[0]

  @nnx.jit
  def out_loss_grad(vt):
    per_image = lambda m: jax.vmap(lambda px, mt: m(px, mt))(pixels, meta_I)
    loss = lambda m: jnp.sum(jnp.where(meta_I.valid_M[..., None], per_image(m) * target, 0.0))
    return per_image(vt), *nnx.value_and_grad(loss)(vt)

  plain = VisionTransformer(vcfg, rngs=nnx.Rngs(5), attn_implementation='xla')
  rematted = VisionTransformer(vcfg, rngs=nnx.Rngs(5), attn_implementation='xla', remat=remat)
  (o0, l0, g0), (o1, l1, g1) = out_loss_grad(plain), out_loss_grad(rematted)
  np.testing.assert_allclose(o1, o0, rtol=0, atol=1e-6)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  flat0, flat1 = nnx.to_flat_state(g0), nnx.to_flat_state(g1)
  assert [p for p, _ in flat0] == [p for p, _ in flat1] and len(flat0) > 20
  for (path, a), (_, b) in zip(flat0, flat1):
    np.testing.assert_allclose(b[...], a[...], rtol=0, atol=1e-6, err_msg=str(path))
  assert max(float(np.abs(a[...]).max()) for _, a in flat0) > 1e-2  # the gradients are not trivially zero
  # The remat wrapper is in the traced graph (the backward recomputes the blocks), and only when asked for.
  count = lambda vt: str(jax.make_jaxpr(lambda st: nnx.merge(nnx.graphdef(vt), st)(pixels[0], meta))(
      nnx.state(vt))).count('remat2[')  # jax.checkpoint's primitive
  assert count(rematted) == count(plain) + vcfg.depth


def test_bad_tower_options():
  vcfg = tiny_configs()[CONFIGS[0]].vision
  with pytest.raises(ValueError, match=r"remat='some'; expected one of \['dots', 'full', 'none'\]"):
    VisionTransformer(vcfg, rngs=nnx.Rngs(0), remat='some')
  with pytest.raises(ValueError, match=r"attn_implementation='flash'; expected one of"):
    VisionTransformer(vcfg, rngs=nnx.Rngs(0), attn_implementation='flash')


def test_blockwise_attention_lowers_compiled_memory():
  """XLA:CPU temporaries of the small preset's tower on one 448-px image (32x32 patches = 16 windows of 64)."""
  from medad_jax.model.config import Qwen25VLConfig
  vcfg = Qwen25VLConfig.small().vision
  meta = vision_meta(np.array([[1, 32, 32]]), vcfg)
  assert len(np.unique(meta.window_seg_L)) == 16 and meta.pos_L2.shape[0] == 1024
  old = forward_temp_bytes(vcfg, [[1, 32, 32]], dense=True)
  new = forward_temp_bytes(vcfg, [[1, 32, 32]], dense=False)
  print(f'small tower, L=1024, forward temporaries: one [L, L] mask per block {old:,} B, blockwise {new:,} B')
  assert new < old
