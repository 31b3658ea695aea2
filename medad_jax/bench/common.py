"""Shared benchmark helpers: wall-clock timing, the machine's measured matmul peak, model FLOP counts and the result
table (ours vs the peer, with the ratio).

Timings are wall-clock seconds of whole calls that end with the result on the host (``jax.block_until_ready``),
best of ``repeats`` after ``warmup`` untimed calls (compilation happens in the warm-up). FLOP counts are *model*
FLOPs (2 per multiply-add of the matmuls a forward needs, causal attention counted over the keys actually
visible), not the FLOPs XLA happens to execute, so ``achieved / peak`` reads like an MFU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medad_jax.model.config import Qwen25VLConfig, TextConfig, VisionConfig

log = logging.getLogger(__name__)


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s', datefmt='%H:%M:%S')


# ----------------------------------------------------------------------------- timing


def time_call(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> list[float]:
  """Seconds of each of ``repeats`` calls of ``fn`` (after ``warmup`` untimed calls); JAX results are waited on."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out


def matmul_peak_flops(n: int = 2048, dtype: str = 'float32', repeats: int = 5) -> float:
  """Measured FLOP/s of one jitted ``[n, n] @ [n, n]`` matmul on the default JAX device (best of ``repeats``).

  This is the practical peak a dense model could reach on this machine with XLA, not a datasheet number.
  """
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), jnp.dtype(dtype))
  b = jax.random.normal(k2, (n, n), jnp.dtype(dtype))
  mm = jax.jit(lambda x, y: x @ y)
  best = min(time_call(lambda: mm(a, b), repeats=repeats, warmup=2))
  return 2.0 * n**3 / best


