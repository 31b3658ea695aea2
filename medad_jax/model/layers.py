"""Shared building blocks: a LoRA-capable ``Linear``, ``RMSNorm`` and ``Embed``.

Axis legend (used in every model file of this package):
  B batch        T query length      S key/value length      D model width     F MLP width
  N query heads  K key/value heads   H head dim              V vocabulary      P patch vector (C*Tp*p*p)
  L patches (vision tokens)          I input features        O output features R LoRA rank

Parameter layout follows the Hugging Face names so the checkpoint table in ``checkpoint.py`` stays declarative:
a ``Linear`` named ``q_proj`` holds ``kernel[I, O]`` (= HF ``weight.T``) and optionally ``bias[O]``.

LoRA adapters live in the same ``Linear`` but in their own variable type (``nnx.LoRAParam``), so
``nnx.state(model, nnx.LoRAParam)`` is the adapter subtree and ``nnx.state(model, nnx.Param)`` the untouched base.
Adapters are switched off for a forward pass with ``with lora_disabled(): ...``; this is read while tracing, so a
single jitted function can run the policy (adapters on) and the reference (adapters off) side by side, and with
adapters off the computation is exactly the base one (bit-identical). An adapted ``Linear`` runs
:func:`lora_matmul`, whose backward is written by hand so XLA:CPU materialises the output gradient once before its
consumers (the ``small`` Con-GRPO update: 0.87 -> 0.60 s, ``python -m medad_jax.bench grpo_step --configs small``).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

# The frozen base parameters: every ``nnx.Param`` that is not a LoRA adapter (``LoRAParam`` subclasses ``Param``).
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
LORA_PARAMS = nnx.LoRAParam
# Storage dtype of every LoRA adapter, independent of the base's ``param_dtype`` (see ``Linear.add_lora``).
LORA_DTYPE = jnp.float32

_LORA_ENABLED = contextvars.ContextVar('medad_lora_enabled', default=True)


@contextlib.contextmanager
def lora_disabled():
  """Within this context (at trace time) every LoRA adapter is skipped."""
  tok = _LORA_ENABLED.set(False)
  try:
    yield
  finally:
    _LORA_ENABLED.reset(tok)


def lora_enabled() -> bool:
  return _LORA_ENABLED.get()


def _dtype(name_or_dtype):
  return jnp.dtype(name_or_dtype)


@jax.custom_vjp
def lora_matmul(x, w, a, b, scale):
  """``x @ w + (x @ a) @ b * scale`` (``x [..., I]``, ``w [I, O]``, ``a [I, R]``, ``b [R, O]``)."""
  return x @ w + ((x @ a) @ b) * scale


def _lora_fwd(x, w, a, b, scale):
  xa = x @ a
  return x @ w + (xa @ b) * scale, (x, w, a, b, xa, scale)


def _lora_bwd(res, g):
  x, w, a, b, xa, scale = res
  # The output gradient is materialised in its own layout before its three consumers (dX, the adapter's dX term,
  # dB): otherwise XLA:CPU fuses its producer into a transposed copy for dB that runs far below memory bandwidth.
  g = jax.lax.optimization_barrier(g)
  lead = g.shape[:-1]
  g2 = g.reshape(-1, g.shape[-1])
  x2 = x.reshape(-1, x.shape[-1])
  gs = g2 * scale
  gb = gs @ b.T                                            # [M, R]
  dx = (g2 @ w.T + gb @ a.T).reshape(*lead, x.shape[-1])
  da = x2.T @ gb
  db = xa.reshape(-1, xa.shape[-1]).T @ gs
  dw = x2.T @ g2                                           # unused (and removed by XLA) unless w is trained
  return dx, dw, da, db, jnp.zeros_like(scale)


lora_matmul.defvjp(_lora_fwd, _lora_bwd)


@jax.custom_vjp
def dense_matmul(x, w):
  """``x @ w`` whose backward materialises the output gradient once before its two consumers (``dX``, ``dW``), as
  :func:`lora_matmul`'s does. Without the barrier XLA:CPU fuses the gradient's producer (e.g. the SiLU gate's
  backward) into a transposed copy for ``dW`` that runs far below memory bandwidth: 14 % of the miniature's SFT
  step's op time (``bench opprofile``'s classes on that step); with it the step is 1.34x faster (19.2 -> 14.4 s
  for 60 steps of the embedded run's SFT, same batches; WORKSPACE.md "The embedded default run"). The forward is
  ``x @ w``."""
  return x @ w


def _dense_fwd(x, w):
  return x @ w, (x, w)


def _dense_bwd(res, g):
  x, w = res
  g = jax.lax.optimization_barrier(g)
  g2 = g.reshape(-1, g.shape[-1])
  dx = (g2 @ w.T).reshape(x.shape)
  dw = x.reshape(-1, x.shape[-1]).T @ g2
  return dx, dw


dense_matmul.defvjp(_dense_fwd, _dense_bwd)


class Linear(nnx.Module):
  """``y = x @ kernel + bias`` with an optional low-rank adapter ``(x @ lora_a) @ lora_b * scale``."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, rngs: nnx.Rngs,
               dtype='float32', param_dtype='float32', init_std: float = 0.02):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = _dtype(dtype)
    pd = _dtype(param_dtype)
    self.kernel = nnx.Param(init_std * jax.random.normal(rngs.params(), (in_features, out_features), pd))
    self.bias = nnx.Param(jnp.zeros((out_features,), pd)) if use_bias else None
    # nnx.data: the slots start empty but may later hold LoRAParams (NNX would otherwise mark None as static).
    self.lora_a = nnx.data(None)
    self.lora_b = nnx.data(None)
    self.lora_scale = 0.0

  def add_lora(self, rank: int, alpha: float, rngs: nnx.Rngs):
    """Attaches an adapter (A ~ N(0, 1/in_features), B = 0 so the adapted model starts equal).

    The adapters are stored in ``LORA_DTYPE`` (float32) whatever the base's ``param_dtype``: their gradients and
    AdamW moments follow the parameters' dtype, and in bfloat16 (8 mantissa bits) an update of relative size below
    2**-9 -- e.g. one lr-1e-6 AdamW step on a weight of order 1e-2 -- rounds back to the old value. The forward
    casts them to the compute dtype like the kernel.
    """
    self.lora_a = nnx.LoRAParam(
        jax.random.normal(rngs.params(), (self.in_features, rank), LORA_DTYPE) / jnp.sqrt(self.in_features))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, self.out_features), LORA_DTYPE))
    self.lora_scale = float(alpha) / float(rank)

  def __call__(self, x_I: jax.Array) -> jax.Array:
    x = x_I.astype(self.dtype)
    w = self.kernel.get_value().astype(self.dtype)
    if self.lora_a is not None and lora_enabled():
      y = lora_matmul(x, w, self.lora_a.get_value().astype(self.dtype), self.lora_b.get_value().astype(self.dtype),
                      jnp.asarray(self.lora_scale, self.dtype))
    else:
      y = dense_matmul(x, w)
    if self.bias is not None:
      y = y + self.bias.get_value().astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """Qwen2 RMSNorm: statistics in float32, scale applied after casting back (as transformers does)."""

  def __init__(self, dim: int, *, eps: float, param_dtype='float32'):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), _dtype(param_dtype)))

  def __call__(self, x: jax.Array) -> jax.Array:
    in_dtype = x.dtype
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    x32 = x32 * jax.lax.rsqrt(var + self.eps)
    return self.scale.get_value().astype(in_dtype) * x32.astype(in_dtype)


class Embed(nnx.Module):
  """Token embedding ``embedding[V, D]``; ``attend`` gives logits for a tied head."""

  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, dtype='float32', param_dtype='float32'):
    self.dtype = _dtype(dtype)
    self.embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (vocab, dim), _dtype(param_dtype)))

  def __call__(self, ids_BT: jax.Array) -> jax.Array:
    return jnp.take(self.embedding.get_value(), ids_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD: jax.Array) -> jax.Array:
    return x_BTD @ self.embedding.get_value().astype(self.dtype).T
