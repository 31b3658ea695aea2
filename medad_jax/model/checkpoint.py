"""Hugging Face <-> Flax checkpoint conversion for Qwen2.5-VL, driven by one declarative table.

``HF_TABLE`` maps each Hugging Face tensor name (hub layout: ``visual.*``, ``model.*``, ``lm_head.weight``) to
our NNX parameter path and a transform. The same table drives loading (:func:`load_checkpoint`,
:func:`load_hf_tensors`) and export (:func:`save_hf_checkpoint`), so the two can never disagree.

Loading reads one tensor at a time from safetensors (single file or a sharded ``model.safetensors.index.json``),
converts it to the configured ``param_dtype`` (files may hold float32, bfloat16 -- as the released checkpoints do
-- float16 or float64), and places it straight onto its target sharding (``jax.make_array_from_callback``: each
device takes only its slice), so a 3B model never needs a second full host copy; a shard is unmapped once read.
Only safetensors are read: a directory holding only ``pytorch_model*.bin`` files is refused (never unpickle).
Export converts and writes one shard at a time, in the parameters' dtype or the one asked for (``dtype=
'bfloat16'`` gives a directory the size of the released one).

Both key layouts written by transformers are accepted: the hub layout of released checkpoints and the
transformers-5 module layout (``model.visual.*``, ``model.language_model.*``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from medad_jax.model.config import Qwen25VLConfig, from_hf_config, to_hf_dict
from medad_jax.model.layers import BASE_PARAMS

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- transforms
# Each transform is a pair (to_flax, to_hf) of numpy functions; ``to_flax`` also receives the target shape.


def _transpose(w: np.ndarray, rows: int = 256) -> np.ndarray:
  """``np.ascontiguousarray(w.T)`` for a 2-D array, copied in blocks of ``rows`` rows: numpy's one-pass strided
  copy is cache-hostile on large matrices (the 3B embedding, 151936 x 2048 bf16, takes ~40 s that way on our CPU;
  in blocks ~5 s)."""
  out = np.empty(w.shape[::-1], w.dtype)
  for i in range(0, w.shape[0], rows):
    out[:, i:i + rows] = w[i:i + rows].T
  return out


def _linear_to_flax(w, shape):
  return _transpose(w)


def _linear_to_hf(k, hf_shape):
  return _transpose(k)


def _patch_to_flax(w, shape):
  # conv3d weight [Dv, C, Tp, p, p] -> kernel [C*Tp*p*p, Dv]; pixel rows are flattened in (C, Tp, p, p) order.
  return _transpose(w.reshape(w.shape[0], -1))


def _patch_to_hf(k, hf_shape):
  return _transpose(k).reshape(hf_shape)


def _same(x, shape):
  return x


TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    'linear': (_linear_to_flax, _linear_to_hf),
    'patch': (_patch_to_flax, _patch_to_hf),
    'none': (_same, _same),
}


@dataclasses.dataclass(frozen=True)
class Row:
  hf: str        # regex over the hub-layout HF name; groups feed ``ours``
  ours: str      # our path, '/'-separated, with {0} {1} placeholders for regex groups
  transform: str  # key into TRANSFORMS


HF_TABLE: tuple[Row, ...] = (
    # vision tower
    Row(r'visual\.patch_embed\.proj\.weight', 'visual/patch_embed/proj/kernel', 'patch'),
    Row(r'visual\.blocks\.(\d+)\.norm([12])\.weight', 'visual/blocks/{0}/norm{1}/scale', 'none'),
    Row(r'visual\.blocks\.(\d+)\.attn\.(qkv|proj)\.weight', 'visual/blocks/{0}/attn/{1}/kernel', 'linear'),
    Row(r'visual\.blocks\.(\d+)\.attn\.(qkv|proj)\.bias', 'visual/blocks/{0}/attn/{1}/bias', 'none'),
    Row(r'visual\.blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight', 'visual/blocks/{0}/mlp/{1}/kernel',
        'linear'),
    Row(r'visual\.blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.bias', 'visual/blocks/{0}/mlp/{1}/bias', 'none'),
    Row(r'visual\.merger\.ln_q\.weight', 'visual/merger/ln_q/scale', 'none'),
    Row(r'visual\.merger\.mlp\.([02])\.weight', 'visual/merger/mlp_{0}/kernel', 'linear'),
    Row(r'visual\.merger\.mlp\.([02])\.bias', 'visual/merger/mlp_{0}/bias', 'none'),
    # text decoder
    Row(r'model\.embed_tokens\.weight', 'model/embed_tokens/embedding', 'none'),
    Row(r'model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight',
        'model/layers/{0}/self_attn/{1}/kernel', 'linear'),
    Row(r'model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.bias', 'model/layers/{0}/self_attn/{1}/bias',
        'none'),
    Row(r'model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight', 'model/layers/{0}/mlp/{1}/kernel',
        'linear'),
    Row(r'model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight', 'model/layers/{0}/{1}/scale',
        'none'),
    Row(r'model\.norm\.weight', 'model/norm/scale', 'none'),
    Row(r'lm_head\.weight', 'lm_head/kernel', 'linear'),
)

_COMPILED = tuple((re.compile(r.hf + r'$'), r) for r in HF_TABLE)

# transformers-5 module layout -> hub layout
_LAYOUT_ALIASES = ((re.compile(r'^model\.visual\.'), 'visual.'), (re.compile(r'^model\.language_model\.'), 'model.'))


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: names the file/key and what was expected."""


