"""Reference implementation of the vision tower's attention before the blockwise/chunked paths, and a memory probe.

:func:`dense_tower` runs :class:`~medad_jax.model.vision.VisionTransformer`'s weights with one ``[L, L]`` segment
mask and one ``jax.nn.dot_product_attention`` call per block (window and full blocks alike): the implementation
the tower had before window blocks became blockwise and full blocks query-chunked. Tests compare the tower with
it; the command below compares their compiled memory::

  python -m medad_jax.testing.vision_ref --preset=qwen2_5_vl_3b --side=32 --side=72

prints XLA's ``memory_analysis()`` temporaries of the forward of one ``side x side``-patch image (abstract
parameters, nothing allocated) for both implementations.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.vision import VisionTransformer, apply_rotary, merge_units_permute, rotary_cos_sin, vision_meta


def dense_block(block, x_LD, cos_LH, sin_LH, seg_L):
  """One vision block with a single ``[L, L]`` segment mask over all patches of the call."""
  attn = block.attn
  L = x_LD.shape[0]
  qkv = attn.qkv(block.norm1(x_LD)).reshape(L, 3, attn.num_heads, attn.head_dim)
  q, k = apply_rotary(qkv[:, 0], cos_LH, sin_LH), apply_rotary(qkv[:, 1], cos_LH, sin_LH)
  mask = (seg_L[:, None] == seg_L[None, :])[None, None]
  o = jax.nn.dot_product_attention(q[None], k[None], qkv[None, :, 2], mask=mask, implementation='xla')
  x_LD = x_LD + attn.proj(o.reshape(L, -1))
  return x_LD + block.mlp(block.norm2(x_LD))


def dense_tower(vt: VisionTransformer, pixels_LP, meta):
  """The whole tower on :func:`dense_block`."""
  cfg = vt.cfg
  unit = cfg.spatial_merge_size**2
  x_LD = merge_units_permute(vt.patch_embed(pixels_LP), meta.window_index_M, unit)
  cos_LH, sin_LH = rotary_cos_sin(meta.pos_L2, cfg)
  for i, block in enumerate(vt.blocks):
    x_LD = dense_block(block, x_LD, cos_LH, sin_LH,
                       meta.full_seg_L if i in cfg.fullatt_block_indexes else meta.window_seg_L)
  return jnp.take(vt.merger(x_LD), meta.reverse_index_M, axis=0)


def forward_temp_bytes(vcfg, grid, *, dense: bool, dtype: str = 'float32') -> int:
  """XLA's compiled temporaries (bytes) of the tower's forward on ``grid_thw`` (abstract parameters)."""
  vt = nnx.eval_shape(lambda: VisionTransformer(vcfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
                                                attn_implementation='xla'))
  graphdef, state = nnx.split(vt)
  meta = vision_meta(np.asarray(grid), vcfg)
  pixels = jax.ShapeDtypeStruct((meta.pos_L2.shape[0], vcfg.patch_dim), jnp.dtype(dtype))
  fn = (lambda st, px, mt: dense_tower(nnx.merge(graphdef, st), px, mt)) if dense else (
      lambda st, px, mt: nnx.merge(graphdef, st)(px, mt))
  return jax.jit(fn).lower(state, pixels, meta).compile().memory_analysis().temp_size_in_bytes


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--preset', default='qwen2_5_vl_3b')
  ap.add_argument('--side', type=int, action='append', help='image side in patches (even); repeatable')
  ap.add_argument('--dtype', default='float32')
  args = ap.parse_args(argv)
  vcfg = Qwen25VLConfig.preset(args.preset).vision
  for side in args.side or [32]:
    grid = [[1, side, side]]
    t0 = time.time()
    old = forward_temp_bytes(vcfg, grid, dense=True, dtype=args.dtype)
    new = forward_temp_bytes(vcfg, grid, dense=False, dtype=args.dtype)
    print(f'{args.preset} tower, {args.dtype}, one {side * vcfg.patch_size}-px image (L={side * side}): forward '
          f'temporaries {old / 2**30:.3f} GiB with one [L, L] mask per block, {new / 2**30:.3f} GiB blockwise '
          f'windows + chunked full blocks ({time.time() - t0:.0f} s)')


if __name__ == '__main__':
  main()
