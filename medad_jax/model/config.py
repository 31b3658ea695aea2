"""Architecture presets for the Qwen2.5-VL policy, as frozen dataclasses.

Experiment configs (``configs/*.py``) only *pick* a preset by name (``model.preset='qwen2_5_vl_3b'``) or point
at a checkpoint directory whose ``config.json`` is read by :func:`from_hf_config`.

``from_hf_config`` understands both layouts found in the wild:

* the flat hub layout of the released checkpoints (text fields at the top level, ``rope_scaling`` with
  ``mrope_section``, ``vision_config`` nested);
* the nested transformers-5 layout (``text_config``, ``vision_config``, ``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  num_heads: int = 16
  intermediate_size: int = 3420
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  out_hidden_size: int = 2048
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tokens_per_second: int = 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch, ``C * T_patch * P * P`` (the processor's ``pixel_values`` width)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 151936
  hidden_size: int = 2048
  num_layers: int = 36
  num_heads: int = 16
  num_kv_heads: int = 2
  intermediate_size: int = 11008
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 128000

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  """Whole-model configuration. ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype.

  Softmax, RMSNorm statistics and rotary embeddings are always computed in float32 whatever ``dtype`` is.
  """

  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  # Generation-time special tokens of the Qwen2 tokenizer.
  eos_token_ids: tuple[int, ...] = (151645, 151643)  # <|im_end|>, <|endoftext|>
  pad_token_id: int = 151643
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  # Runtime choices (not architecture; never written to a checkpoint's config.json): the attention kernel of the
  # decoder and the vision tower ('xla' | 'cudnn' | 'auto', see text.py) and rematerialisation of decoder layers
  # and vision blocks in the backward pass ('none' | 'full' | 'dots'), and whether the cached decode runs the
  # decoder layers as one scan (text.py ``TextModel._scan_layers``: one layer's weights in flight; for XLA:CPU
  # with bf16 weights, which otherwise keeps an fp32 copy of every decoder weight through the decode loop).
  attention: str = 'xla'
  remat: str = 'none'
  decode_scan: bool = False

  def replace(self, **kw) -> 'Qwen25VLConfig':
    return dataclasses.replace(self, **kw)

  # ------------------------------------------------------------------ presets
  @classmethod
  def qwen2_5_vl_3b(cls) -> 'Qwen25VLConfig':
    """Exact shapes of the public Qwen2.5-VL-3B-Instruct ``config.json``."""
    return cls(
        text=TextConfig(vocab_size=151936, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2,
                        intermediate_size=11008, rope_theta=1e6, mrope_section=(16, 24, 24),
                        rms_norm_eps=1e-6, tie_word_embeddings=True),
        vision=VisionConfig(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14,
                            temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                            fullatt_block_indexes=(7, 15, 23, 31), out_hidden_size=2048),
    )

  @classmethod
  def qwen2_5_vl_7b(cls) -> 'Qwen25VLConfig':
    """Exact shapes of the public Qwen2.5-VL-7B-Instruct ``config.json``."""
    return cls(
        text=TextConfig(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                        intermediate_size=18944, rope_theta=1e6, mrope_section=(16, 24, 24),
                        rms_norm_eps=1e-6, tie_word_embeddings=False),
        vision=VisionConfig(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14,
                            temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                            fullatt_block_indexes=(7, 15, 23, 31), out_hidden_size=3584),
    )

  @classmethod
  def tiny(cls, vocab_size: int = 512, tie_word_embeddings: bool = False) -> 'Qwen25VLConfig':
    """A few-hundred-k parameter model for unit tests: 2 windows per image side, GQA 2:1, 2 layers."""
    v = vocab_size
    return cls(
        text=TextConfig(vocab_size=v, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=128, rope_theta=1e6, mrope_section=(2, 3, 3), rms_norm_eps=1e-6,
                        tie_word_embeddings=tie_word_embeddings, max_position_embeddings=4096),
        vision=VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, patch_size=14,
                            temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                            fullatt_block_indexes=(1,), out_hidden_size=64),
        image_token_id=v - 6, video_token_id=v - 5, vision_start_token_id=v - 4, vision_end_token_id=v - 3,
        eos_token_ids=(v - 2, v - 1), pad_token_id=v - 1,
    )

  @classmethod
  def small(cls, vocab_size: int = 4096) -> 'Qwen25VLConfig':
    """A ~31M-parameter model (8 decoder layers, width 512, tied head, 4-block vision tower) for CPU runs."""
    v = vocab_size
    return cls(
        text=TextConfig(vocab_size=v, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
                        intermediate_size=1536, rope_theta=1e6, mrope_section=(8, 12, 12), rms_norm_eps=1e-6,
                        tie_word_embeddings=True, max_position_embeddings=8192),
        vision=VisionConfig(depth=4, hidden_size=256, num_heads=4, intermediate_size=640, patch_size=14,
                            temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                            fullatt_block_indexes=(1, 3), out_hidden_size=512),
        image_token_id=v - 6, video_token_id=v - 5, vision_start_token_id=v - 4, vision_end_token_id=v - 3,
        eos_token_ids=(v - 2, v - 1), pad_token_id=v - 1,
    )

  @classmethod
  def mini(cls, vocab_size: int = 2048) -> 'Qwen25VLConfig':
    """A ~4M-parameter model for the embedded CPU run (``--config=congrpo``): the Qwen2.5-VL architecture (window
    attention, M-RoPE, GQA 2:1, tied head) at a width that trains SFT + Con-GRPO in minutes on two cores."""
    v = vocab_size
    return cls(
        text=TextConfig(vocab_size=v, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                        intermediate_size=768, rope_theta=1e6, mrope_section=(8, 12, 12), rms_norm_eps=1e-6,
                        tie_word_embeddings=True, max_position_embeddings=8192),
        vision=VisionConfig(depth=2, hidden_size=128, num_heads=2, intermediate_size=384, patch_size=14,
                            temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                            fullatt_block_indexes=(1,), out_hidden_size=256),
        image_token_id=v - 6, video_token_id=v - 5, vision_start_token_id=v - 4, vision_end_token_id=v - 3,
        eos_token_ids=(v - 2, v - 1), pad_token_id=v - 1,
    )

  @classmethod
  def micro(cls, vocab_size: int = 2048) -> 'Qwen25VLConfig':
    """:meth:`mini`'s vision tower (its merger projecting to 128) under a 2-layer decoder of width 128 (head
    dimension 64 and M-RoPE sections as in ``mini``, GQA 2:1): the policy of the CI learning check
    (``--config=congrpo:quick``); its decoder layers hold 1/8 of ``mini``'s weights (2 x 196,608 against
    4 x 786,432)."""
    m, v = cls.mini(vocab_size), vocab_size
    return dataclasses.replace(
        m, text=dataclasses.replace(m.text, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                                    intermediate_size=384),
        vision=dataclasses.replace(m.vision, out_hidden_size=128))

  @classmethod
  def preset(cls, name: str) -> 'Qwen25VLConfig':
    presets = {'qwen2_5_vl_3b': cls.qwen2_5_vl_3b, 'qwen2_5_vl_7b': cls.qwen2_5_vl_7b, 'tiny': cls.tiny,
               'small': cls.small, 'mini': cls.mini, 'micro': cls.micro}
    if name not in presets:
      raise ValueError(f'unknown model preset {name!r}; expected one of {sorted(presets)}')
    return presets[name]()


# The presets a run builds with random weights (no public checkpoint has their shapes); the others need
# ``model.checkpoint`` (configs/common.py).
RANDOM_INIT_PRESETS = ('tiny', 'micro', 'mini', 'small')


# ---------------------------------------------------------------------- HF config.json


def _get(d: dict, key: str, default: Any = dataclasses.MISSING, where: str = 'config.json'):
  if key in d:
    return d[key]
  if default is dataclasses.MISSING:
    raise KeyError(f'{where}: missing required key {key!r}')
  return default


def from_hf_dict(hf: dict, where: str = 'config.json', **overrides) -> Qwen25VLConfig:
  """Builds a :class:`Qwen25VLConfig` from a parsed Qwen2.5-VL ``config.json`` (either layout)."""
  mt = hf.get('model_type')
  if mt not in ('qwen2_5_vl', None):
    raise ValueError(f'{where}: model_type is {mt!r}, expected "qwen2_5_vl"')
  text = hf.get('text_config') or {}
  # In the flat hub layout the text fields live at the top level; in the nested layout some (e.g.
  # tie_word_embeddings, token ids) may be duplicated at the top level. Prefer text_config, fall back to top.
  t = {**{k: v for k, v in hf.items() if k not in ('text_config', 'vision_config')}, **text}
  rope = t.get('rope_parameters') or t.get('rope_scaling') or {}
  mrope = rope.get('mrope_section')
  if mrope is None:
    raise KeyError(f'{where}: no mrope_section in rope_parameters / rope_scaling')
  rope_theta = rope.get('rope_theta', t.get('rope_theta', 1e6))
  tie = hf.get('tie_word_embeddings', t.get('tie_word_embeddings', False)) or text.get('tie_word_embeddings', False)
  tc = TextConfig(
      vocab_size=_get(t, 'vocab_size', where=where), hidden_size=_get(t, 'hidden_size', where=where),
      num_layers=_get(t, 'num_hidden_layers', where=where), num_heads=_get(t, 'num_attention_heads', where=where),
      num_kv_heads=t.get('num_key_value_heads') or t['num_attention_heads'],
      intermediate_size=_get(t, 'intermediate_size', where=where), rope_theta=float(rope_theta),
      mrope_section=tuple(int(x) for x in mrope), rms_norm_eps=float(t.get('rms_norm_eps', 1e-6)),
      tie_word_embeddings=bool(tie), max_position_embeddings=int(t.get('max_position_embeddings', 128000)))
  v = _get(hf, 'vision_config', where=where)
  vrope = v.get('rope_parameters') or {}
  patch = v.get('patch_size', 14)
  tpatch = v.get('temporal_patch_size', 2)
  vc = VisionConfig(
      depth=_get(v, 'depth', where=where + ':vision_config'),
      hidden_size=_get(v, 'hidden_size', where=where + ':vision_config'),
      num_heads=_get(v, 'num_heads', where=where + ':vision_config'),
      intermediate_size=_get(v, 'intermediate_size', where=where + ':vision_config'),
      in_channels=v.get('in_channels', v.get('in_chans', 3)),
      patch_size=int(patch[0] if isinstance(patch, (list, tuple)) else patch),
      temporal_patch_size=int(tpatch[0] if isinstance(tpatch, (list, tuple)) else tpatch),
      spatial_merge_size=v.get('spatial_merge_size', 2), window_size=v.get('window_size', 112),
      fullatt_block_indexes=tuple(v.get('fullatt_block_indexes', (7, 15, 23, 31))),
      out_hidden_size=_get(v, 'out_hidden_size', where=where + ':vision_config'),
      rope_theta=float(vrope.get('rope_theta', 10000.0)), tokens_per_second=v.get('tokens_per_second', 2))
  eos = t.get('eos_token_id', 151645)
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
  # Qwen checkpoints often leave pad_token_id null; generation then pads with <|endoftext|> (151643).
  pad = t.get('pad_token_id')
  if pad is None:
    pad = 151643 if tc.vocab_size > 151643 else eos[-1]
  cfg = Qwen25VLConfig(
      text=tc, vision=vc, image_token_id=hf.get('image_token_id', 151655),
      video_token_id=hf.get('video_token_id', 151656),
      vision_start_token_id=hf.get('vision_start_token_id', 151652),
      vision_end_token_id=hf.get('vision_end_token_id', 151653), eos_token_ids=eos, pad_token_id=int(pad))
  return cfg.replace(**overrides) if overrides else cfg


def from_hf_config(path: str, **overrides) -> Qwen25VLConfig:
  """Reads ``config.json`` from a checkpoint directory (or the file itself)."""
  f = os.path.join(path, 'config.json') if os.path.isdir(path) else path
  if not os.path.exists(f):
    raise FileNotFoundError(f'no config.json at {f!r} (expected a Hugging Face Qwen2.5-VL checkpoint directory)')
  with open(f) as fh:
    try:
      hf = json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f'{f}: not valid JSON ({e})') from e
  gen = os.path.join(os.path.dirname(f), 'generation_config.json')
  if os.path.exists(gen) and 'eos_token_ids' not in overrides:
    # generation_config.json lists every stop id (<|im_end|> and <|endoftext|>); config.json usually only one.
    with open(gen) as fh:
      try:
        eos = json.load(fh).get('eos_token_id')
      except json.JSONDecodeError as e:
        raise ValueError(f'{gen}: not valid JSON ({e})') from e
    if eos is not None:
      overrides['eos_token_ids'] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
  return from_hf_dict(hf, where=f, **overrides)


def to_hf_dict(cfg: Qwen25VLConfig) -> dict:
  """The transformers-5 nested ``config.json`` for export (transformers also reads it back)."""
  t, v = cfg.text, cfg.vision
  return {
      'architectures': ['Qwen2_5_VLForConditionalGeneration'], 'model_type': 'qwen2_5_vl',
      'image_token_id': cfg.image_token_id, 'video_token_id': cfg.video_token_id,
      'vision_start_token_id': cfg.vision_start_token_id, 'vision_end_token_id': cfg.vision_end_token_id,
      'tie_word_embeddings': t.tie_word_embeddings, 'dtype': cfg.param_dtype,
      'text_config': {
          'model_type': 'qwen2_5_vl_text', 'vocab_size': t.vocab_size, 'hidden_size': t.hidden_size,
          'num_hidden_layers': t.num_layers, 'num_attention_heads': t.num_heads,
          'num_key_value_heads': t.num_kv_heads, 'intermediate_size': t.intermediate_size, 'hidden_act': 'silu',
          'rms_norm_eps': t.rms_norm_eps, 'max_position_embeddings': t.max_position_embeddings,
          'tie_word_embeddings': t.tie_word_embeddings,
          'rope_parameters': {'rope_type': 'default', 'rope_theta': t.rope_theta,
                              'mrope_section': list(t.mrope_section)},
          'eos_token_id': cfg.eos_token_ids[0], 'pad_token_id': cfg.pad_token_id,
          'bos_token_id': cfg.pad_token_id,
      },
      'vision_config': {
          'model_type': 'qwen2_5_vl_vision', 'depth': v.depth, 'hidden_size': v.hidden_size,
          'num_heads': v.num_heads, 'intermediate_size': v.intermediate_size, 'hidden_act': 'silu',
          'in_channels': v.in_channels, 'patch_size': v.patch_size, 'temporal_patch_size': v.temporal_patch_size,
          'spatial_merge_size': v.spatial_merge_size, 'window_size': v.window_size,
          'fullatt_block_indexes': list(v.fullatt_block_indexes), 'out_hidden_size': v.out_hidden_size,
          'tokens_per_second': v.tokens_per_second,
          'rope_parameters': {'rope_type': 'axial', 'rope_theta': v.rope_theta},
      },
  }
