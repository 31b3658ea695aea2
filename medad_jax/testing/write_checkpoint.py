"""Qwen2.5-VL checkpoints in the layout of the released ones, for tests and for running the true model shapes.

The public ``Qwen/Qwen2.5-VL-3B-Instruct`` directory holds bfloat16 safetensors shards with a
``model.safetensors.index.json``, transformers-4 tensor names (``model.layers.*``, ``visual.*``, ``lm_head.weight``
when the head is untied) and a *flat* ``config.json`` (text fields at the top level, ``rope_scaling`` =
``{"type": "mrope", "mrope_section": [...]}``, ``vision_config`` with ``in_chans``), plus the tokenizer files.
This module writes directories of that layout:

* :func:`write_random_checkpoint` -- random weights for any preset of ``Qwen25VLConfig`` (``qwen2_5_vl_3b``
  included), generated tensor by tensor and written one shard at a time (host memory ~2 shards, not the model),
  with the Qwen2 tokenizer files when the preset uses Qwen2's vocabulary;
* :func:`write_hf_model` -- the weights of a transformers ``Qwen2_5_VLForConditionalGeneration`` (tests).

Command line (random weights; ~7.5 GB for the 3B preset)::

    python -m medad_jax.testing.write_checkpoint --preset=qwen2_5_vl_3b --out=/tmp/qwen25vl3b-random
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Callable, Iterable

import numpy as np

from medad_jax.model.checkpoint import (DEFAULT_SHARD_BYTES, EXPORT_DTYPES, FLOAT_DTYPES, canonical_hf_key,
                                        hf_tensor_specs, write_safetensors_shards)
from medad_jax.model.config import Qwen25VLConfig, to_hf_dict

log = logging.getLogger(__name__)

INIT_STD = 0.02  # transformers' ``initializer_range`` for Qwen2.5-VL
_CHUNK = 1 << 24  # elements generated at a time (64 MiB of float32)


def hub_config_dict(cfg: Qwen25VLConfig, dtype: str = 'bfloat16') -> dict:
  """The flat hub ``config.json`` of the released Qwen2.5-VL checkpoints (transformers-4 layout), from the nested
  one :func:`~medad_jax.model.config.to_hf_dict` writes."""
  nested = to_hf_dict(cfg)
  t, v = nested['text_config'], nested['vision_config']
  flat = {k: val for k, val in t.items() if k not in ('rope_parameters', 'model_type')}
  vision = {k: val for k, val in v.items() if k not in ('rope_parameters', 'model_type', 'in_channels')}
  vision.update(in_chans=v['in_channels'], spatial_patch_size=v['patch_size'])
  flat.update(
      architectures=nested['architectures'], model_type='qwen2_5_vl', attention_dropout=0.0,
      initializer_range=INIT_STD, max_window_layers=t['num_hidden_layers'], sliding_window=32768,
      use_sliding_window=False, use_cache=True, rope_theta=t['rope_parameters']['rope_theta'],
      rope_scaling={'type': 'mrope', 'mrope_section': list(t['rope_parameters']['mrope_section'])},
      image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
      vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
      tie_word_embeddings=cfg.text.tie_word_embeddings, torch_dtype=dtype, transformers_version='4.41.2',
      vision_config=vision)
  return flat


def uses_qwen2_vocabulary(cfg: Qwen25VLConfig) -> bool:
  """Whether ``cfg``'s special-token ids are those of the Qwen2 tokenizer (the 3B / 7B presets)."""
  from medad_jax.tokenizer import QWEN2_NUM_BPE_TOKENS, QWEN2_SPECIAL_TOKENS
  ids = {c: QWEN2_NUM_BPE_TOKENS + i for i, (c, _) in enumerate(QWEN2_SPECIAL_TOKENS)}
  return (cfg.text.vocab_size >= QWEN2_NUM_BPE_TOKENS + len(QWEN2_SPECIAL_TOKENS)
          and cfg.image_token_id == ids['<|image_pad|>'] and cfg.vision_start_token_id == ids['<|vision_start|>']
          and cfg.vision_end_token_id == ids['<|vision_end|>'] and cfg.pad_token_id == ids['<|endoftext|>'])


def _write_metadata(cfg: Qwen25VLConfig, out: str, dtype: str, tokenizer: bool) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(hub_config_dict(cfg, dtype), f, indent=2)
  with open(os.path.join(out, 'generation_config.json'), 'w') as f:
    json.dump({'bos_token_id': cfg.pad_token_id, 'eos_token_id': list(cfg.eos_token_ids),
               'pad_token_id': cfg.pad_token_id}, f, indent=2)
  if tokenizer:
    from medad_jax.tokenizer import qwen2_tokenizer
    qwen2_tokenizer().save_pretrained(out)


def _check_dtype(dtype: str) -> np.dtype:
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f'dtype={dtype!r}: expected one of {EXPORT_DTYPES}')
  return FLOAT_DTYPES[dtype]


def _random_tensor(shape: tuple[int, ...], dtype: np.dtype, kind: str, seed: tuple[int, int]) -> np.ndarray:
  """``kind``: 'ones' (norm scales), 'zeros' (biases) or 'normal' (N(0, INIT_STD**2), generated in chunks so the
  float32 temporaries stay small)."""
  if kind == 'ones':
    return np.ones(shape, dtype)
  if kind == 'zeros':
    return np.zeros(shape, dtype)
  rng = np.random.default_rng(seed)
  out = np.empty(shape, dtype)
  flat = out.reshape(-1)
  for i in range(0, flat.size, _CHUNK):
    n = min(_CHUNK, flat.size - i)
    flat[i:i + n] = (INIT_STD * rng.standard_normal(n, dtype=np.float32)).astype(dtype)
  return out


