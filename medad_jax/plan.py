r"""Memory and FLOPs planner for one SFT step or one Con-GRPO step (rollout + update), per device.

  python -m medad_jax.plan --config=congrpo:paper --mesh=data=1,fsdp=8,tensor=1 --device h100-80g
  python -m medad_jax.plan --config=congrpo:paper --mesh=data=1 --device h100-80g --remat=full --set rl.num_microbatches=4
  python -m medad_jax.plan --config=congrpo:paper --mesh=fsdp=8 --device v5e --fit --fit-meshes  # what fits
  python -m medad_jax.plan --config=sft:paper --mesh=data=-1 --devices 8 --device v5p
  python -m medad_jax.plan --config=congrpo --check-xla        # also compile the step on CPU and compare
  python -m medad_jax.plan --config=congrpo --remat=full --measure-layer   # what XLA keeps per decoder layer

Axis legend:
  P prompts per optimizer step   G rollouts per prompt   B = P*G rollouts   T prompt length (SFT: whole sequence)
  N completion length (the sampler's max_new_tokens: rollouts are right-padded to it)   S = T + N keys
  D model width   F MLP width   V vocabulary   Nq query heads   K key/value heads   H head dim   R LoRA rank
  Lp patches per image (one image per prompt)   dp = data * fsdp (batch ways)   tp = tensor (head / MLP ways)

What is counted, per device (every term is a small pure function below)
-----------------------------------------------------------------------
State (resident for the whole run): the frozen base in ``param_dtype`` (bf16 for the paper) and the trainable
parameters -- LoRA adapters always in float32 (``model/layers.py`` ``LORA_DTYPE``), or every parameter in
``param_dtype`` for full fine-tuning -- sharded by ``medad_jax.sharding.PARAM_RULES`` exactly as the trainer places
them (the parameter list is enumerated from the architecture: :func:`param_shapes`, checked against the real
module tree in the tests); AdamW's two moments in the trainable parameters' dtype (fp32 for LoRA); the reference
copy of the trainable parameters for full-fine-tuning Con-GRPO.

Update step (the jitted SFT step or Con-GRPO update; its peak is at the start of the backward pass):

* decoder activations saved for the backward pass, per layer and token row, as XLA keeps them for *our* layer
  (LoRA on the 7 projections): ``6 D`` (layer input, the two norm outputs, roped q, attention output, mid
  residual) + ``7 F`` (the SwiGLU projections with their LoRA terms, the activation, the product) + ``R`` per
  adapted projection (``x @ A``) + ``2 K*H`` (roped k and v, for rows that hold their own keys) in the compute
  dtype, and below fp32 three more fp32 ``D`` (the RMSNorms' and residual's fp32 copies); fp32 attention
  probabilities ``Nq*S`` per row: 2 copies for rows attending their own keys, 3 for completion rows, which read
  the prompt's keys/values as a shared prefix (``model/text.py``: never copied G times) over ``S = T + N`` keys,
  and below fp32 one more copy in the compute dtype. In the Con-GRPO update the prompt runs once per prompt
  (``P`` rows of ``T``) and the completions are ``B`` rows of ``N``. Batch axes are divided by ``dp``; with tensor
  parallelism GSPMD splits every activation ``tp`` ways, which is what the plan assumes (checked on CPU).
* rematerialisation (``model.remat``): the layers then run as a ``lax.scan`` with a checkpointed body
  (``model/text.py``): every layer's input is kept (``L * rows * D`` in the compute dtype), one layer's no-remat set
  is in flight during its backward -- with :data:`REMAT_PROBS` fp32 copies of its attention probabilities, read
  in XLA's buffer assignment -- (each iteration picks its layer's weights: no stacked copy). Below fp32, XLA:CPU
  also keeps fp32 copies of bf16 operands (saved layer inputs, embedding:
  :func:`xla_cpu_upcast_bytes`), a CPU-only term. Against ``--check-xla`` at the paper's shapes on one device
  (``python -m medad_jax.bench paper_scale``): 3B SFT -8 %, Con-GRPO -4 %, sampler +7 %; ``small`` preset
  (224 px, 256-token answers) Con-GRPO -6 %, SFT -18 % (``tests/test_bench_paper_scale.py``). Unrolled (before the scan), XLA:CPU kept 0.86-0.99 of the no-remat set:
  its scheduler runs the recomputed forward of every layer early.
* without remat, one layer's fp32 attention scores in flight while a layer's backward (or the reference forward)
  runs.
* the LM head: only ``logits_chunk`` positions' fp32 logits exist at a time (``rl/update.py``
  ``chunked_token_logprobs``, rematerialised): :data:`LOGITS_CHUNK_BUFFERS` ``[chunk, V]`` fp32 buffers, fitted to
  the layer-independent part of XLA's temp. SFT scores only the target positions (``target_len``).
* gradients of the trainable parameters and, with microbatching, the scan's gradient accumulator. (The AdamW
  moments are updated in place: the step's skip of a batch without targets is a ``lax.cond``, not a per-leaf
  select, which made XLA copy both moments -- ``rl/update.py`` ``_apply_updates``.)
* FSDP: the all-gathered weights XLA keeps from the forward for the backward; counted as every decoder matrix and
  the embedding in the compute dtype, an upper bound. Without FSDP but with ``param_dtype != dtype``: one layer's
  weights cast to the compute dtype.
* vision tower: frozen under LoRA and run under ``stop_gradient``, so nothing is saved; its forward (vmapped per
  image, blockwise window attention, ``model/vision.py``) is its own phase before the decoder, per microbatch.

Validation: ``tests/test_plan.py`` (:func:`check_against_xla`: XLA's ``memory_analysis()`` of the real step
compiled on CPU with abstract weights) checks argument and output bytes to 1% and temp bytes to 10% for LoRA SFT
and Con-GRPO on the tiny preset in fp32 and bf16, with remat, with microbatching (fp32), and on a data x tensor
mesh; the 3B at the paper's shapes is in WORKSPACE.md ("Memory and FLOPs plan"). Not validated: microbatched SFT
in bf16 (XLA:CPU's temp does not fall with the microbatch count there: tiny 2.68 MiB at 1 microbatch, 2.67 MiB at
2; on the small preset at 8 microbatches XLA's total was 0.37 GiB against 0.15 GiB planned), FSDP meshes (XLA:CPU's
temp was 16% below to 37% above the plan), full fine-tuning (the plan counts gradients and activations as
live together; XLA:CPU's temp was 23-68% lower).

Rollout (the compiled sampler): the KV cache in the group layout the sampler uses, ``2 * layers * (P*T + B*N) * K
* H`` bytes in the compute dtype, the decode step's fp32 ``[B, V]`` buffers (logits, log-softmax, CDF) and the
prefill's one-layer working set.

FLOPs per optimizer step (``medad_jax.bench.common`` model FLOPs: 2 per multiply-add, causal attention over the
visible keys): rollout = vision + prefill of the P prompts + ``N - 1`` decode steps of the B rows; update =
``mu`` x (policy forward + backward + reference forward). The backward of a frozen matrix costs one forward
(input gradient only), of a trained one two; attention's backward costs two forwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import sys
from typing import Sequence

import numpy as np

from medad_jax.model.config import Qwen25VLConfig, TextConfig, VisionConfig

log = logging.getLogger(__name__)

GiB = 2.0**30

# Saved tensors per decoder layer and token row without remat, in units of the widths (see the module docstring).
SAVED_D = 6
SAVED_F = 7
SAVED_KV = 2
SAVED_PROBS = 2          # rows attending their own keys (SFT sequences, prompts)
SAVED_PROBS_PREFIX = 3   # completion rows attending the shared prompt prefix + their own keys
# Compute dtype below fp32 (bf16): the two RMSNorms and the residual keep fp32 copies (3 D per row, fp32), and the
# probabilities are saved once more in the compute dtype (the softmax output cast for the AV product).
SAVED_D_FP32_LOW_PRECISION = 3
SAVED_PROBS_LOW_PRECISION = 1
# fp32 [chunk, V] buffers of the chunked LM head alive at once. Measured as XLA's temp bytes added by doubling V
# (everything else equal): exactly 2.0 on the tiny SFT step (1 and 2 microbatches) since the LoRA backward is
# written by hand (layers.lora_matmul; tests/test_plan.py::test_lm_head_buffers_are_what_xla_adds_per_vocab);
# 2.2 on the tiny steps and 2.4 on the 3B Con-GRPO update before it.
LOGITS_CHUNK_BUFFERS = 2.0
# Decode-step [B, V] fp32 buffers of the sampler (logits, log-softmax, CDF).
DECODE_VOCAB_BUFFERS = 3
# Remat (scanned layers): fp32 copies of one layer's attention probabilities ``[rows, Nq, keys]`` alive while its
# recomputed forward and its backward run (scores, probabilities, their gradient and a select/concat copy), plus one
# in the compute dtype below fp32. Counted in XLA:CPU's buffer assignment of the 3B SFT step and Con-GRPO update at
# the paper's shapes (``--xla_dump_to``: 4 distinct fp32 ``[rows, Nq, T, S]`` buffers at once in the temp
# allocation, both programs).
REMAT_PROBS = 4
# Under ``remat='dots'`` below fp32, bytes per saved weight-matmul output element XLA:CPU keeps (its dots produce
# fp32, saved beside converted copies): 3.5x the compute-dtype estimate on the small preset at the paper's shapes
# (``python -m medad_jax.plan --config=congrpo:paper --set model.preset=small --remat=dots --check-xla``).
DOTS_XLA_CPU_BYTES = 7
# XLA:CPU has no bf16 matmul: it computes bf16 in fp32 and hoists converts out of loops, so with compute below fp32
# it keeps (read in the same buffer assignments) an fp32 copy of the saved layer inputs ``[L, rows, D]`` beside the
# compute-dtype one, and an fp32 copy of the embedding. An accelerator with bf16 matmuls keeps none of these: :func:`plan` counts them as one
# ``XLA:CPU`` term, so they can be read off (``backend='accelerator'`` leaves them out).

REMAT = ('none', 'full', 'dots')
FIT_REMAT_ORDER = ('none', 'dots', 'full')

# ------------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class MeshShape:
  data: int = 1
  fsdp: int = 1
  tensor: int = 1

  @property
  def devices(self) -> int:
    return self.data * self.fsdp * self.tensor

  @property
  def dp(self) -> int:
    return self.data * self.fsdp

  def __str__(self) -> str:
    return f'data={self.data},fsdp={self.fsdp},tensor={self.tensor}'


def parse_mesh(spec: str, devices: int | None = None) -> MeshShape:
  """``'data=1,fsdp=8,tensor=1'`` -> :class:`MeshShape`; one size may be ``-1`` (= the rest of ``devices``)."""
  sizes = {'data': 1, 'fsdp': 1, 'tensor': 1}
  for part in [p.strip() for p in spec.split(',') if p.strip()]:
    key, sep, value = part.partition('=')
    if not sep or key not in sizes:
      raise ValueError(f'--mesh {spec!r}: expected comma-separated data=N,fsdp=N,tensor=N, got {part!r}')
    try:
      sizes[key] = int(value)
    except ValueError as e:
      raise ValueError(f'--mesh {spec!r}: {key}={value!r} is not an integer') from e
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f'--mesh {spec!r}: at most one axis may be -1')
  if -1 in sizes.values():
    if devices is None:
      raise ValueError(f'--mesh {spec!r} has a -1 axis: give --devices')
    known = math.prod(v for v in sizes.values() if v != -1)
    if devices % known:
      raise ValueError(f'--mesh {spec!r}: {devices} devices are not divisible by {known}')
    sizes[[k for k, v in sizes.items() if v == -1][0]] = devices // known
  if any(v < 1 for v in sizes.values()):
    raise ValueError(f'--mesh {spec!r}: sizes must be >= 1')
  mesh = MeshShape(**sizes)
  if devices is not None and mesh.devices != devices:
    raise ValueError(f'--mesh {spec!r} has {mesh.devices} devices, --devices says {devices}')
  return mesh


@dataclasses.dataclass(frozen=True)
class Device:
  name: str
  hbm_bytes: float
  peak_flops: float   # dense bf16 matmul peak per device
  note: str = ''


DEVICES = {
    'h100-80g': Device('NVIDIA H100 SXM 80GB', 80 * GiB, 989e12,
                       'JAX preallocates 75% of GPU memory unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised'),
    'v5e': Device('TPU v5e chip', 16 * GiB, 197e12, 'v5e-8 = 8 chips, one JAX device each'),
    'v5p': Device('TPU v5p chip', 95 * GiB, 459e12, 'v5p-8 = 4 chips (8 TensorCores), one JAX device per chip'),
}


@dataclasses.dataclass(frozen=True)
class Workload:
  """The shapes and settings of one optimizer step (global sizes; the plan divides by the mesh)."""

  stage: str                   # 'congrpo' | 'sft'
  prompts: int                 # P (SFT: examples per step)
  group_size: int              # G (SFT: 1)
  prompt_len: int              # T (SFT: the whole sequence)
  completion_len: int          # N (SFT: 0)
  image_patches: int           # Lp per image, one image per prompt (0: text only)
  trainable: str = 'lora'      # 'lora' | 'all'
  lora_rank: int = 16
  lora_pattern: str = r'^model/layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)$'
  num_microbatches: int = 1
  needs_reference: bool = True
  inner_iterations: int = 1    # mu
  dtype: str = 'bfloat16'      # compute
  param_dtype: str = 'float32'  # the frozen base (LoRA adapters and their AdamW moments are float32 always)
  remat: str = 'none'          # 'none' | 'full' | 'dots' (Qwen25VLConfig.remat: per decoder layer / vision block)
  logits_chunk: int = 1024     # positions whose LM-head logits exist at once (rl/update.py chunked_token_logprobs)
  target_len: int = 0          # SFT: answer tokens scored per example (0: half the sequence, as sft_batch's default)

  def __post_init__(self):
    if self.stage not in ('congrpo', 'sft'):
      raise ValueError(f'Workload.stage={self.stage!r}: expected "congrpo" or "sft"')
    if self.trainable not in ('lora', 'all'):
      raise ValueError(f'Workload.trainable={self.trainable!r}: expected "lora" or "all"')
    if self.prompts % self.num_microbatches:
      raise ValueError(f'Workload: num_microbatches={self.num_microbatches} does not divide prompts={self.prompts}')
    if self.remat not in REMAT:
      raise ValueError(f'Workload.remat={self.remat!r}: expected one of {REMAT}')

  @property
  def rollouts(self) -> int:
    return self.prompts * self.group_size


def dtype_bytes(name: str) -> int:
  return int(np.dtype({'bfloat16': np.float16}.get(name, name)).itemsize)


def image_patches(image_size: int, vision: VisionConfig) -> int:
  """Patches of one square ``image_size`` image (the processor resizes to multiples of patch * merge)."""
  unit = vision.patch_size * vision.spatial_merge_size
  side = max(unit, round(image_size / unit) * unit) // vision.patch_size
  return side * side


def image_tokens(patches: int, vision: VisionConfig) -> int:
  return patches // vision.spatial_merge_size**2


# ------------------------------------------------------------------------------------------- parameters


def param_shapes(cfg: Qwen25VLConfig, lora_rank: int = 0, lora_pattern: str | None = None
                 ) -> list[tuple[str, tuple[int, ...], bool]]:
  """Every parameter of ``Qwen25VL(cfg)`` (+ LoRA on the Linears whose path matches ``lora_pattern``) as
  ``(path, shape, is_lora)``, in the model's own naming (see ``model/checkpoint.py``)."""
  t, v = cfg.text, cfg.vision
  D, H, F = t.hidden_size, t.head_dim, t.intermediate_size
  linears: list[tuple[str, int, int, bool]] = []   # (module path, in, out, bias)
  out: list[tuple[str, tuple[int, ...], bool]] = [('model/embed_tokens/embedding', (t.vocab_size, D), False)]
  for i in range(t.num_layers):
    p = f'model/layers/{i}'
    linears += [(f'{p}/self_attn/q_proj', D, t.num_heads * H, True),
                (f'{p}/self_attn/k_proj', D, t.num_kv_heads * H, True),
                (f'{p}/self_attn/v_proj', D, t.num_kv_heads * H, True),
                (f'{p}/self_attn/o_proj', t.num_heads * H, D, False),
                (f'{p}/mlp/gate_proj', D, F, False), (f'{p}/mlp/up_proj', D, F, False),
                (f'{p}/mlp/down_proj', F, D, False)]
    out += [(f'{p}/input_layernorm/scale', (D,), False), (f'{p}/post_attention_layernorm/scale', (D,), False)]
  out.append(('model/norm/scale', (D,), False))
  if not t.tie_word_embeddings:
    linears.append(('lm_head', D, t.vocab_size, False))
  Dv, Fv, U = v.hidden_size, v.intermediate_size, v.hidden_size * v.spatial_merge_size**2
  linears.append(('visual/patch_embed/proj', v.patch_dim, Dv, False))
  for i in range(v.depth):
    p = f'visual/blocks/{i}'
    linears += [(f'{p}/attn/qkv', Dv, 3 * Dv, True), (f'{p}/attn/proj', Dv, Dv, True),
                (f'{p}/mlp/gate_proj', Dv, Fv, True), (f'{p}/mlp/up_proj', Dv, Fv, True),
                (f'{p}/mlp/down_proj', Fv, Dv, True)]
    out += [(f'{p}/norm1/scale', (Dv,), False), (f'{p}/norm2/scale', (Dv,), False)]
  out.append(('visual/merger/ln_q/scale', (Dv,), False))
  linears += [('visual/merger/mlp_0', U, U, True), ('visual/merger/mlp_2', U, v.out_hidden_size, True)]
  rx = re.compile(lora_pattern) if (lora_rank and lora_pattern) else None
  for path, i, o, bias in linears:
    out.append((f'{path}/kernel', (i, o), False))
    if bias:
      out.append((f'{path}/bias', (o,), False))
    if rx is not None and rx.search(path):
      out += [(f'{path}/lora_a', (i, lora_rank), True), (f'{path}/lora_b', (lora_rank, o), True)]
  return out


