"""Mesh and partitioning rules — the one place where parameter and activation names map to mesh axes.

Mesh axes: ``data`` (pure data parallel: parameters replicated), ``fsdp`` (data parallel with parameters and
optimizer state sharded, ZeRO-3 style), ``tensor`` (Megatron-style: heads / MLP width split).

Parameters are matched by their '/'-joined NNX path against ``PARAM_RULES`` (first match wins); each rule gives one
mesh-axis name (or None) per array dimension. A dimension that the mesh axis does not divide falls back to
replicated for that dimension, so tiny test models and odd head counts still run on any mesh. Activations: the
batch dimension of every model input is split over ``BATCH_AXES``; GSPMD propagates the rest.

The mesh uses ``AxisType.Auto`` (GSPMD-style propagation), not the Explicit default of ``jax.make_mesh``.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# (path regex, one entry per dimension). Kernels are [in, out].
PARAM_RULES: tuple[tuple[str, tuple], ...] = (
    (r'embed_tokens/embedding$', ('tensor', 'fsdp')),                                  # [V, D]
    (r'lm_head/kernel$', ('fsdp', 'tensor')),                                          # [D, V]
    (r'self_attn/(q_proj|k_proj|v_proj)/kernel$', ('fsdp', 'tensor')),                # [D, N*H]
    (r'self_attn/(q_proj|k_proj|v_proj)/bias$', ('tensor',)),
    (r'self_attn/o_proj/kernel$', ('tensor', 'fsdp')),                                # [N*H, D]
    (r'mlp/(gate_proj|up_proj)/kernel$', ('fsdp', 'tensor')),                         # [D, F]
    (r'mlp/(gate_proj|up_proj)/bias$', ('tensor',)),
    (r'mlp/down_proj/kernel$', ('tensor', 'fsdp')),                                   # [F, D]
    (r'attn/qkv/kernel$', ('fsdp', 'tensor')),                                        # vision [Dv, 3Dv]
    (r'attn/qkv/bias$', ('tensor',)),
    (r'attn/proj/kernel$', ('tensor', 'fsdp')),
    (r'merger/mlp_0/kernel$', ('fsdp', 'tensor')),
    (r'merger/mlp_0/bias$', ('tensor',)),
    (r'merger/mlp_2/kernel$', ('tensor', 'fsdp')),
    (r'patch_embed/proj/kernel$', (None, 'fsdp')),
    (r'lora_a$', ('fsdp', None)),                                                     # [I, R]
    (r'lora_b$', (None, 'tensor')),                                                   # [R, O]
    (r'.*', ()),                                                                       # norms, biases: replicated
)
_RULES = tuple((re.compile(r), spec) for r, spec in PARAM_RULES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all (or the given) devices; one size may be -1 (= the rest)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'{len(devices)} devices are not divisible by fsdp*tensor*... = {known}')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices; {len(devices)} available')
  arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _fit(spec: tuple, shape: tuple, mesh: Mesh) -> P:
  out = []
  for i, dim in enumerate(shape):
    ax = spec[i] if i < len(spec) else None
    if ax is not None and dim % mesh.shape[ax] != 0:
      ax = None
    out.append(ax)
  return P(*out)


def param_spec(path, shape, mesh: Mesh) -> P:
  s = '/'.join(str(p) for p in path)
  for rx, spec in _RULES:
    if rx.search(s):
      return _fit(spec, tuple(shape), mesh)
  return P()


def param_sharding_fn(mesh: Mesh):
  """``fn(path, value) -> NamedSharding`` for :func:`medad_jax.model.checkpoint.load_checkpoint`."""
  return lambda path, value: NamedSharding(mesh, param_spec(path, value.shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """A State of NamedShardings with the same structure as ``state``."""
  flat = [(p, NamedSharding(mesh, param_spec(p, v.get_value().shape, mesh))) for p, v in nnx.to_flat_state(state)]
  return jax.tree.map(lambda x: x, nnx.from_flat_state(flat))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Places every variable of ``model`` onto its sharding, in place."""
  state = nnx.state(model)
  for p, v in nnx.to_flat_state(state):
    v.set_value(jax.device_put(v.get_value(), NamedSharding(mesh, param_spec(p, v.get_value().shape, mesh))))
  return model


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
  spec = [None] * ndim
  spec[batch_dim] = BATCH_AXES
  return NamedSharding(mesh, P(*spec))


def shard_batch(batch: dict[str, Any], mesh: Mesh, batch_dims: dict[str, int | None] | None = None) -> dict:
  """Puts host arrays onto the mesh: dimension 0 (or ``batch_dims[k]``) split over (data, fsdp); a key mapped to
  None is replicated (e.g. vision patches, which are not batch-major)."""
  batch_dims = batch_dims or {}
  out = {}
  for k, v in batch.items():
    v = np.asarray(v) if not isinstance(v, jax.Array) else v
    bd = batch_dims.get(k, 0)
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if bd is not None and v.ndim > 0 and v.shape[bd] % n:
      log.warning('batch key %r: size %d along dim %d is not divisible by data*fsdp=%d; replicating it',
                  k, v.shape[bd], bd, n)
    if bd is None or v.ndim == 0 or v.shape[bd] % n:
      out[k] = jax.device_put(v, NamedSharding(mesh, P()))
    else:
      out[k] = jax.device_put(v, batch_sharding(mesh, v.ndim, bd))
  return out