def machine_summary() -> str:
  """One line: CPU model / cores, JAX backend and devices, torch threads when torch is loaded, the CPU's vector /
  matrix ISA flags (:func:`cpu_flags`)."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [l.split(':', 1)[1].strip() for l in f if l.startswith('model name')]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  parts = [f'{cpu}', f'{os.cpu_count()} logical CPUs',
           f'jax {jax.__version__} {jax.default_backend()} x{jax.local_device_count()}']
  if 'torch' in sys.modules:
    torch = sys.modules['torch']
    parts.append(f'torch {torch.__version__} threads={torch.get_num_threads()}')
  return ', '.join(parts) + f'; cpu flags: {cpu_flags()}'


def cpu_flags() -> str:
  """The vector / matrix ISA of this CPU that XLA can use, e.g. ``'AVX2 yes, AVX-512 yes (avx512f avx512bw
  avx512vl avx512_vnni avx512_bf16), AMX no'``, plus ``XLA_FLAGS`` when set (``--xla_cpu_max_isa=AVX2`` emulates an
  AVX2-only machine)."""
  try:
    with open('/proc/cpuinfo') as f:
      flags = next((l.split(':', 1)[1].split() for l in f if l.startswith('flags')), [])
  except OSError:
    flags = []
  if not flags:
    return f'CPU flags unknown ({platform.machine()}, no /proc/cpuinfo flags)'
  fs = set(flags)
  avx512 = sorted(f for f in fs if f.startswith('avx512'))
  amx = sorted(f for f in fs if f.startswith('amx'))
  keep = [f for f in ('avx512f', 'avx512bw', 'avx512vl', 'avx512_vnni', 'avx512_bf16', 'avx512_fp16') if f in fs]
  yes = lambda on, detail='': ('yes' + (f' ({detail})' if detail else '')) if on else 'no'  # noqa: E731
  out = (f'AVX2 {yes("avx2" in fs)}, FMA {yes("fma" in fs)}, AVX-512 {yes(avx512, " ".join(keep))}, '
         f'AMX {yes(amx, " ".join(amx))}')
  if os.environ.get('XLA_FLAGS'):
    out += f'; XLA_FLAGS={os.environ["XLA_FLAGS"]}'
  return out


def machine_header(peak: float, peak_size: int) -> str:
  """The lines a benchmark prints first: the machine (CPU flags included) and the measured fp32 matmul peak."""
  return f'machine: {machine_summary()}\nmeasured fp32 matmul peak (jax, {peak_size}^3): {peak / 1e9:.1f} GFLOP/s'


# ----------------------------------------------------------------------------- model FLOPs


def text_flops(cfg: TextConfig, new_tokens: int, context: int, *, lm_head_tokens: int | None = None) -> float:
  """Forward FLOPs of ``new_tokens`` decoder tokens for one sequence whose keys are positions ``[0, context)``
  (the new tokens being the last ``new_tokens`` of them, causal). ``lm_head_tokens`` (default all) get logits."""
  D, H, F = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  proj = 2 * D * (cfg.num_heads * H + 2 * cfg.num_kv_heads * H) + 2 * cfg.num_heads * H * D
  mlp = 2 * 3 * D * F
  # Causal attention: new token i (0-based among the new ones) sees context - new_tokens + i + 1 keys; QK^T + AV.
  keys = new_tokens * (context - new_tokens) + new_tokens * (new_tokens + 1) / 2
  attn = 2 * 2 * cfg.num_heads * H * keys
  head = 2 * D * cfg.vocab_size * (new_tokens if lm_head_tokens is None else lm_head_tokens)
  return cfg.num_layers * (new_tokens * (proj + mlp)) + cfg.num_layers * attn + head


def vision_flops(cfg: VisionConfig, patches: int, window_patches: int | None = None) -> float:
  """Forward FLOPs of the vision tower over ``patches`` patches of one image (window blocks attend inside windows
  of ``window_patches`` patches, default ``(window_size / patch_size)**2``)."""
  D, F, L = cfg.hidden_size, cfg.intermediate_size, patches
  win = window_patches or min(L, (cfg.window_size // cfg.patch_size) ** 2)
  per_block = L * (2 * D * 3 * D + 2 * D * D + 2 * 3 * D * F)
  full = len(cfg.fullatt_block_indexes)
  attn = full * 2 * 2 * L * L * D + (cfg.depth - full) * 2 * 2 * L * win * D
  merged = L // cfg.spatial_merge_size**2
  U = D * cfg.spatial_merge_size**2
  merger = merged * (2 * U * U + 2 * U * cfg.out_hidden_size)
  return L * 2 * cfg.patch_dim * D + cfg.depth * per_block + attn + merger


def param_count(cfg: Qwen25VLConfig) -> int:
  """Parameters of the whole model (vision tower included; a tied head counted once)."""
  t, v = cfg.text, cfg.vision
  D, H = t.hidden_size, t.head_dim
  layer = (D * t.num_heads * H + t.num_heads * H + 2 * (D * t.num_kv_heads * H + t.num_kv_heads * H)
           + t.num_heads * H * D + 3 * D * t.intermediate_size + 2 * D)
  text = t.num_layers * layer + t.vocab_size * D * (1 if t.tie_word_embeddings else 2) + D
  Dv, U = v.hidden_size, v.hidden_size * v.spatial_merge_size**2
  block = 3 * Dv * Dv + 3 * Dv + Dv * Dv + Dv + 3 * (Dv * v.intermediate_size) + 2 * v.intermediate_size + Dv + 2 * Dv
  vision = v.patch_dim * Dv + v.depth * block + Dv + U * U + U + U * v.out_hidden_size + v.out_hidden_size
  return int(text + vision)


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class Row:
  """One compared quantity: ``ours`` vs ``peer`` in ``unit``; ``higher_is_better`` decides the ratio's direction."""

  name: str
  ours: float
  peer: float | None = None
  unit: str = ''
  higher_is_better: bool = True

  @property
  def ratio(self) -> float | None:
    if self.peer is None or self.peer == 0 or self.ours == 0:
      return None
    return self.ours / self.peer if self.higher_is_better else self.peer / self.ours


def _fmt(x: float | None) -> str:
  if x is None:
    return '-'
  if x == 0:
    return '0'
  a = abs(x)
  if a >= 1e9:
    return f'{x / 1e9:.2f}G'
  if a >= 1e6:
    return f'{x / 1e6:.2f}M'
  if a >= 1e4:
    return f'{x / 1e3:.1f}k'
  if a >= 100:
    return f'{x:.0f}'
  if a >= 1:
    return f'{x:.2f}'
  return f'{x:.3g}'


def format_table(title: str, rows: Sequence[Row], peer_name: str = 'peer') -> str:
  """A fixed-width table: quantity | ours | peer | unit | speed-up (ours vs peer, >1 = ours better)."""
  header = ('quantity', 'ours', peer_name, 'unit', 'ours/peer')
  body = [(r.name, _fmt(r.ours), _fmt(r.peer), r.unit, '-' if r.ratio is None else f'{r.ratio:.2f}x') for r in rows]
  widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
  line = lambda cells: '  '.join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  sep = '-' * len(line(header))
  return '\n'.join([title, sep, line(header), sep, *map(line, body), sep])


def emit(text: str) -> None:
  """Writes a result block to stdout (the benchmark's product; progress goes to logging)."""
  sys.stdout.write(text + '\n')
  sys.stdout.flush()


def to_jsonable(x):
  if isinstance(x, dict):
    return {k: to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x