def lora_targets(cfg: Qwen25VLConfig, lora_pattern: str) -> list[tuple[str, int, int]]:
  """``(path, in, out)`` of the adapted Linears (those :func:`param_shapes` gives a ``lora_a``)."""
  shapes = dict((p, s) for p, s, _ in param_shapes(cfg, 1, lora_pattern))
  return [(p[:-len('/lora_a')], s[0], shapes[p[:-len('/lora_a')] + '/lora_b'][1]) for p, s in shapes.items()
          if p.endswith('/lora_a')]


def shard_elements(path: str, shape: tuple[int, ...], mesh: MeshShape) -> int:
  """Elements of one parameter on one device under ``medad_jax.sharding.PARAM_RULES``."""
  from jax.sharding import AbstractMesh
  from medad_jax.sharding import AXES, param_spec
  am = AbstractMesh((mesh.data, mesh.fsdp, mesh.tensor), AXES)
  spec = param_spec(tuple(path.split('/')), shape, am) if shape else ()
  n = 1
  for i, dim in enumerate(shape):
    ax = spec[i] if i < len(spec) else None
    n *= dim // (am.shape[ax] if ax is not None else 1)
  return n


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  frozen: int           # elements, whole model
  trainable: int
  frozen_device: int    # elements on one device
  trainable_device: int
  decoder_layer_matrices: int   # elements of one decoder layer's matrices (unsharded)


