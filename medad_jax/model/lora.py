"""LoRA for the Qwen2.5-VL policy: adapters in their own subtree, chosen by a regex over module paths.

* ``apply_lora(model, LoraConfig(...))`` attaches ``lora_a[I, R]`` / ``lora_b[R, O]`` (``nnx.LoRAParam``) to every
  :class:`~medad_jax.model.layers.Linear` whose '/'-joined path matches ``LoraConfig.pattern``. ``lora_b`` starts at
  zero, so the adapted model starts equal to the base. Adapters are float32 whatever the base's dtype (so are
  their gradients and optimizer moments); there is no LoRA dropout.
* The base tree is untouched: ``nnx.state(model, BASE_PARAMS)`` is exactly what was loaded and
  ``nnx.state(model, nnx.LoRAParam)`` holds only the adapters (gradients and optimizer state use that filter).
* ``with lora_disabled(): model(...)`` runs the bit-identical base forward (see ``layers.py``).
* ``merge_lora(model)`` folds adapters into the kernels (used to turn the SFT policy into the frozen reference
  and for export); ``merged_kernels`` computes the merged kernels without changing the model.
* ``save_adapters`` / ``load_adapters`` write / read the adapters alone (safetensors + a JSON sidecar).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medad_jax.model.layers import LORA_DTYPE, Linear

# Decoder attention and MLP projections; the vision tower stays frozen (paper §4.1 fine-tunes with LoRA).
DEFAULT_PATTERN = r'^model/layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)$'


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 16
  alpha: float = 32.0
  pattern: str = DEFAULT_PATTERN
  seed: int = 0


def _path_str(path) -> str:
  return '/'.join(str(p) for p in path)


def lora_targets(model: nnx.Module, pattern: str) -> list[tuple[str, Linear]]:
  rx = re.compile(pattern)
  return [(_path_str(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, Linear) and rx.search(_path_str(p))]


def apply_lora(model: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs | None = None) -> list[str]:
  """Attaches adapters in place; returns the adapted module paths. Fails if the pattern matches nothing."""
  rngs = rngs or nnx.Rngs(cfg.seed)
  targets = lora_targets(model, cfg.pattern)
  if not targets:
    raise ValueError(f'LoRA pattern {cfg.pattern!r} matches no Linear module of the model')
  for _, lin in targets:
    lin.add_lora(cfg.rank, cfg.alpha, rngs)
  return [p for p, _ in targets]


def _adapted(model):
  return [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.lora_a is not None]


def _delta(lin: Linear) -> jax.Array:
  a = lin.lora_a.get_value().astype(jnp.float32)
  b = lin.lora_b.get_value().astype(jnp.float32)
  return (a @ b) * lin.lora_scale


def merged_kernel(lin: Linear, dtype=None) -> jax.Array:
  """``kernel + A @ B * alpha / r`` of one adapted Linear, summed in float32 and rounded once to ``dtype``
  (default: the kernel's dtype). The module is not changed."""
  k = lin.kernel.get_value()
  return (k.astype(jnp.float32) + _delta(lin)).astype(dtype or k.dtype)


def merged_kernels(model: nnx.Module) -> dict[tuple, jax.Array]:
  """{kernel path: merged kernel} for each adapted Linear (the model is not changed)."""
  return {tuple(path) + ('kernel',): merged_kernel(lin) for path, lin in _adapted(model)}


def merge_lora(model: nnx.Module) -> int:
  """Folds every adapter into its kernel and removes it, in place. Returns how many were merged."""
  n = 0
  for _, lin in _adapted(model):
    lin.kernel.set_value(merged_kernel(lin))
    lin.lora_a = None
    lin.lora_b = None
    lin.lora_scale = 0.0
    n += 1
  return n


def adapter_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
  out = {}
  for path, lin in _adapted(model):
    p = _path_str(path)
    out[f'{p}/lora_a'] = np.asarray(jax.device_get(lin.lora_a.get_value()))
    out[f'{p}/lora_b'] = np.asarray(jax.device_get(lin.lora_b.get_value()))
  return out


def save_adapters(model: nnx.Module, path: str) -> str:
  """Writes ``adapters.safetensors`` + ``adapter_config.json`` (rank, alpha, modules) into directory ``path``."""
  from safetensors.numpy import save_file

  adapted = _adapted(model)
  if not adapted:
    raise ValueError('the model has no LoRA adapters to save')
  os.makedirs(path, exist_ok=True)
  save_file(adapter_tensors(model), os.path.join(path, 'adapters.safetensors'))
  meta = {'modules': {_path_str(p): {'rank': int(l.lora_a.get_value().shape[1]), 'scale': l.lora_scale}
                      for p, l in adapted}}
  with open(os.path.join(path, 'adapter_config.json'), 'w') as f:
    json.dump(meta, f, indent=2)
  return path


def load_adapters(model: nnx.Module, path: str) -> nnx.Module:
  """Attaches (or overwrites) adapters from :func:`save_adapters` output; shapes and module names are checked."""
  from safetensors.numpy import load_file

  cfg_f, ten_f = os.path.join(path, 'adapter_config.json'), os.path.join(path, 'adapters.safetensors')
  for f in (cfg_f, ten_f):
    if not os.path.exists(f):
      raise FileNotFoundError(f'LoRA adapter directory {path!r}: missing {os.path.basename(f)}')
  with open(cfg_f) as f:
    meta = json.load(f)['modules']
  tensors = load_file(ten_f)
  linears = {_path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, Linear)}
  for name, m in meta.items():
    if name not in linears:
      raise ValueError(f'{cfg_f}: adapter for {name!r}, which is not a Linear module of this model')
    lin = linears[name]
    a, b = tensors.get(f'{name}/lora_a'), tensors.get(f'{name}/lora_b')
    if a is None or b is None:
      raise ValueError(f'{ten_f}: missing {name}/lora_a or {name}/lora_b')
    want_a, want_b = (lin.in_features, m['rank']), (m['rank'], lin.out_features)
    if a.shape != want_a or b.shape != want_b:
      raise ValueError(f'{ten_f}: {name} adapter shapes {a.shape}, {b.shape}; the model expects {want_a}, {want_b}')
    lin.lora_a = nnx.LoRAParam(jnp.asarray(a, LORA_DTYPE))
    lin.lora_b = nnx.LoRAParam(jnp.asarray(b, LORA_DTYPE))
    lin.lora_scale = float(m['scale'])
  return model