def _init_kind(name: str) -> str:
  if name.endswith('.bias'):
    return 'zeros'
  if 'norm' in name or '.ln_q.' in name:  # RMSNorm scales: input/post_attention_layernorm, norm1/2, norm, ln_q
    return 'ones'
  return 'normal'


def write_random_checkpoint(cfg: Qwen25VLConfig | str, out: str, *, seed: int = 0, dtype: str = 'bfloat16',
                            max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: str = 'auto') -> dict:
  """Writes a random-weight Qwen2.5-VL checkpoint of ``cfg`` (a config or a preset name) in the hub layout.

  Weights follow transformers' initialisation (normal ``INIT_STD`` for matrices and embeddings, ones for the
  RMSNorm scales, zeros for biases); each tensor is generated from its own seed ``(seed, index)`` straight in
  ``dtype``. ``tokenizer``: ``'auto'`` writes the Qwen2 tokenizer files when the config uses Qwen2's token ids,
  ``'qwen2'`` always, ``'none'`` never. Returns ``{'files', 'tensors', 'bytes', 'seconds'}``.
  """
  t0 = time.time()
  cfg = Qwen25VLConfig.preset(cfg) if isinstance(cfg, str) else cfg
  np_dt = _check_dtype(dtype)
  if tokenizer not in ('auto', 'qwen2', 'none'):
    raise ValueError(f'tokenizer={tokenizer!r}: expected "auto", "qwen2" or "none"')
  if tokenizer == 'qwen2' and not uses_qwen2_vocabulary(cfg):
    raise ValueError('tokenizer="qwen2" but the config does not use the Qwen2 vocabulary and special-token ids')
  with_tok = tokenizer == 'qwen2' or (tokenizer == 'auto' and uses_qwen2_vocabulary(cfg))
  _write_metadata(cfg, out, dtype, with_tok)
  entries = []
  for i, (name, shape, _, _) in enumerate(hf_tensor_specs(cfg)):
    entries.append((name, shape, np_dt,
                    lambda shape=shape, kind=_init_kind(name), i=i: _random_tensor(shape, np_dt, kind, (seed, i))))
  files = write_safetensors_shards(out, entries, max_shard_bytes=max_shard_bytes)
  nbytes = sum(os.path.getsize(os.path.join(out, f)) for f in files)
  secs = time.time() - t0
  log.info('wrote %d tensors (%.2f GB in %d file(s)) to %s in %.0f s', len(entries), nbytes / 1e9, len(files),
           out, secs)
  return {'files': files, 'tensors': len(entries), 'bytes': nbytes, 'seconds': secs}


def write_hf_model(model, cfg: Qwen25VLConfig, out: str, *, dtype: str = 'bfloat16',
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
  """The weights of a transformers ``Qwen2_5_VLForConditionalGeneration`` in the hub layout: tensor names in the
  transformers-4 layout, rounded once to ``dtype`` (round to nearest even, as ``tensor.to(torch.bfloat16)``),
  sharded with an index past ``max_shard_bytes``, flat ``config.json``. A tied head is not stored (as in the
  released 3B checkpoint). Returns the safetensors file names."""
  np_dt = _check_dtype(dtype)
  _write_metadata(cfg, out, dtype, tokenizer=False)
  sd = model.state_dict()
  entries: list[tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]] = []
  for k, v in sd.items():
    name = canonical_hf_key(k)
    if name == 'lm_head.weight' and cfg.text.tie_word_embeddings:
      continue
    entries.append((name, tuple(v.shape), np_dt, lambda v=v: v.detach().float().numpy().astype(np_dt)))
  return write_safetensors_shards(out, entries, max_shard_bytes=max_shard_bytes)


def main(argv: Iterable[str] | None = None) -> dict:
  p = argparse.ArgumentParser(prog='python -m medad_jax.testing.write_checkpoint', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--preset', required=True, help='a Qwen25VLConfig preset: qwen2_5_vl_3b, qwen2_5_vl_7b, small, '
                 'mini, tiny')
  p.add_argument('--out', required=True, help='directory to write (created; existing files are overwritten)')
  p.add_argument('--dtype', default='bfloat16', choices=EXPORT_DTYPES)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--max_shard_gb', type=float, default=DEFAULT_SHARD_BYTES / 2**30,
                 help='shard size limit in GiB (default %(default)s; writing needs about twice that in memory)')
  p.add_argument('--tokenizer', default='auto', choices=('auto', 'qwen2', 'none'))
  args = p.parse_args(None if argv is None else list(argv))
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  try:
    cfg = Qwen25VLConfig.preset(args.preset)
  except ValueError as e:
    p.error(str(e))
  res = write_random_checkpoint(cfg, args.out, seed=args.seed, dtype=args.dtype,
                                max_shard_bytes=int(args.max_shard_gb * 2**30), tokenizer=args.tokenizer)
  print(f'{args.out}: {res["tensors"]} tensors, {res["bytes"] / 1e9:.2f} GB in {len(res["files"])} file(s), '
        f'{res["seconds"]:.0f} s')
  return res


if __name__ == '__main__':
  main()
