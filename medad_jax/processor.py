"""Qwen2.5-VL input processing: ``(image, question[, target]) -> model inputs``, and bucketed batching.

What it produces is what transformers' ``Qwen2_5_VLProcessor`` produces for the same chat (the tests check it
token for token): the pixels go through transformers' own ``Qwen2VLImageProcessorPil`` (smart resize between
``min_pixels`` and ``max_pixels`` to a multiple of ``patch * merge``, CLIP mean/std normalisation, patch
flattening); the text side is implemented here: the Qwen2-VL chat template rendered by a small pure function,
``<|image_pad|>`` expanded to ``L / merge**2`` copies, ``mm_token_type_ids`` (1 on image tokens, 2 on video
tokens, 0 elsewhere, as ``ProcessorMixin.create_mm_token_type_ids``) and, for SFT, a ``loss_mask``.

Axis legend: B batch, T tokens, L patches (of all images in the batch), P patch vector ``C*Tp*p*p``,
G images (rows of ``image_grid_thw``: ``(t, h, w)`` in patches).

transformers is imported lazily (when a processor is built), so importing this module is cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Qwen2.5-VL ``preprocessor_config.json``: min_pixels = 56*56, max_pixels = 28*28*16384.
DEFAULT_MIN_PIXELS = 3136
DEFAULT_MAX_PIXELS = 12845056
# Qwen2-VL image processors refuse images more elongated than this (``smart_resize``).
MAX_ASPECT_RATIO = 200
DEFAULT_SYSTEM_PROMPT = 'You are a helpful assistant.'

IM_START, IM_END = '<|im_start|>', '<|im_end|>'
VISION_START, VISION_END, IMAGE_PAD = '<|vision_start|>', '<|vision_end|>', '<|image_pad|>'
VIDEO_PAD = '<|video_pad|>'


# ---------------------------------------------------------------------------------------------- text side


def render_prompt(question: str, system_prompt: str | None = None, num_images: int = 1) -> str:
  """The Qwen2-VL chat template for one user turn ``[image]*num_images + [text]`` with the generation prompt.

  Equal to ``apply_chat_template(messages, add_generation_prompt=True)``; the template inserts the default
  system turn when no ``system_prompt`` is given. Each image is a single ``<|image_pad|>`` here (expanded later).
  """
  system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
  images = f'{VISION_START}{IMAGE_PAD}{VISION_END}' * num_images
  return (f'{IM_START}system\n{system}{IM_END}\n'
          f'{IM_START}user\n{images}{question}{IM_END}\n'
          f'{IM_START}assistant\n')


def render_target(target: str) -> str:
  """What follows the generation prompt in the full conversation: the assistant turn and its end."""
  return f'{target}{IM_END}\n'


def expand_image_pads(text: str, num_tokens: Sequence[int]) -> str:
  """Replaces the i-th ``<|image_pad|>`` with ``num_tokens[i]`` copies (the merged-patch count of image i)."""
  parts = text.split(IMAGE_PAD)
  if len(parts) - 1 != len(num_tokens):
    raise ValueError(f'text has {len(parts) - 1} {IMAGE_PAD} placeholders but {len(num_tokens)} images were given')
  out = [parts[0]]
  for n, rest in zip(num_tokens, parts[1:]):
    out.append(IMAGE_PAD * int(n))
    out.append(rest)
  return ''.join(out)


def mm_token_type_ids(input_ids: np.ndarray, image_token_id: int, video_token_id: int) -> np.ndarray:
  """``[T] -> [T]`` int32: 1 on image tokens, 2 on video tokens, 0 elsewhere (transformers' convention)."""
  out = np.zeros(input_ids.shape, np.int32)
  out[input_ids == image_token_id] = 1
  out[input_ids == video_token_id] = 2
  return out


# ---------------------------------------------------------------------------------------------- images


def to_pil_image(image: Any, where: str = 'image'):
  """Validates an image and returns a PIL image the Qwen2-VL image processor accepts.

  Accepts a ``PIL.Image.Image`` or a uint8 ``np.ndarray`` of shape ``[H, W]``, ``[H, W, 1|3|4]``. Modes with more
  than 8 bits per sample (16-bit / float grayscale, common for medical images) are min-max scaled to 8-bit
  grayscale first, because PIL's RGB conversion would clip them; other non-RGB modes are converted by the image
  processor itself (alpha composited onto white, like transformers does).
  """
  from PIL import Image

  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
      raise ValueError(f'{where}: arrays must be uint8 [H, W] or [H, W, 1|3|4], got {image.dtype} {image.shape}')
    image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
  if not isinstance(image, Image.Image):
    raise TypeError(f'{where}: expected a PIL.Image.Image or a uint8 numpy array, got {type(image).__name__}')
  w, h = image.size
  if w <= 0 or h <= 0:
    raise ValueError(f'{where}: zero-size image ({w}x{h} pixels)')
  if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
    raise ValueError(f'{where}: aspect ratio {max(w, h) / min(w, h):.1f} of a {w}x{h} image exceeds the '
                     f'Qwen2-VL limit of {MAX_ASPECT_RATIO}')
  from medad_jax.data.images import to_8bit  # one implementation of the 16-bit scaling (data loading uses it too)
  return to_8bit(image)


# ---------------------------------------------------------------------------------------------- processor


class Qwen25VLProcessor:
  """Turns one ``(image, question[, target])`` into Qwen2.5-VL inputs (numpy, unbatched).

  Args:
    tokenizer: a transformers tokenizer with Qwen's control tokens (``qwen2_tokenizer()`` or
      ``train_small_tokenizer(...)``).
    vision_cfg: the model's ``VisionConfig`` (patch size, temporal patch, spatial merge).
    min_pixels, max_pixels: the resize bounds (defaults: the Qwen2.5-VL checkpoints' preprocessor config).
    system_prompt: the system turn; ``None`` renders the template's default ("You are a helpful assistant.").
  """

  def __init__(self, tokenizer, vision_cfg, min_pixels: int = DEFAULT_MIN_PIXELS,
               max_pixels: int = DEFAULT_MAX_PIXELS, system_prompt: str | None = None):
    from transformers import Qwen2VLImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    if not 0 < min_pixels <= max_pixels:
      raise ValueError(f'need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels} max_pixels={max_pixels}')
    if vision_cfg.in_channels != 3:
      raise ValueError(f'vision_cfg.in_channels={vision_cfg.in_channels}; the processor produces RGB (3) patches')
    self.tokenizer = tokenizer
    self.vision_cfg = vision_cfg
    self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
    self.system_prompt = system_prompt
    self.merge_size = vision_cfg.spatial_merge_size
    self.image_processor = Qwen2VLImageProcessorPil(
        min_pixels=self.min_pixels, max_pixels=self.max_pixels, patch_size=vision_cfg.patch_size,
        temporal_patch_size=vision_cfg.temporal_patch_size, merge_size=vision_cfg.spatial_merge_size,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_resize=True,
        resample=PILImageResampling.BICUBIC, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        do_convert_rgb=True)

    def token_id(t: str) -> int:
      i = tokenizer.convert_tokens_to_ids(t)
      if i is None or tokenizer.convert_ids_to_tokens(i) != t:
        raise KeyError(f'tokenizer has no token {t!r}, which the Qwen2-VL chat format needs')
      return int(i)

    self.image_token_id = token_id(IMAGE_PAD)
    self.video_token_id = token_id(VIDEO_PAD)
    self.vision_start_token_id = token_id(VISION_START)
    self.vision_end_token_id = token_id(VISION_END)
    self.im_end_token_id = token_id(IM_END)
    token_id(IM_START)
    if tokenizer.pad_token_id is None:
      raise ValueError('tokenizer has no pad token (Qwen pads with <|endoftext|>)')
    self.pad_token_id = int(tokenizer.pad_token_id)
    # Control tokens are matched inside any string the tokenizer sees; in user text they would forge structure.
    self._control_tokens = tuple(t for t in tokenizer.all_special_tokens if t)
    if system_prompt is not None:
      self._check_text(system_prompt, 'system_prompt')

  # ------------------------------------------------------------------ pieces

  def process_image(self, image: Any, where: str = 'image') -> tuple[np.ndarray, np.ndarray]:
    """``image -> (pixel_values[L, P] float32, image_grid_thw[3] int32)`` via transformers' image processor."""
    image = to_pil_image(image, where)
    out = self.image_processor(images=[image], return_tensors='np')
    pixel_values_LP = np.asarray(out['pixel_values'], np.float32)
    grid_thw = np.asarray(out['image_grid_thw'], np.int64)[0].astype(np.int32)
    if pixel_values_LP.shape != (int(np.prod(grid_thw)), self.vision_cfg.patch_dim):
      raise RuntimeError(f'{where}: image processor returned pixel_values {pixel_values_LP.shape} for grid '
                         f'{grid_thw.tolist()}, expected [{int(np.prod(grid_thw))}, {self.vision_cfg.patch_dim}]')
    return pixel_values_LP, grid_thw

  def num_image_tokens(self, grid_thw: np.ndarray) -> int:
    """Placeholder tokens of one image: its patches divided by ``merge**2`` (merged in the vision tower)."""
    return int(np.prod(grid_thw)) // self.merge_size**2

  def _check_text(self, text: str, what: str) -> None:
    if not isinstance(text, str):
      raise TypeError(f'{what} must be a str, got {type(text).__name__}')
    for t in self._control_tokens:
      if t in text:
        raise ValueError(f'{what} contains the control token {t!r}; it would be read as chat structure')

  # ------------------------------------------------------------------ one example

  def __call__(self, image: Any, question: str, target: str | None = None) -> dict[str, np.ndarray]:
    """One example.

    Returns numpy arrays: ``input_ids[T]``, ``attention_mask[T]``, ``mm_token_type_ids[T]`` (int32),
    ``pixel_values[L, P]`` (float32), ``image_grid_thw[1, 3]`` (int32) and, when ``target`` (the SFT answer,
    ``<think>...</think><answer>...</answer>``) is given, ``loss_mask[T]`` (int32): 1 exactly on the target's
    tokens and the closing ``<|im_end|>``. Without ``target`` the sequence ends with the generation prompt
    ``<|im_start|>assistant\\n``; with it, it is the full conversation as the chat template renders it.
    """
    self._check_text(question, 'question')
    pixel_values_LP, grid_thw = self.process_image(image)
    prompt = expand_image_pads(render_prompt(question, self.system_prompt), [self.num_image_tokens(grid_thw)])
    text = prompt
    if target is not None:
      self._check_text(target, 'target')
      text = prompt + render_target(target)
    enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=target is not None)
    input_ids_T = np.asarray(enc['input_ids'], np.int32)
    n_img = int((input_ids_T == self.image_token_id).sum())
    if n_img != self.num_image_tokens(grid_thw):
      raise RuntimeError(f'tokenised prompt holds {n_img} image tokens, expected {self.num_image_tokens(grid_thw)}')
    out = {
        'input_ids': input_ids_T,
        'attention_mask': np.ones_like(input_ids_T),
        'mm_token_type_ids': mm_token_type_ids(input_ids_T, self.image_token_id, self.video_token_id),
        'pixel_values': pixel_values_LP,
        'image_grid_thw': grid_thw[None, :],
    }
    if target is not None:
      # The loss covers every token overlapping the characters of ``target + <|im_end|>``; the final newline and
      # everything before the target (system, user, image and template tokens) are context only. A target that
      # starts with a newline fuses with the template's "\n" into one token, which is then trained as well.
      start, end = len(prompt), len(prompt) + len(target) + len(IM_END)
      offsets = np.asarray(enc['offset_mapping'], np.int64).reshape(-1, 2)
      out['loss_mask'] = ((offsets[:, 0] < end) & (offsets[:, 1] > start)).astype(np.int32)
      if out['loss_mask'].sum() == 0 or input_ids_T[np.flatnonzero(out['loss_mask'])[-1]] != self.im_end_token_id:
        raise RuntimeError('loss mask does not end on <|im_end|>; the target was not tokenised as expected')
    return out

  # ------------------------------------------------------------------ batches

  def batch(self, examples: Sequence[dict[str, np.ndarray]], buckets: Sequence[int],
            padding_side: str | None = None) -> dict[str, np.ndarray]:
    """Pads examples from :meth:`__call__` to one static length; see :func:`pad_batch`."""
    return pad_batch(examples, buckets, self.pad_token_id, padding_side)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds ``length`` tokens."""
  for b in buckets:
    if length <= b:
      return int(b)
  raise ValueError(f'{length} tokens is longer than the largest bucket {buckets[-1]} (buckets={tuple(buckets)})')


def pad_batch(examples: Sequence[dict[str, np.ndarray]], buckets: Sequence[int], pad_token_id: int,
              padding_side: str | None = None) -> dict[str, np.ndarray]:
  """Stacks examples into ``[B, T]`` arrays with ``T`` the smallest bucket holding the longest example.

  Args:
    examples: outputs of :meth:`Qwen25VLProcessor.__call__`; either all with ``loss_mask`` (training) or none
      (generation prompts).
    buckets: allowed lengths, strictly increasing (a static set, so jitted steps compile once per bucket).
    pad_token_id: filler for ``input_ids`` (attention, loss and modality masks are 0 there).
    padding_side: ``'right'`` (training default) or ``'left'`` (generation default: every prompt ends at the
      last column, where decoding continues).

  Returns ``input_ids, attention_mask, mm_token_type_ids[, loss_mask]`` ``[B, T]`` int32, ``pixel_values[L, P]``
  (all images concatenated in example order) and ``image_grid_thw[G, 3]`` int32.
  """
  if not examples:
    raise ValueError('pad_batch: no examples')
  buckets = tuple(int(b) for b in buckets)
  if not buckets or any(b <= 0 for b in buckets) or any(a >= b for a, b in zip(buckets, buckets[1:])):
    raise ValueError(f'buckets must be positive and strictly increasing, got {buckets}')
  has_loss = ['loss_mask' in ex for ex in examples]
  if any(has_loss) and not all(has_loss):
    raise ValueError(f'examples mix training (with loss_mask) and prompt-only ones: loss_mask present at '
                     f'{[i for i, h in enumerate(has_loss) if h]} of {len(examples)}')
  training = all(has_loss)
  side = padding_side or ('right' if training else 'left')
  if side not in ('left', 'right'):
    raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
  keys = ['input_ids', 'attention_mask', 'mm_token_type_ids'] + (['loss_mask'] if training else [])
  for i, ex in enumerate(examples):
    for k in keys + ['pixel_values', 'image_grid_thw']:
      if k not in ex:
        raise KeyError(f'example {i} has no {k!r} (expected the output of Qwen25VLProcessor)')
  lengths = [len(ex['input_ids']) for ex in examples]
  longest = int(np.argmax(lengths))
  try:
    T = pick_bucket(lengths[longest], buckets)
  except ValueError as e:
    raise ValueError(f'example {longest}: {e}') from None
  B = len(examples)
  out = {k: np.full((B, T), pad_token_id if k == 'input_ids' else 0, np.int32) for k in keys}
  for b, ex in enumerate(examples):
    n = lengths[b]
    cols = slice(T - n, T) if side == 'left' else slice(0, n)
    for k in keys:
      out[k][b, cols] = ex[k]
  out['pixel_values'] = np.concatenate([np.asarray(ex['pixel_values'], np.float32) for ex in examples], axis=0)
  out['image_grid_thw'] = np.concatenate([np.asarray(ex['image_grid_thw'], np.int32) for ex in examples], axis=0)
  return out