def count_params(cfg: Qwen25VLConfig, w: Workload, mesh: MeshShape) -> ParamCounts:
  shapes = param_shapes(cfg, w.lora_rank if w.trainable == 'lora' else 0, w.lora_pattern)
  fz = tr = fz_dev = tr_dev = 0
  for path, shape, is_lora in shapes:
    n, n_dev = math.prod(shape), shard_elements(path, shape, mesh)
    if is_lora or w.trainable == 'all':
      tr, tr_dev = tr + n, tr_dev + n_dev
    else:
      fz, fz_dev = fz + n, fz_dev + n_dev
  layer = sum(math.prod(s) for p, s, lo in shapes if p.startswith('model/layers/0/') and len(s) == 2 and not lo)
  return ParamCounts(fz, tr, fz_dev, tr_dev, layer)


# ------------------------------------------------------------------------------------------- activations


def decoder_row_bytes(t: TextConfig, *, act_bytes: int, lora_widths: Sequence[int], own_keys: bool,
                      tp: int = 1) -> float:
  """Bytes one decoder layer saves per token row without remat (without the attention probabilities):
  ``(6 D + 7 F + sum(R) + 2 K*H (own_keys)) / tp`` in the compute dtype."""
  kv = SAVED_KV * t.num_kv_heads * t.head_dim if own_keys else 0
  fp32_copies = SAVED_D_FP32_LOW_PRECISION * t.hidden_size * 4 if act_bytes < 4 else 0
  return (act_bytes * (SAVED_D * t.hidden_size + SAVED_F * t.intermediate_size + sum(lora_widths) + kv)
          + fp32_copies) / tp


def attention_probs_bytes(t: TextConfig, rows: float, keys: int, tp: int = 1, *, prefix: bool = False,
                          act_bytes: int = 4, copies: int | None = None) -> float:
  """Attention probabilities one layer saves: ``c`` fp32 copies of ``rows * Nq/tp * keys`` (``c`` = 2 for rows
  that attend their own keys, 3 for completion rows over the shared prompt prefix + their own keys) and, below
  fp32, one more in the compute dtype."""
  c = (SAVED_PROBS_PREFIX if prefix else SAVED_PROBS) if copies is None else copies
  low = SAVED_PROBS_LOW_PRECISION * act_bytes if act_bytes < 4 and copies is None else 0
  return rows * (t.num_heads / tp) * keys * (4 * c + low)


def logits_chunk_bytes(rows: float, chunk: int, vocab: int, tp: int = 1) -> float:
  """The LM head's working set: ``c * min(chunk, rows) * V * 4`` (fp32 logits of one chunk, their softmax and
  gradient; ``rl/update.py`` ``chunked_token_logprobs`` recomputes a chunk in the backward)."""
  return LOGITS_CHUNK_BUFFERS * min(chunk, max(rows, 1)) * vocab / tp * 4