def canonical_hf_key(key: str) -> str:
  for pat, rep in _LAYOUT_ALIASES:
    if pat.match(key):
      return pat.sub(rep, key, count=1)
  return key


def hf_key_to_path(key: str) -> tuple[tuple[str | int, ...], str] | None:
  """HF tensor name (either layout) -> (our parameter path, transform name), or None if not in the table."""
  key = canonical_hf_key(key)
  for pat, row in _COMPILED:
    m = pat.match(key)
    if m:
      parts = row.ours.format(*m.groups()).split('/')
      return tuple(int(p) if p.isdigit() else p for p in parts), row.transform
  return None


def path_to_hf_key(path: tuple) -> tuple[str, str] | None:
  """Our parameter path -> (hub-layout HF name, transform name): the table read backwards."""
  s = '/'.join(str(p) for p in path)
  for row in HF_TABLE:
    # Turn the template into a regex: each {i} captures the text that regex group i of ``row.hf`` matched.
    groups = re.findall(r'\((?!\?)[^)]*\)', row.hf)
    pat = re.escape(row.ours)
    for i, g in enumerate(groups):
      pat = pat.replace(re.escape('{%d}' % i), g)
    m = re.fullmatch(pat, s)
    if not m:
      continue
    it = iter(m.groups())
    hf = re.sub(r'\((?!\?)[^)]*\)', lambda _: next(it), row.hf).replace('\\.', '.')
    return hf, row.transform
  return None


# ----------------------------------------------------------------------------- reading tensors


# The floating-point storage dtypes a checkpoint tensor may have. numpy's bfloat16 is ml_dtypes' extension type
# (``dtype.kind == 'V'``), which safetensors returns for BF16 tensors; it is listed by name, not by kind.
FLOAT_DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16),
                'float16': np.dtype(np.float16), 'float64': np.dtype(np.float64)}
EXPORT_DTYPES = ('float32', 'bfloat16', 'float16')


def _np_dtype(name: str):
  if name not in FLOAT_DTYPES:
    raise ValueError(f'dtype {name!r}: expected one of {sorted(FLOAT_DTYPES)}')
  return FLOAT_DTYPES[name]


