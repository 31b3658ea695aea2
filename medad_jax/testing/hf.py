"""Tiny random Qwen2.5-VL checkpoints, built with ``transformers`` (PyTorch, CPU) and ``save_pretrained``.

The reference model is re-initialised with weights of a realistic scale (std 0.1 around 0, norms around 1) so
that parity tests compare non-trivial activations rather than values that vanish under HF's 0.02 init.
"""

from __future__ import annotations

import os

from medad_jax.model.config import Qwen25VLConfig, TextConfig, VisionConfig, to_hf_dict


def tiny_configs() -> dict[str, Qwen25VLConfig]:
  """The two parity configs: (a) untied head, GQA 2:1, 56-px windows; (b) tied head, GQA 4:1, 112-px windows."""
  a = Qwen25VLConfig.tiny(vocab_size=512, tie_word_embeddings=False)
  v = 384
  b = Qwen25VLConfig(
      text=TextConfig(vocab_size=v, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=1,
                      intermediate_size=96, rope_theta=1e4, mrope_section=(4, 2, 2), rms_norm_eps=1e-6,
                      tie_word_embeddings=True, max_position_embeddings=4096),
      vision=VisionConfig(depth=3, hidden_size=48, num_heads=3, intermediate_size=80, patch_size=14,
                          temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                          fullatt_block_indexes=(0, 2), out_hidden_size=64),
      image_token_id=v - 6, video_token_id=v - 5, vision_start_token_id=v - 4, vision_end_token_id=v - 3,
      eos_token_ids=(v - 2, v - 1), pad_token_id=v - 1)
  return {'untied_gqa2_win56': a, 'tied_gqa4_win112': b}


def build_hf_model(cfg: Qwen25VLConfig, seed: int = 0):
  """A ``Qwen2_5_VLForConditionalGeneration`` in fp32 eval mode with realistic-scale random weights."""
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

  hf_cfg = Qwen2_5_VLConfig(**to_hf_dict(cfg))
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(hf_cfg).float().eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight') or 'norm1' in name or 'norm2' in name or 'ln_q' in name or name.endswith(
          'layernorm.weight'):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      elif 'embed_tokens' in name:
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
  return model


def save_hf_checkpoint(cfg: Qwen25VLConfig, path: str, seed: int = 0, **save_kw):
  """Builds the reference model and writes it with ``save_pretrained`` (safetensors). Returns the model."""
  model = build_hf_model(cfg, seed)
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path, **save_kw)
  return model