def vision_transient_bytes(v: VisionConfig, images: float, patches: int) -> float:
  """The frozen vision tower's forward working set, vmapped per image (``model/vision.py``): per image two fp32
  ``[Nq_v, 4*Wl, Lp]`` logits of a query-chunked full-attention block, two ``[Lp, F_v]`` and four ``[Lp, D_v]``
  fp32 buffers (0.077 GiB for a 448-px 3B image; ``model/vision.py`` measured 0.076 GiB)."""
  wl = (v.window_size // v.patch_size)**2
  per_image = 4 * (2 * v.num_heads * min(4 * wl, patches) * patches + 2 * patches * v.intermediate_size
                   + 4 * patches * v.hidden_size)
  return images * per_image


@dataclasses.dataclass(frozen=True)
class Activations:
  """Per-device bytes of the update step's saved activations (one microbatch)."""

  prompt: float          # rows that hold their own keys: SFT sequences, or the P prompts of Con-GRPO
  completion: float      # the B completion rows (Con-GRPO), reading the prompt's keys/values as a shared prefix
  probs: float           # fp32 attention probabilities
  remat: str

  @property
  def total(self) -> float:
    return self.prompt + self.completion + self.probs


def update_activations(cfg: Qwen25VLConfig, w: Workload, mesh: MeshShape, remat: str | None = None) -> Activations:
  """Saved decoder activations of one (micro)batch on one device under ``remat`` (default ``w.remat``): the
  no-remat set, or under remat the scanned layers' inputs plus one layer's set in flight."""
  remat = w.remat if remat is None else remat
  t = cfg.text
  ab, tp, L = dtype_bytes(w.dtype), mesh.tensor, t.num_layers
  P = w.prompts / mesh.dp / w.num_microbatches
  B, T, N = P * w.group_size, w.prompt_len, w.completion_len
  per_layer_widths = [w.lora_rank for path, _, _ in lora_targets(cfg, w.lora_pattern)
                      if path.startswith('model/layers/0/')] if w.trainable == 'lora' else []
  prompt_row = decoder_row_bytes(t, act_bytes=ab, lora_widths=per_layer_widths, own_keys=True, tp=tp)
  comp_row = decoder_row_bytes(t, act_bytes=ab, lora_widths=per_layer_widths, own_keys=False, tp=tp)
  if w.stage == 'sft':
    rows_p, keys_p, rows_c, keys_c = P * T, T, 0, 0
  else:
    rows_p, keys_p, rows_c, keys_c = P * T, T, B * N, T + N
  probs_layer = (attention_probs_bytes(t, rows_p, keys_p, tp, act_bytes=ab)
                 + attention_probs_bytes(t, rows_c, keys_c, tp, prefix=True, act_bytes=ab))
  if remat == 'none':
    return Activations(prompt=L * rows_p * prompt_row, completion=L * rows_c * comp_row, probs=L * probs_layer,
                       remat=remat)
  # remat: the layers run as a lax.scan with a checkpointed body (model/text.py): each layer's input is kept
  # ([L, rows, D] in the compute dtype) and the backward recomputes one layer at a time, so one layer's no-remat
  # set is in flight.
  D = t.hidden_size
  probs_layer = (attention_probs_bytes(t, rows_p, keys_p, tp, act_bytes=ab, copies=REMAT_PROBS)
                 + attention_probs_bytes(t, rows_c, keys_c, tp, act_bytes=ab, copies=REMAT_PROBS))
  # Kept per layer for every layer: its input, and under 'dots' (dots_with_no_batch_dims_saveable) the outputs of
  # its weight matmuls -- q, k, v, o, gate, up, down and the LoRA x @ A -- so 'dots' trades L times those widths
  # for not recomputing them.
  kept = D + (dots_width(t, per_layer_widths) if remat == 'dots' else 0)
  return Activations(prompt=L * rows_p * kept * ab / tp + rows_p * prompt_row,
                     completion=L * rows_c * kept * ab / tp + rows_c * comp_row, probs=probs_layer, remat=remat)


def dots_width(t: TextConfig, lora_widths: Sequence[int]) -> int:
  """Per token row, the widths of one decoder layer's weight-matmul outputs (q, k, v, o, gate, up, down, and the
  LoRA ``x @ A``): what ``model.remat='dots'`` keeps for every layer."""
  D = t.hidden_size
  return 3 * D + 2 * t.num_kv_heads * t.head_dim + 2 * t.intermediate_size + sum(lora_widths)


def decode_upcast_term(cfg: Qwen25VLConfig, mesh: MeshShape) -> 'Term':
  """XLA:CPU's fp32 copies of bf16 decoder weights in the decode loop: every weight with the per-layer loop
  (hoisted out of the ``while_loop``), one layer's plus the rest (embedding, norms) with ``cfg.decode_scan``."""
  per_layer: dict[str, float] = {}
  rest = 0.0
  for path, shape, _ in param_shapes(cfg):
    if path.startswith('visual/'):
      continue
    n = 4 * shard_elements(path, shape, mesh)
    parts = path.split('/')
    if cfg.decode_scan and 'layers' in parts:
      layer = '/'.join(parts[:parts.index('layers') + 2])
      per_layer[layer] = per_layer.get(layer, 0.0) + n
    else:
      rest += n
  if cfg.decode_scan:
    return Term('XLA:CPU only: fp32 copy of one bf16 decoder layer + embedding (decode scan)',
                rest + max(per_layer.values(), default=0.0), 'rollout',
                'decode_scan: each layer\'s weights are converted inside the scan, one layer at a time')
  return Term('XLA:CPU only: fp32 copy of the bf16 decoder weights (decode loop)', rest, 'rollout',
              'XLA:CPU computes bf16 in fp32: every decoder weight is converted for the decode step')


def xla_cpu_upcast_bytes(cfg: Qwen25VLConfig, w: Workload, mesh: MeshShape) -> float:
  """What XLA:CPU adds under remat with compute below fp32 (see :data:`REMAT_PROBS`' neighbour comment): an fp32
  copy of every saved layer input and of the embedding (and under ``dots`` fp32 copies of the saved matmul
  outputs). 0 in fp32 or without remat."""
  ab = dtype_bytes(w.dtype)
  if w.remat == 'none' or ab >= 4:
    return 0.0
  t, tp, L = cfg.text, mesh.tensor, cfg.text.num_layers
  P = w.prompts / mesh.dp / w.num_microbatches
  rows = P * w.prompt_len + (P * w.group_size * w.completion_len if w.stage == 'congrpo' else 0)
  inputs = L * rows * t.hidden_size * 4 / tp
  embedding = t.vocab_size * t.hidden_size * 4 / tp
  dots = 0.0
  if w.remat == 'dots':
    widths = [w.lora_rank for path, _, _ in lora_targets(cfg, w.lora_pattern)
              if path.startswith('model/layers/0/')] if w.trainable == 'lora' else []
    dots = L * rows * dots_width(t, widths) * (DOTS_XLA_CPU_BYTES - ab) / tp
  return inputs + embedding + dots


def gathered_weights_bytes(cfg: Qwen25VLConfig, w: Workload, mesh: MeshShape) -> float:
  """FSDP: the decoder's matrices and the token embedding all-gathered over fsdp (tensor-sharded only) in the
  compute dtype, as if XLA kept every gathered weight from the forward for the backward (an upper bound: on an
  8-device CPU mesh it kept the q/k/v/o and down projections of every layer and the embedding, not gate/up)."""
  mats = sum(math.prod(s) for p, s, lo in param_shapes(cfg) if len(s) == 2 and
             (p.startswith('model/') or p.startswith('lm_head')))
  return mats / mesh.tensor * dtype_bytes(w.dtype)


def attention_scores_in_flight(cfg: Qwen25VLConfig, w: Workload, mesh: MeshShape) -> float:
  """One layer's fp32 attention scores beyond the saved ones, alive while a layer's backward (or the reference
  forward) runs: ``rows * Nq/tp * keys * 4`` for the prompt (or SFT) rows and the completion rows."""
  P = w.prompts / mesh.dp / w.num_microbatches
  t, T, N = cfg.text, w.prompt_len, w.completion_len
  own = attention_probs_bytes(t, P * T, T, mesh.tensor, copies=1)
  if w.stage == 'sft':
    return own
  return own + attention_probs_bytes(t, P * w.group_size * N, T + N, mesh.tensor, copies=1)


def scored_rows(w: Workload, mesh: MeshShape) -> float:
  """Positions whose LM-head log-prob the update computes, per device and microbatch (SFT: the target slots only,
  ``target_len`` per example rounded up to its bucket; Con-GRPO: every completion position)."""
  P = w.prompts / mesh.dp / w.num_microbatches
  if w.stage == 'sft':
    # train.pipeline.sft_batch pads the target slots to a bucket of the longest answer.
    from medad_jax.train.pipeline import TARGET_LENGTH_BUCKETS
    n = w.target_len or w.prompt_len // 2
    return P * min([b for b in TARGET_LENGTH_BUCKETS if b >= n] or [n])
  return P * w.group_size * w.completion_len


def rollout_cache_bytes(t: TextConfig, prompts: float, group: int, prompt_len: int, new_tokens: int,
                        act_bytes: int, *, grouped: bool = True, tp: int = 1) -> float:
  """KV cache of a rollout: group layout ``2*layers*(P*T + B*N)*K*H`` (the sampler's), or the naive layout that
  repeats every prompt to its G samples, ``2*layers*B*(T+N)*K*H``."""
  kh = t.num_kv_heads * t.head_dim / tp
  B = prompts * group
  slots = prompts * prompt_len + B * new_tokens if grouped else B * (prompt_len + new_tokens)
  return 2 * t.num_layers * slots * kh * act_bytes


# ------------------------------------------------------------------------------------------- FLOPs


def lora_flops(targets: Sequence[tuple[str, int, int]], rank: int, tokens: float) -> float:
  """Forward FLOPs of the LoRA terms ``(x @ A) @ B`` of ``targets`` over ``tokens`` tokens."""
  return tokens * sum(2 * rank * (i + o) for _, i, o in targets)


@dataclasses.dataclass(frozen=True)
class Flops:
  rollout: float
  update_forward: float
  update_backward: float
  reference_forward: float

  @property
  def update(self) -> float:
    return self.update_forward + self.update_backward + self.reference_forward

  @property
  def total(self) -> float:
    return self.rollout + self.update


def step_flops(cfg: Qwen25VLConfig, w: Workload) -> Flops:
  """Model FLOPs of one optimizer step, whole mesh (see the module docstring)."""
  from medad_jax.bench.common import text_flops, vision_flops
  t = cfg.text
  P, G, T, N, Lp = w.prompts, w.group_size, w.prompt_len, w.completion_len, w.image_patches
  B = P * G
  vis = P * vision_flops(cfg.vision, Lp) if Lp else 0.0
  targets = lora_targets(cfg, w.lora_pattern) if w.trainable == 'lora' else []
  H = t.head_dim

  def attn(new: int, ctx: int) -> float:   # causal QK^T + AV of ``new`` tokens over keys [0, ctx)
    return t.num_layers * 4 * t.num_heads * H * (new * (ctx - new) + new * (new + 1) / 2)

  if w.stage == 'sft':
    fwd_text = P * text_flops(t, T, T, lm_head_tokens=T - 1)
    attn_fl = P * attn(T, T)
    tokens = P * T
    rollout = 0.0
  else:
    fwd_text = P * text_flops(t, T, T, lm_head_tokens=0) + B * text_flops(t, N, T + N, lm_head_tokens=N)
    attn_fl = P * attn(T, T) + B * attn(N, T + N)
    tokens = P * T + B * N
    decode = B * sum(text_flops(t, 1, T + s + 1) for s in range(max(N - 1, 0)))
    rollout = vis + P * text_flops(t, T, T, lm_head_tokens=1) + decode
    rollout += lora_flops(targets, w.lora_rank, P * T + B * max(N - 1, 0))
  lora_fwd = lora_flops(targets, w.lora_rank, tokens)
  forward = vis + fwd_text + lora_fwd
  matmul = fwd_text - attn_fl
  if w.trainable == 'all':
    backward = 2 * forward
  else:   # frozen matrices: input gradients only; attention: 2x; adapters: dA, dB and dX
    backward = matmul + 2 * attn_fl + 3 * lora_fwd
  ref = (vis + fwd_text) if (w.stage == 'congrpo' and w.needs_reference) else 0.0
  mu = w.inner_iterations if w.stage == 'congrpo' else 1
  return Flops(rollout=rollout, update_forward=mu * forward, update_backward=mu * backward,
               reference_forward=mu * ref)


# ------------------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Term:
  name: str
  bytes: float
  phase: str      # 'state' (resident) | 'update' | 'rollout' | 'vision' (each phase adds to the state)
  note: str = ''


@dataclasses.dataclass(frozen=True)
class Plan:
  cfg: Qwen25VLConfig
  workload: Workload
  mesh: MeshShape
  remat: str
  terms: tuple[Term, ...]
  activations_no_remat: float
  activations_remat: float
  flops: Flops
  params: ParamCounts

  def total(self, phase: str) -> float:
    return sum(t.bytes for t in self.terms if t.phase in ('state', phase))

  @property
  def peak(self) -> float:
    """The largest of the three phases: update step, rollout, vision tower (each on top of the state)."""
    return max(self.total('update'), self.total('rollout'), self.total('vision'))


def plan(cfg: Qwen25VLConfig, w: Workload, mesh: MeshShape, *, remat: str | None = None,
         backend: str = 'xla_cpu') -> Plan:
  """Every memory term (bytes per device) and the step FLOPs for ``w`` on ``mesh`` (``remat`` overrides
  ``w.remat``). ``backend='xla_cpu'`` (what ``--check-xla`` compiles) includes XLA:CPU's fp32 copies of bf16
  matmul operands (:func:`xla_cpu_upcast_bytes`); ``'accelerator'`` leaves them out."""
  if backend not in ('xla_cpu', 'accelerator'):
    raise ValueError(f'plan: backend={backend!r}: expected xla_cpu or accelerator')
  if remat is not None:
    w = dataclasses.replace(w, remat=remat)
  t = cfg.text
  pb, ab, tp = dtype_bytes(w.param_dtype), dtype_bytes(w.dtype), mesh.tensor
  # LoRA adapters are float32 whatever the base (model/layers.py LORA_DTYPE); full fine-tuning keeps param_dtype.
  tb = 4 if w.trainable == 'lora' else pb
  pc = count_params(cfg, w, mesh)
  acts = update_activations(cfg, w, mesh)
  P_dev = w.prompts / mesh.dp
  terms = [
      Term('parameters, frozen', pc.frozen_device * pb, 'state', f'{pc.frozen / 1e6:,.1f}M in {w.param_dtype}'),
      Term('parameters, trainable' + (' (LoRA adapters)' if w.trainable == 'lora' else ''),
           pc.trainable_device * tb, 'state', f'{pc.trainable / 1e6:,.2f}M in '
           f'{"float32" if w.trainable == "lora" else w.param_dtype}'),
      Term('AdamW moments (mu, nu)', 2 * pc.trainable_device * tb, 'state', 'in the trainable parameters\' dtype'),
  ]
  if w.stage == 'congrpo' and w.trainable == 'all' and w.needs_reference:
    terms.append(Term('reference copy of the parameters', pc.trainable_device * pb, 'state', 'full fine-tuning'))
  terms += [
      Term('gradients', pc.trainable_device * tb, 'update'),
  ]
  if w.num_microbatches > 1:
    terms.append(Term('gradient accumulator (microbatch scan)', pc.trainable_device * tb, 'update'))
  if mesh.fsdp > 1:
    terms.append(Term('fsdp: gathered weights kept for the backward', gathered_weights_bytes(cfg, w, mesh),
                      'update', 'upper bound: every decoder matrix + embedding, compute dtype'))
  elif w.param_dtype != w.dtype:
    terms.append(Term('weight cast to the compute dtype (1 layer)', pc.decoder_layer_matrices / tp * ab, 'update'))
  mb = f'microbatch 1/{w.num_microbatches}, ' if w.num_microbatches > 1 else ''
  kept = (f'remat={w.remat}: layer inputs of every layer + one layer\'s set in flight (scanned layers)'
          if w.remat != 'none' else 'remat=none')
  if w.remat != 'none':
    upcast = xla_cpu_upcast_bytes(cfg, w, mesh)
    if upcast and backend == 'xla_cpu':
      terms.append(Term('XLA:CPU only: fp32 copies of bf16 operands', upcast, 'update',
                        'saved layer inputs, embedding; not on a bf16-matmul accelerator'))
  terms.append(Term('activations: prompt rows' if w.stage == 'congrpo' else 'activations: sequence rows',
                    acts.prompt, 'update', mb + kept))
  if w.stage == 'congrpo':
    terms.append(Term('activations: completion rows (shared prompt prefix)', acts.completion, 'update'))
  terms.append(Term('activations: attention probabilities', acts.probs, 'update'))
  if w.remat == 'none':   # with remat the layer in flight is counted in the activations above
    terms.append(Term('attention scores of the layer in flight (fp32)', attention_scores_in_flight(cfg, w, mesh),
                      'update', 'the backward\'s (or the reference forward\'s) current layer'))
  rows = scored_rows(w, mesh)
  terms.append(Term('LM head: one chunk of fp32 logits', logits_chunk_bytes(rows, w.logits_chunk, t.vocab_size, tp),
                    'update', f'{min(w.logits_chunk, rows):,.0f} of {rows:,.0f} positions x V={t.vocab_size:,}'))
  if w.stage == 'congrpo':
    grouped = rollout_cache_bytes(t, P_dev, w.group_size, w.prompt_len, w.completion_len, ab, tp=tp)
    B_dev = P_dev * w.group_size
    terms += [
        Term('rollout KV cache (group layout)', grouped, 'rollout', 'the prompt once, shared by its G samples'),
        Term('rollout decode buffers [B, V] fp32', DECODE_VOCAB_BUFFERS * B_dev * t.vocab_size / tp * 4, 'rollout'),
        *([decode_upcast_term(cfg, mesh)] if backend == 'xla_cpu' and pb < 4 else []),
        Term('rollout prefill (one layer + fp32 probabilities)',
             P_dev * w.prompt_len * decoder_row_bytes(t, act_bytes=ab, lora_widths=(), own_keys=True, tp=tp)
             + attention_probs_bytes(t, P_dev * w.prompt_len, w.prompt_len, tp), 'rollout'),
    ]
  if w.image_patches:
    # Frozen and under stop_gradient: its forward runs before the decoder (per microbatch) and keeps nothing, so
    # it competes with the update's peak instead of adding to it.
    images = P_dev / w.num_microbatches
    terms.append(Term('vision tower transient (before the decoder)',
                      vision_transient_bytes(cfg.vision, images, w.image_patches), 'vision',
                      f'{images:g} image(s) of {w.image_patches} patches, vmapped per image'))
  return Plan(cfg=cfg, workload=w, mesh=mesh, remat=w.remat, terms=tuple(terms),
              activations_no_remat=update_activations(cfg, w, mesh, 'none').total,
              activations_remat=update_activations(cfg, w, mesh, 'full').total, flops=step_flops(cfg, w), params=pc)


def xla_predicted(p: Plan, batch_bytes: float) -> dict[str, float]:
  """What ``compiled.memory_analysis()`` should report for the update step on one device: ``argument`` (state +
  batch), ``output`` (the new state) and ``temp`` (the larger of the update phase's transient terms and the vision
  tower's forward, which runs first and keeps nothing)."""
  state = sum(t.bytes for t in p.terms if t.phase == 'state')
  temp = max(sum(t.bytes for t in p.terms if t.phase == 'update'), sum(t.bytes for t in p.terms if t.phase == 'vision'))
  if p.workload.num_microbatches > 1:
    temp += batch_bytes   # the strided microbatch split (rl/update.py _microbatches) is a copy of the batch
  return {'argument': state + batch_bytes, 'output': state, 'temp': temp}


# ------------------------------------------------------------------------------------------- printing


def _gib(x: float) -> str:
  return f'{x / GiB:8.2f} GiB' if x >= 0.01 * GiB else f'{x / 2**20:8.2f} MiB'


def format_plan(p: Plan, device: Device | None = None) -> str:
  w, m = p.workload, p.mesh
  lines = [f'plan: {w.stage}, {w.trainable} ({"rank " + str(w.lora_rank) if w.trainable == "lora" else "all"}), '
           f'P={w.prompts} G={w.group_size} (B={w.rollouts}), T={w.prompt_len} N={w.completion_len} '
           f'image patches={w.image_patches}, dtype={w.dtype} params={w.param_dtype}, microbatches='
           f'{w.num_microbatches}, mesh {m} ({m.devices} devices), remat={p.remat}, logits chunk {w.logits_chunk}']
  width = max(len(t.name) for t in p.terms) + 2
  for phase, title in (('state', 'resident state'), ('update', 'update step (jitted SFT / Con-GRPO update)'),
                       ('vision', 'vision tower'), ('rollout', 'rollout (compiled sampler)')):
    rows = [t for t in p.terms if t.phase == phase]
    if not rows:
      continue
    lines.append(f'-- {title}')
    lines += [f'  {t.name:<{width}}{_gib(t.bytes)}  {t.note}' for t in rows]
  lines.append('-- per-device totals')
  lines.append(f'  {"state + update step":<{width}}{_gib(p.total("update"))}')
  if w.stage == 'congrpo':
    lines.append(f'  {"state + rollout":<{width}}{_gib(p.total("rollout"))}')
  lines.append(f'  {"activations without / with remat=full":<{width}}{_gib(p.activations_no_remat)} / '
               f'{p.activations_remat / GiB:.2f} GiB (planned; XLA per layer: --measure-layer)')
  f = p.flops
  lines.append('-- FLOPs per optimizer step (whole mesh)')
  lines.append(f'  rollout {f.rollout:.3e}   update {f.update:.3e} (forward {f.update_forward:.3e}, backward '
               f'{f.update_backward:.3e}, reference {f.reference_forward:.3e})   total {f.total:.3e}')
  if device is not None:
    t_ideal = f.total / (m.devices * device.peak_flops)
    frac = p.peak / device.hbm_bytes
    verdict = 'FITS' if frac <= 0.9 else ('TIGHT (> 90%)' if frac <= 1.0 else 'DOES NOT FIT')
    lines.append(f'-- on {m.devices} x {device.name} ({device.hbm_bytes / GiB:.0f} GiB, '
                 f'{device.peak_flops / 1e12:.0f} TFLOP/s bf16)')
    lines.append(f'  peak {p.peak / GiB:.2f} GiB = {100 * frac:.0f}% of device memory: {verdict}')
    lines.append(f'  step time at 100% of peak FLOP/s: {t_ideal:.2f} s (at 40% MFU: {t_ideal / 0.4:.2f} s)')
    if device.note:
      lines.append(f'  note: {device.note}')
  return '\n'.join(lines)


def mesh_shapes(devices: int, kv_heads: int) -> list[MeshShape]:
  """Every (data, fsdp, tensor) factorisation of ``devices`` whose tensor size divides the key/value heads (the
  regime the tensor-parallel activation model was checked in: heads and KV cache split evenly)."""
  out = []
  for t in [t for t in range(1, devices + 1) if devices % t == 0 and kv_heads % t == 0]:
    for f in [f for f in range(1, devices // t + 1) if (devices // t) % f == 0]:
      out.append(MeshShape(devices // t // f, f, t))
  return out


@dataclasses.dataclass(frozen=True)
class Fit:
  mesh: MeshShape
  num_microbatches: int
  remat: str
  peak: float


def fit_search(cfg: Qwen25VLConfig, w: Workload, meshes: Sequence[MeshShape], *,
               backend: str = 'accelerator') -> list[Fit]:
  """Peak bytes for every mesh, every microbatch count that splits each device's prompts into whole groups, and
  every remat mode; ordered by (remat none < dots < full, microbatches, peak), so the first one that fits is the
  smallest change (remat costs a recomputed forward; dots recomputes less than full)."""
  out = []
  for mesh in meshes:
    if w.prompts % mesh.dp:
      continue
    per_dev = w.prompts // mesh.dp
    for remat in FIT_REMAT_ORDER:
      for k in [k for k in range(1, per_dev + 1) if per_dev % k == 0]:
        p = plan(cfg, dataclasses.replace(w, num_microbatches=k), mesh, remat=remat, backend=backend)
        out.append(Fit(mesh, k, remat, p.peak))
  return sorted(out, key=lambda f: (FIT_REMAT_ORDER.index(f.remat), f.num_microbatches, f.peak))


def format_fit(fits: Sequence[Fit], device: Device, stage: str, headroom: float = 0.9) -> str:
  budget = headroom * device.hbm_bytes
  ok = [f for f in fits if f.peak <= budget]
  lines = [f'-- fit search on {device.name} (budget {headroom:.0%} of {device.hbm_bytes / GiB:.0f} GiB): '
           f'{len(ok)} of {len(fits)} settings fit']
  for f in (ok or sorted(fits, key=lambda f: f.peak))[:6]:
    lines.append(f'  mesh {str(f.mesh):<26} microbatches={f.num_microbatches:<3} remat={f.remat:<4} '
                 f'peak {f.peak / GiB:8.2f} GiB{"" if f.peak <= budget else "  (does not fit)"}')
  if ok:
    f = ok[0]
    key = 'rl' if stage == 'congrpo' else 'sft'
    m = f.mesh
    lines.append(f'  smallest change that fits: --config.mesh.data={m.data} --config.mesh.fsdp={m.fsdp} '
                 f'--config.mesh.tensor={m.tensor} --config.{key}.num_microbatches={f.num_microbatches}'
                 f' --config.model.remat={f.remat}')
  else:
    lines.append('  nothing fits: more devices, shorter completions, bf16 parameters or a memory-lean attention / '
                 'log-prob path are needed')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------- config -> workload


def workload_from_config(config, *, prompt_len: int | None = None, text_tokens: int = 128,
                         completion_len: int | None = None) -> tuple[Qwen25VLConfig, Workload]:
  """The architecture and the step shapes of an experiment config (``configs/*.py``).

  ``prompt_len`` defaults to the image's tokens + 2 vision markers + ``text_tokens`` (chat template, question and
  options); SFT adds ``data.max_target_len`` (the answer), Con-GRPO's completions are ``sampling.max_new_tokens``.
  """
  from medad_jax.model.config import from_hf_config
  mc = config.model
  if mc.checkpoint:
    cfg = from_hf_config(mc.checkpoint)
  else:
    cfg = Qwen25VLConfig.preset(mc.preset)
    if mc.get('tokenizer') == 'small' and mc.get('vocab_size'):
      # The miniature's tokenizer is learned at training time with at most model.vocab_size tokens, rounded up to
      # a multiple of 64 by the trainer (medad_jax.train.pipeline.model_config): plan for that upper bound.
      cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=-(-mc.vocab_size // 64) * 64))
  cfg = cfg.replace(dtype=mc.dtype, param_dtype=mc.param_dtype)
  patches = image_patches(config.data.image_size, cfg.vision)
  prompt = prompt_len or image_tokens(patches, cfg.vision) + 2 + text_tokens
  lora = config.get('lora')
  common = dict(lora_rank=lora.rank if lora else 0, lora_pattern=lora.pattern if lora else '',
                dtype=mc.dtype, param_dtype=mc.param_dtype, image_patches=patches, remat=mc.get('remat', 'none'))
  if config.stage == 'congrpo' and config.rl.enabled:
    rl = config.rl
    n = completion_len or config.sampling.max_new_tokens
    w = Workload(stage='congrpo', prompts=rl.prompts_per_step, group_size=rl.group_size, prompt_len=prompt,
                 completion_len=n, trainable=rl.trainable, num_microbatches=rl.num_microbatches,
                 needs_reference=rl.beta > 0 or rl.ratio_to == 'sft', inner_iterations=rl.inner_iterations,
                 logits_chunk=rl.get('logits_chunk', 1024), **common)
  else:
    s = config.sft
    w = Workload(stage='sft', prompts=s.batch_size, group_size=1, prompt_len=prompt + config.data.max_target_len
                 if prompt_len is None else prompt, completion_len=0, trainable=s.trainable,
                 num_microbatches=s.num_microbatches, logits_chunk=s.get('logits_chunk', 1024),
                 target_len=config.data.max_target_len if prompt_len is None else 0, **common)
  return cfg, w


# ------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m medad_jax.plan', description=__doc__.split('\n')[0])
  p.add_argument('--config', default='congrpo:paper', help='config spec, e.g. congrpo:paper or sft')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='config override, as --config.KEY=VALUE of the launcher (repeatable)')
  p.add_argument('--mesh', default='data=1,fsdp=1,tensor=1', help='data=N,fsdp=N,tensor=N (one may be -1)')
  p.add_argument('--devices', type=int, default=None, help='device count (needed for a -1 mesh axis)')
  p.add_argument('--device', choices=sorted(DEVICES), default=None, help='device to give a verdict for')
  p.add_argument('--remat', choices=REMAT, default=None, help='override model.remat (none | full | dots)')
  p.add_argument('--prompt-len', type=int, default=None, help='T (default: image tokens + 2 + --text-tokens)')
  p.add_argument('--text-tokens', type=int, default=128, help='text tokens per prompt besides the image')
  p.add_argument('--completion-len', type=int, default=None, help='N (default: sampling.max_new_tokens)')
  p.add_argument('--fit', action='store_true',
                 help='with --device: try microbatch counts and remat modes on --mesh, report the smallest change '
                 'that fits')
  p.add_argument('--fit-meshes', action='store_true',
                 help='with --fit: also try every (data, fsdp, tensor) factorisation of the device count')
  p.add_argument('--check-xla', action='store_true',
                 help='also compile the step on CPU (abstract weights, --mesh) and compare with XLA memory analysis')
  p.add_argument('--measure-layer', action='store_true',
                 help='compile the step with L and L+1 decoder layers: what XLA keeps per layer vs the plan')
  return p.parse_args(argv)


def main(argv: list[str]) -> int:
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s', datefmt='%H:%M:%S')
  args = parse_args(argv)
  from configs import common as configs_common
  config = configs_common.load(args.config, args.set)
  mesh = parse_mesh(args.mesh, args.devices)
  cfg, w = workload_from_config(config, prompt_len=args.prompt_len, text_tokens=args.text_tokens,
                                completion_len=args.completion_len)
  if args.remat:
    w = dataclasses.replace(w, remat=args.remat)
  # A target device is an accelerator: XLA:CPU's fp32 copies of bf16 operands are left out of its verdict (they
  # are in the plan that --check-xla compares with XLA:CPU).
  p = plan(cfg, w, mesh, backend='accelerator' if args.device else 'xla_cpu')
  sys.stdout.write(f'config {args.config} {" ".join(args.set)}\n')
  sys.stdout.write(format_plan(p, DEVICES[args.device] if args.device else None) + '\n')
  if args.device:
    sys.stdout.write('  (accelerator figures: XLA:CPU\'s fp32 copies of bf16 operands are left out; --check-xla '
                     'compares the XLA:CPU plan)\n')
  if args.fit:
    if not args.device:
      raise SystemExit('--fit needs --device')
    meshes = mesh_shapes(mesh.devices, cfg.text.num_kv_heads) if args.fit_meshes else [mesh]
    sys.stdout.write(format_fit(fit_search(cfg, w, meshes), DEVICES[args.device], w.stage) + '\n')
  if args.check_xla:
    rows = check_against_xla(cfg, w, mesh)
    sys.stdout.write(format_xla_check(rows) + '\n')
  if args.measure_layer:
    m = measure_layer(cfg, w, mesh)
    sys.stdout.write(f'-- one decoder layer, remat={w.remat}: XLA keeps {m["xla"] / 2**20:.3f} MiB, planned '
                     f'{m["planned"] / 2**20:.3f} MiB ({100 * (m["planned"] - m["xla"]) / m["xla"]:+.1f}%); '
                     f'without remat planned {m["no_remat_planned"] / 2**20:.3f} MiB\n')
  return 0


# ------------------------------------------------------------------------------------------- XLA check


def check_against_xla(cfg: Qwen25VLConfig, w: Workload, mesh: MeshShape = MeshShape(), *, seed: int = 0
                      ) -> dict[str, tuple[float, float]]:
  """Compiles the real step for ``w`` on ``mesh`` (CPU devices, abstract weights: :func:`compiled_memory`) ->
  ``{quantity: (planned, XLA)}`` for the per-device argument, output and temp bytes of ``memory_analysis()``."""
  cfg = cfg.replace(dtype=w.dtype, param_dtype=w.param_dtype)
  m = compiled_memory(cfg, w, mesh, seed=seed)
  pred = xla_predicted(plan(cfg, w, mesh), m['batch'])
  # Scalars of the state (step, rng, optimizer count) and the metrics are a few bytes: not modelled.
  return {'argument': (pred['argument'], m['argument']), 'output': (pred['output'], m['output']),
          'temp': (pred['temp'], m['temp'])}


def measure_layer(cfg: Qwen25VLConfig, w: Workload, mesh: MeshShape = MeshShape()) -> dict[str, float]:
  """What XLA keeps per decoder layer: the compiled update's temp bytes with ``L + 1`` minus with ``L`` layers
  (everything else equal) -> ``{'xla': bytes, 'planned': bytes, 'no_remat_planned': bytes}`` per layer. This is
  how the ``SAVED_*`` widths were measured (``--measure-layer``)."""
  L = cfg.text.num_layers
  temps = []
  for n in (L, L + 1):
    c = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=n))
    temps.append(compiled_memory(c, w, mesh)['temp'])
  one = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=1))
  return {'xla': temps[1] - temps[0], 'planned': update_activations(one, w, mesh).total,
          'no_remat_planned': update_activations(one, w, mesh, 'none').total}


def compiled_memory(cfg: Qwen25VLConfig, w: Workload, mesh: MeshShape = MeshShape(), *, seed: int = 0) -> dict:
  """Lowers and compiles the real SFT step / Con-GRPO update for ``w`` on ``mesh`` (CPU devices) with *abstract*
  weights (``nnx.eval_shape``: nothing of the model is allocated) -> XLA's ``memory_analysis()`` per device:
  ``{'argument', 'output', 'alias', 'temp', 'total', 'batch', 'compile_s'}`` in bytes (``total`` = argument +
  output - alias + temp: what XLA allocates for the program). Any dtype, any size (the paper's 3B included)."""
  import time
  import jax
  from flax import nnx
  from medad_jax.model.lora import LoraConfig, apply_lora
  from medad_jax.model.qwen25vl import Qwen25VL
  from medad_jax.rl import update as U
  from medad_jax.sharding import make_mesh
  if jax.device_count() < mesh.devices:
    raise ValueError(f'compiled_memory: mesh {mesh} needs {mesh.devices} devices, JAX has {jax.device_count()} '
                     '(set XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax)')
  jmesh = (make_mesh(mesh.data, mesh.fsdp, mesh.tensor, devices=jax.devices()[:mesh.devices])
           if mesh.devices > 1 else None)
  cfg = cfg.replace(dtype=w.dtype, param_dtype=w.param_dtype, remat=w.remat, attention='xla')

  def make_model():
    m = Qwen25VL(cfg, rngs=nnx.Rngs(seed))
    if w.trainable == 'lora':
      apply_lora(m, LoraConfig(rank=w.lora_rank, alpha=2.0 * w.lora_rank, pattern=w.lora_pattern))
    return m

  tx, _ = U.make_optimizer(1e-4)
  keep_ref = w.stage == 'congrpo' and w.trainable == 'all' and w.needs_reference
  from medad_jax.rl.state import TRAINABLE
  graphdef = nnx.split(nnx.eval_shape(make_model), TRAINABLE[w.trainable], ...)[0]
  state = jax.eval_shape(lambda: U.init_train_state(make_model(), tx, trainable=w.trainable,
                                                    keep_reference=keep_ref)[1])
  side = int(round(math.sqrt(w.image_patches)))
  if w.stage == 'sft':
    batch = sft_batch(cfg, w.prompts, w.prompt_len, side, seed=seed, answer_len=w.target_len or None)
    step = U.make_sft_step(graphdef, tx, U.SFTConfig(num_microbatches=w.num_microbatches,
                                                     logits_chunk=w.logits_chunk), mesh=jmesh)
  else:
    batch = rollout_batch(cfg, w.prompts, w.group_size, w.prompt_len, w.completion_len, side, seed=seed)
    gcfg = U.GRPOConfig(group_size=w.group_size, beta=0.04 if w.needs_reference else 0.0,
                        num_microbatches=w.num_microbatches, logits_chunk=w.logits_chunk)
    step = U.make_congrpo_update(graphdef, tx, gcfg, mesh=jmesh)

  def abstract(tree, shardings=None):
    if shardings is None:
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)

  if jmesh is None:
    state_abs, batch_abs = abstract(state), abstract(batch)
    batch_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(batch))
  else:
    state_abs = abstract(state, U.tree_shardings(state, jmesh))
    bsh = U.batch_shardings(batch, jmesh)
    batch_abs = abstract(batch, bsh)
    batch_bytes = sum(np.asarray(x).nbytes * math.prod(s.shard_shape(np.shape(x))) / max(np.size(x), 1)
                      for x, s in zip(jax.tree.leaves(batch), jax.tree.leaves(bsh)))
  t0 = time.perf_counter()
  ma = step.lower(state_abs, batch_abs).compile().memory_analysis()
  arg, out, alias, temp = (float(ma.argument_size_in_bytes), float(ma.output_size_in_bytes),
                           float(ma.alias_size_in_bytes), float(ma.temp_size_in_bytes))
  return {'argument': arg, 'output': out, 'alias': alias, 'temp': temp, 'total': arg + out - alias + temp,
          'batch': float(batch_bytes), 'compile_s': time.perf_counter() - t0}