class SafetensorsReader:
  """Lazy, per-tensor access to a checkpoint directory's safetensors (single file or sharded index)."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.isdir(path):
      raise FileNotFoundError(f'checkpoint directory {path!r} does not exist')
    index = os.path.join(path, 'model.safetensors.index.json')
    single = os.path.join(path, 'model.safetensors')
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)['weight_map']
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f'{index}: expected JSON with a "weight_map" object ({e})') from e
      files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
      files, weight_map = ['model.safetensors'], None
    else:
      pickles = [f for f in os.listdir(path) if f.endswith(('.bin', '.pt', '.pth'))]
      hint = (f' Found {pickles}: pickled PyTorch weights are never loaded (arbitrary code execution); convert them '
              'to safetensors first.' if pickles else '')
      raise FileNotFoundError(f'{path}: no model.safetensors or model.safetensors.index.json.{hint}')
    self._handles: dict[str, Any] = {}
    self.key_to_file: dict[str, str] = {}
    self._unread: dict[str, set[str]] = {}
    for fn in files:
      h = self._open(fn)
      self._handles[fn] = h
      self._unread[fn] = set(h.keys())
      for k in h.keys():
        self.key_to_file[k] = fn
    if weight_map is not None:
      missing = sorted(k for k, fn in weight_map.items() if k not in self.key_to_file)
      if missing:
        raise CheckpointError(f'{index}: keys listed in the index but absent from their shard: {missing[:5]}')

  def _open(self, fn: str):
    from safetensors import safe_open
    full = os.path.join(self.path, fn)
    if not os.path.exists(full):
      raise FileNotFoundError(f'{self.path}: shard {fn!r} named in the index is missing')
    try:
      return safe_open(full, framework='np')
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise CheckpointError(f'{full}: not a readable safetensors file ({e})') from e

  def _handle(self, fn: str):
    if fn not in self._handles:
      self._handles[fn] = self._open(fn)
    return self._handles[fn]

  def keys(self) -> list[str]:
    return list(self.key_to_file)

  def get(self, key: str) -> np.ndarray:
    """The tensor (a copy). A shard is unmapped once each of its tensors has been read (its pages would otherwise
    stay in this process's resident memory until the end of the load); a later read maps it again."""
    fn = self.key_to_file[key]
    arr = self._handle(fn).get_tensor(key)
    unread = self._unread[fn]
    unread.discard(key)
    if not unread:
      self._handles.pop(fn, None)
    return arr

  def shape_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
    sl = self._handle(self.key_to_file[key]).get_slice(key)
    return tuple(sl.get_shape()), str(sl.get_dtype())


_ST_DTYPES = {'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16', 'F64': 'float64'}


# ----------------------------------------------------------------------------- assignment


def _flat_params(module_or_state) -> dict[tuple, Any]:
  state = (module_or_state if isinstance(module_or_state, nnx.State) else
           nnx.state(module_or_state, BASE_PARAMS))
  return {tuple(p): v for p, v in nnx.to_flat_state(state)}


def _module_prefix(module) -> tuple:
  """Where ``module`` sits in the full model's tree (so sub-modules can be loaded on their own)."""
  name = type(module).__name__
  return {'VisionTransformer': ('visual',), 'TextModel': ('model',)}.get(name, ())


def _hf_shape(transform: str, flax_shape) -> str:
  """The HF-side shape a Flax target corresponds to, for error messages."""
  if transform == 'linear':
    return str(tuple(flax_shape)[::-1])
  if transform == 'patch':
    return f'({flax_shape[1]}, C, Tp, p, p) with C*Tp*p*p = {flax_shape[0]}'
  return str(tuple(flax_shape))


def _check_and_convert(key: str, arr: np.ndarray, transform: str, target_shape, target_dtype, where: str):
  if arr.dtype not in FLOAT_DTYPES.values():
    raise CheckpointError(f'{where}: tensor {key!r} has dtype {arr.dtype}; expected a floating-point tensor '
                          f'({", ".join(FLOAT_DTYPES)})')
  expected = _hf_shape(transform, target_shape)
  if transform == 'patch' and (arr.ndim != 5 or arr.shape[0] != target_shape[1]
                               or int(np.prod(arr.shape[1:])) != target_shape[0]):
    raise CheckpointError(f'{where}: tensor {key!r} has shape {tuple(arr.shape)}; the model expects {expected}')
  out = TRANSFORMS[transform][0](arr, target_shape)
  if tuple(out.shape) != tuple(target_shape):
    raise CheckpointError(f'{where}: tensor {key!r} has shape {tuple(arr.shape)}; the model expects {expected}. '
                          'Is config.json from the same checkpoint?')
  # bf16 / fp16 -> fp32 is exact; fp32 -> bf16 rounds to nearest even (as torch's ``.to(torch.bfloat16)``).
  return out.astype(target_dtype, copy=False)


def _assign(flat_targets: dict[tuple, Any], get_tensor: Callable[[str], np.ndarray], hf_keys: Iterable[str],
            prefix: tuple, where: str, tied: bool, shardings: Mapping[tuple, Any] | None) -> dict[tuple, Any]:
  """Converts every HF tensor for the targets; checks missing / unexpected keys. Returns {path: jax.Array}."""
  loaded: dict[tuple, Any] = {}
  unexpected = []
  for key in hf_keys:
    hit = hf_key_to_path(key)
    if hit is None:
      unexpected.append(key)
      continue
    path, transform = hit
    if path[:len(prefix)] != prefix:
      continue  # belongs to another part of the model (e.g. loading only the vision tower)
    path = path[len(prefix):]
    if tied and path == ('lm_head', 'kernel'):
      continue  # transformers also ignores a stored lm_head when embeddings are tied
    if path not in flat_targets:
      unexpected.append(key)
      continue
    tgt = flat_targets[path]
    shape, dtype = tgt.get_value().shape, tgt.get_value().dtype
    arr = _check_and_convert(key, get_tensor(key), transform, shape, dtype, where)
    sharding = (shardings or {}).get(path)
    if sharding is not None:
      loaded[path] = jax.make_array_from_callback(shape, sharding, lambda idx, a=arr: a[idx])
    else:
      loaded[path] = jnp.asarray(arr)
    del arr
  if unexpected:
    raise CheckpointError(f'{where}: unexpected keys not used by the model: {sorted(unexpected)[:10]}'
                          f'{" ..." if len(unexpected) > 10 else ""} ({len(unexpected)} in all)')
  missing = [p for p in flat_targets if p not in loaded]
  if missing:
    names = []
    for p in missing[:10]:
      hf = path_to_hf_key(prefix + p)
      tshape = flat_targets[p].get_value().shape
      shape = _hf_shape(hf[1], tshape) if hf else tuple(tshape)
      names.append(f'{hf[0] if hf else "/".join(map(str, p))} (expected shape {shape})')
    raise CheckpointError(f'{where}: missing keys: {names}{" ..." if len(missing) > 10 else ""} '
                          f'({len(missing)} in all)')
  return loaded


def load_hf_tensors(module: nnx.Module, tensors: Mapping[str, np.ndarray], *, where: str = '<tensors>',
                    tied: bool | None = None) -> nnx.Module:
  """Assigns HF-named numpy tensors into ``module`` in place (full model, ``VisionTransformer`` or ``TextModel``).

  Keys for other parts of the model are ignored when loading a sub-module; for the full model every parameter
  must be present and every key used.
  """
  prefix = _module_prefix(module)
  flat = _flat_params(module)
  if tied is None:
    tied = prefix == () and getattr(module, 'lm_head', None) is None
  loaded = _assign(flat, lambda k: np.asarray(tensors[k]), list(tensors), prefix, where, tied, None)
  for path, arr in loaded.items():
    flat[path].set_value(arr)
  return module


def load_checkpoint(path: str, *, cfg: Qwen25VLConfig | None = None, dtype: str | None = None,
                    param_dtype: str | None = None, shardings: Callable[[tuple, Any], Any] | None = None,
                    lora=None):
  """Loads a local HF Qwen2.5-VL directory -> (model, cfg).

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
    cfg: optional config to use instead of reading ``config.json`` (shapes are still checked).
    dtype / param_dtype: compute / storage dtypes (default: float32 / the config's).
    shardings: optional ``fn(path, abstract_value) -> jax.sharding.Sharding`` (see ``medad_jax.sharding``);
      each tensor is placed straight onto its sharding.
    lora: optional ``medad_jax.model.lora.LoraConfig``; adapters are attached after the base is loaded.
  """
  from medad_jax.model.qwen25vl import Qwen25VL

  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint directory {path!r} does not exist')
  cfg = cfg or from_hf_config(path)
  overrides = {k: v for k, v in (('dtype', dtype), ('param_dtype', param_dtype)) if v is not None}
  cfg = cfg.replace(**overrides) if overrides else cfg
  reader = SafetensorsReader(path)
  abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = _flat_params(nnx.state(abstract, BASE_PARAMS))
  shard_map_ = {p: shardings(p, v.get_value()) for p, v in flat.items()} if shardings else None
  loaded = _assign(flat, reader.get, reader.keys(), (), path, cfg.text.tie_word_embeddings, shard_map_)
  for p, v in flat.items():
    v.set_value(loaded[p])
  model = nnx.merge(graphdef, nnx.state(abstract))
  log.info('loaded %d tensors from %s', len(loaded), path)
  if lora is not None:
    from medad_jax.model.lora import apply_lora
    apply_lora(model, lora, rngs=nnx.Rngs(lora.seed))
  return model, cfg


def hf_tensor_specs(cfg: Qwen25VLConfig) -> list[tuple[str, tuple[int, ...], tuple, str]]:
  """Every HF tensor of ``Qwen25VL(cfg)`` as ``(hub-layout name, HF shape, our path, transform)``, in the model's
  parameter order, from the abstract model (nothing is allocated). A tied head has no ``lm_head.weight``."""
  from medad_jax.model.qwen25vl import Qwen25VL
  abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
  hf_shapes = _hf_shapes(cfg)
  out = []
  for path, v in _flat_params(abstract).items():
    hit = path_to_hf_key(path)
    if hit is None:
      raise CheckpointError(f'parameter {"/".join(map(str, path))} has no entry in HF_TABLE')
    key, transform = hit
    shape = tuple(v.get_value().shape)
    out.append((key, hf_shapes.get(key, shape[::-1] if transform == 'linear' else shape), path, transform))
  return out


def _hf_tensor_producers(model: nnx.Module, merge_lora: bool, dtype: str | None
                         ) -> dict[str, tuple[tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]:
  """{HF name: (HF shape, numpy dtype, fn -> the tensor)} for our parameters; each tensor (its LoRA merge
  included) is computed only when its function is called, so an export holds one tensor at a time."""
  from medad_jax.model.lora import merged_kernel
  cfg: Qwen25VLConfig = model.cfg
  flat = _flat_params(model)
  adapted = {}
  if merge_lora:
    from medad_jax.model.layers import Linear
    adapted = {tuple(p) + ('kernel',): m for p, m in nnx.iter_modules(model)
               if isinstance(m, Linear) and m.lora_a is not None}
  out = {}
  for key, hf_shape, path, transform in hf_tensor_specs(cfg):
    v = flat[path].get_value()
    np_dt = _np_dtype(dtype) if dtype is not None else np.dtype(v.dtype)

    def produce(v=v, lin=adapted.get(path), transform=transform, hf_shape=hf_shape, np_dt=np_dt):
      x = merged_kernel(lin, dtype=jnp.float32) if lin is not None else v
      arr = np.asarray(jax.device_get(x))
      return TRANSFORMS[transform][1](arr, hf_shape).astype(np_dt, copy=False)

    out[key] = (hf_shape, np_dt, produce)
  return out


def hf_tensors_from_model(model: nnx.Module, *, merge_lora: bool = True, dtype: str | None = None
                          ) -> dict[str, np.ndarray]:
  """Our parameters (LoRA merged into the base kernels by default) -> HF hub-layout numpy tensors (all at once;
  :func:`save_hf_checkpoint` streams them instead)."""
  return {k: fn() for k, (_, _, fn) in _hf_tensor_producers(model, merge_lora, dtype).items()}


def _hf_shapes(cfg: Qwen25VLConfig) -> dict[str, tuple]:
  v = cfg.vision
  return {'visual.patch_embed.proj.weight': (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size,
                                             v.patch_size)}


SAFETENSORS_INDEX = 'model.safetensors.index.json'
# 1 GiB shards: writing one costs ~2 GiB of host memory (see write_safetensors_shards); loaders do not care.
DEFAULT_SHARD_BYTES = 2**30


def write_safetensors_shards(path: str, tensors: Iterable[tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]],
                             *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
  """Writes ``(name, shape, dtype, fn -> array)`` tensors, in the given order, as ``model.safetensors`` or, past
  ``max_shard_bytes``, as ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` (the
  layout transformers writes and the hub serves). Shards are planned from the shapes, then each is built by
  calling its tensors' functions and written with ``safetensors.numpy.save_file``, which holds the shard twice
  (the arrays and their serialised bytes): the host needs ~2 x ``max_shard_bytes`` on top of the caller's own
  arrays, never the whole checkpoint. Returns the file names written."""
  from safetensors.numpy import save_file

  plan, cur, size = [], [], 0
  for name, shape, dtype, fn in tensors:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if cur and size + nbytes > max_shard_bytes:
      plan.append(cur)
      cur, size = [], 0
    cur.append((name, tuple(shape), np.dtype(dtype), fn, nbytes))
    size += nbytes
  if cur:
    plan.append(cur)
  files = (['model.safetensors'] if len(plan) == 1 else
           [f'model-{i + 1:05d}-of-{len(plan):05d}.safetensors' for i in range(len(plan))])
  meta = {'format': 'pt'}  # transformers' loader expects this metadata value
  weight_map, total = {}, 0
  for fn_name, shard in zip(files, plan):
    arrays = {}
    for name, shape, dtype, fn, nbytes in shard:
      arr = fn()
      if tuple(arr.shape) != shape or arr.dtype != dtype:
        raise ValueError(f'tensor {name!r}: produced {arr.dtype}{tuple(arr.shape)}, planned {dtype}{shape}')
      arrays[name] = arr
      weight_map[name] = fn_name
      total += nbytes
    save_file(arrays, os.path.join(path, fn_name), metadata=meta)
    del arrays
  if len(files) > 1:
    with open(os.path.join(path, SAFETENSORS_INDEX), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  return files


def save_hf_checkpoint(model: nnx.Module, path: str, *, merge_lora: bool = True, dtype: str | None = None,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
  """Writes ``config.json``, ``generation_config.json`` and safetensors (sharded with an index past
  ``max_shard_bytes``) that transformers (and so SGLang / vLLM) load as a Qwen2.5-VL checkpoint.

  ``dtype`` (``'bfloat16'``, ``'float16'`` or ``'float32'``; default: each parameter's own dtype) is the storage
  dtype of the files: ``'bfloat16'`` makes the export the size of a released bf16 checkpoint, whatever dtype the
  model was trained in. LoRA adapters are merged in float32 and rounded once to that dtype. Tensors are converted
  and written one shard at a time (see :func:`write_safetensors_shards`).
  """
  if dtype is not None and dtype not in EXPORT_DTYPES:
    raise ValueError(f'save_hf_checkpoint: dtype={dtype!r}; expected one of {EXPORT_DTYPES} or None')
  cfg: Qwen25VLConfig = model.cfg
  producers = _hf_tensor_producers(model, merge_lora, dtype)
  os.makedirs(path, exist_ok=True)
  hf_cfg = to_hf_dict(cfg)
  if dtype is not None:
    hf_cfg['dtype'] = dtype
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf_cfg, f, indent=2)
  with open(os.path.join(path, 'generation_config.json'), 'w') as f:
    json.dump({'eos_token_id': list(cfg.eos_token_ids), 'pad_token_id': cfg.pad_token_id}, f, indent=2)
  files = write_safetensors_shards(path, [(k, *producers[k]) for k in sorted(producers)],
                                   max_shard_bytes=max_shard_bytes)
  log.info('exported %d tensors to %s (%d file(s))', len(producers), path, len(files))
  return path
