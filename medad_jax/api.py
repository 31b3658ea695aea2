"""Notebook API: a loaded policy that maps (image, question) to logits or a greedy answer.

    from medad_jax.api import Policy
    policy = Policy.from_pretrained('/path/to/Qwen2.5-VL-3B-Instruct')
    logits = policy.logits(image, 'Which region holds the lesion?')   # [T, V] float32
    text = policy.answer(image, 'Which region holds the lesion?')       # greedy decoding

The tokenizer comes from the checkpoint directory when it ships one (``tokenizer.json``), otherwise it is the
Qwen2 tokenizer rebuilt offline (:func:`medad_jax.tokenizer.qwen2_tokenizer`); its special-token ids are checked
against the model config either way.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from medad_jax.model.checkpoint import load_checkpoint
from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.qwen25vl import Qwen25VL, greedy_generate
from medad_jax.model.inputs import model_inputs

log = logging.getLogger(__name__)


def load_tokenizer(path: str | None):
  """``tokenizer.json`` of a checkpoint directory (read locally), else the offline-rebuilt Qwen2 tokenizer."""
  if path and os.path.exists(os.path.join(path, 'tokenizer.json')):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  from medad_jax.tokenizer import qwen2_tokenizer
  return qwen2_tokenizer()


class Policy:
  """A Qwen2.5-VL model with its processor; methods take PIL images (or arrays / paths) and question strings."""

  def __init__(self, model: Qwen25VL, processor, cfg: Qwen25VLConfig | None = None):
    self.model, self.processor = model, processor
    self.cfg = cfg or model.cfg
    for name in ('image_token_id', 'vision_start_token_id', 'vision_end_token_id'):
      a, b = getattr(processor, name), getattr(self.cfg, name)
      if a != b:
        raise ValueError(f'tokenizer and model disagree on {name}: tokenizer {a}, model config {b}')
    self._graphdef, self._state = nnx.split(model)
    self._forward = jax.jit(lambda state, inputs: nnx.merge(self._graphdef, state)(**inputs)[0])

  @classmethod
  def from_pretrained(cls, path: str, *, tokenizer=None, dtype: str | None = None, lora=None,
                      min_pixels: int | None = None, max_pixels: int | None = None) -> 'Policy':
    from medad_jax.processor import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, Qwen25VLProcessor
    model, cfg = load_checkpoint(path, dtype=dtype, lora=lora)
    tok = tokenizer if tokenizer is not None else load_tokenizer(path)
    proc = Qwen25VLProcessor(tok, cfg.vision, min_pixels=min_pixels or DEFAULT_MIN_PIXELS,
                             max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    return cls(model, proc, cfg)

  def inputs(self, image: Any, question: str) -> dict[str, np.ndarray]:
    """Processor output for one prompt, as a batch of one."""
    ex = self.processor(image, question)
    return {'input_ids': ex['input_ids'][None], 'attention_mask': ex['attention_mask'][None],
            'pixel_values': ex['pixel_values'], 'image_grid_thw': ex['image_grid_thw']}

  def logits(self, image: Any, question: str) -> np.ndarray:
    """Next-token logits at every prompt position: ``[T, V]`` float32."""
    batch = self.inputs(image, question)
    return np.asarray(self._forward(self._state, model_inputs(self.cfg, batch)))[0]

  def answer(self, image: Any, question: str, max_new_tokens: int = 128) -> str:
    """Greedy continuation of the chat prompt, decoded without special tokens (the think/answer tags stay)."""
    batch = self.inputs(image, question)
    out = greedy_generate(self.model, batch, max_new_tokens)[0]
    eos = set(self.cfg.eos_token_ids)
    ids = [int(t) for t in out]
    for i, t in enumerate(ids):
      if t in eos:
        ids = ids[:i]
        break
    return self.processor.tokenizer.decode(ids, skip_special_tokens=True)