def format_xla_check(rows: dict[str, tuple[float, float]]) -> str:
  out = ['-- planned vs XLA compiled memory analysis (CPU, per device)']
  for k, (pl, xla) in rows.items():
    out.append(f'  {k:<9} planned {pl / 2**20:10.3f} MiB   XLA {xla / 2**20:10.3f} MiB   '
               f'{100 * (pl - xla) / xla:+6.1f}%')
  return '\n'.join(out)


# ------------------------------------------------------------------------------------------- synthetic batches


def _image_prompt_ids(cfg: Qwen25VLConfig, rows: int, length: int, side: int, rng: np.random.Generator
                      ) -> np.ndarray:
  """``rows`` sequences of ``length`` ids: text, one ``side x side``-patch image near the start, text."""
  n_img = image_tokens(side * side, cfg.vision) if side else 0
  if n_img + 3 > length:
    raise ValueError(f'length {length} cannot hold an image of {n_img} tokens plus its markers')
  ids = rng.integers(0, cfg.text.vocab_size - 10, size=(rows, length)).astype(np.int32)
  special = {cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.video_token_id}
  ids[np.isin(ids, list(special))] = 0
  if n_img:
    ids[:, 1] = cfg.vision_start_token_id
    ids[:, 2:2 + n_img] = cfg.image_token_id
    ids[:, 2 + n_img] = cfg.vision_end_token_id
  return ids


def prompt_batch(cfg: Qwen25VLConfig, prompts: int, prompt_len: int, image_side: int, *, seed: int = 0):
  """The sampler's ``PromptBatch`` (per-image layout, ``sampling/prompts.py``) of ``prompts`` full-length prompts
  with one ``image_side x image_side``-patch image each."""
  from medad_jax.sampling.prompts import prepare_prompts
  rng = np.random.default_rng(seed)
  ids = _image_prompt_ids(cfg, prompts, prompt_len, image_side, rng)
  kw = {}
  if image_side:
    kw = dict(pixel_values=rng.normal(size=(prompts * image_side**2, cfg.vision.patch_dim)).astype(np.float32),
              image_grid_thw=np.array([[1, image_side, image_side]] * prompts), patch_buckets=(image_side**2,))
  return prepare_prompts(cfg, list(ids), length_buckets=(prompt_len,), **kw)


def rollout_batch(cfg: Qwen25VLConfig, prompts: int, group: int, prompt_len: int, completion_len: int,
                  image_side: int, *, seed: int = 0) -> dict:
  """A full-length Con-GRPO update batch (numpy) in the trainer's layout (``rl.update.rollout_batch`` of a
  ``PromptBatch``): ``prompts`` prompts of ``prompt_len`` tokens with one ``image_side x image_side``-patch image
  each, ``prompts * group`` completions of ``completion_len`` tokens (all real), random rewards and old log-probs."""
  rng = np.random.default_rng(seed + 1)
  pb = prompt_batch(cfg, prompts, prompt_len, image_side, seed=seed)
  B = prompts * group
  batch = dict(prompt_ids_PT=pb.input_ids_PT, prompt_mask_PT=pb.attention_mask_PT,
               prompt_positions_3PT=pb.positions_3PT, rope_deltas_P=pb.rope_deltas_P,
               completion_ids_BN=rng.integers(0, cfg.text.vocab_size - 10, (B, completion_len)).astype(np.int32),
               completion_mask_BN=np.ones((B, completion_len), bool),
               old_logp_BN=-rng.random((B, completion_len)).astype(np.float32),
               rewards_B=rng.random(B).astype(np.float32))
  if image_side:
    batch.update(pixel_values_ILC=pb.pixel_values_ILC, vision_meta_I=pb.vision_meta_I, image_src_PT=pb.image_src_PT)
  return batch


def sft_batch(cfg: Qwen25VLConfig, rows: int, length: int, image_side: int, *, seed: int = 0,
              answer_len: int | None = None) -> dict:
  """An SFT batch (numpy) in the trainer's layout (``train.pipeline.sft_batch``): ``rows`` sequences of ``length``
  tokens with one image each, the last ``answer_len`` tokens (default: half) as the assistant target."""
  from medad_jax.train.pipeline import sft_batch as trainer_sft_batch
  rng = np.random.default_rng(seed)
  ids = _image_prompt_ids(cfg, rows, length, image_side, rng)
  answer = length // 2 if answer_len is None else answer_len
  examples = []
  for r in range(rows):
    loss = np.zeros(length, np.int32)
    loss[length - answer:] = 1
    ex = {'input_ids': ids[r], 'attention_mask': np.ones(length, np.int32),
          'mm_token_type_ids': (ids[r] == cfg.image_token_id).astype(np.int32), 'loss_mask': loss,
          'pixel_values': np.zeros((0, cfg.vision.patch_dim), np.float32),
          'image_grid_thw': np.zeros((0, 3), np.int32)}
    if image_side:
      ex['pixel_values'] = rng.normal(size=(image_side**2, cfg.vision.patch_dim)).astype(np.float32)
      ex['image_grid_thw'] = np.array([[1, image_side, image_side]], np.int32)
    examples.append(ex)
  return trainer_sft_batch(examples, cfg, buckets=(length,),
                           patch_buckets=(image_side**2,) if image_side else None)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
