"""Training state, optimiser and placement shared by the SFT step and the Con-GRPO update.

* :class:`TrainState`: a pytree dataclass ``(params, frozen, opt_state, step, rng, ref_params)``; the model's
  ``GraphDef`` lives outside it (static). See ``update.py`` for why the steps are ``jax.jit`` over split state.
* :func:`init_train_state` / :func:`merge_model`: split a model into trainable and frozen parts and back.
* :func:`prepare_rl_policy`: pi_SFT -> merged base + fresh RL adapters (the reference costs no weight copy).
* :func:`make_optimizer`: AdamW with global-norm clipping and a schedule.
* Placement: :func:`tree_shardings` (every model-shaped leaf, optimizer moments included, follows
  ``medad_jax.sharding.PARAM_RULES``), :func:`batch_shardings` / :func:`put_batch`, :func:`place_state`, and
  :class:`JittedStep`, which jits a step with those shardings and donates the state.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ train state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything a step reads and writes (a pytree; the ``GraphDef`` is kept outside). See the module docstring."""

  params: nnx.State
  frozen: nnx.State
  opt_state: Any
  step: jax.Array
  rng: jax.Array
  ref_params: nnx.State | None = None

  def replace(self, **kw) -> 'TrainState':
    return dataclasses.replace(self, **kw)


# 'decoder': every weight but the vision tower's (full fine-tuning over a frozen tower, e.g. one the miniature's
# vision warm-up has trained: gradients through a decoder that does not yet read the tower would overwrite it).
TRAINABLE = {'lora': nnx.LoRAParam, 'all': nnx.Param,
             'decoder': nnx.All(nnx.Param, nnx.Not(nnx.PathContains('visual')))}


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, trainable: str = 'lora',
                     seed: int = 0, keep_reference: bool = False) -> tuple[nnx.GraphDef, TrainState]:
  """Splits ``model`` into ``(graphdef, TrainState)``.

  Args:
    trainable: ``'lora'`` (the ``nnx.LoRAParam`` adapters; everything else frozen) or ``'all'`` (every
      ``nnx.Param``).
    seed: seeds ``TrainState.rng``.
    keep_reference: store a frozen copy of the trainable parameters as the reference policy (full fine-tuning
      Con-GRPO; with LoRA the reference is the adapters-off forward and this must stay False).
  """
  if trainable not in TRAINABLE:
    raise ValueError(f'trainable={trainable!r}: expected one of {sorted(TRAINABLE)}')
  graphdef, params, frozen = nnx.split(model, TRAINABLE[trainable], ...)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  if n == 0:
    raise ValueError(f'trainable={trainable!r} selects no parameters of the model' +
                     (' (no LoRA adapters attached: call medad_jax.model.lora.apply_lora first)'
                      if trainable == 'lora' else ''))
  if keep_reference and trainable == 'lora':
    raise ValueError('keep_reference=True with LoRA: the reference is the adapters-off forward, no copy needed')
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves((params, frozen)))
  log.info('trainable parameters: %s of %s (%.3f%%)', f'{n:,}', f'{total:,}', 100.0 * n / max(total, 1))
  ref = jax.tree.map(jnp.copy, params) if keep_reference else None
  state = TrainState(params=params, frozen=frozen, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                     rng=jax.random.PRNGKey(seed), ref_params=ref)
  return graphdef, state


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """The current policy as a module (for the sampler, evaluation and export). Shares the state's buffers."""
  return nnx.merge(graphdef, state.params, state.frozen)


def prepare_rl_policy(model: nnx.Module, lora_cfg) -> list[str]:
  """pi_SFT -> the RL starting point with LoRA: merge any (SFT) adapters into the base, attach fresh RL adapters.

  The adapters start with ``lora_b = 0``, so the policy starts equal to pi_SFT, and the adapters-off forward *is*
  pi_SFT for the whole run. Returns the adapted module paths.
  """
  from medad_jax.model.lora import apply_lora, merge_lora
  n = merge_lora(model)
  log.info('merged %d SFT adapters into the base; attaching fresh RL adapters (rank %d)', n, lora_cfg.rank)
  return apply_lora(model, lora_cfg, rngs=nnx.Rngs(lora_cfg.seed))


def make_optimizer(learning_rate: float, *, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, max_grad_norm: float | None = 1.0, warmup_steps: int = 0,
                   total_steps: int | None = None, schedule: str = 'constant'
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping -> ``(tx, lr_schedule)``.

  ``schedule``: ``'constant'`` (after a linear warmup of ``warmup_steps``) or ``'cosine'`` (to 0 at
  ``total_steps``). Defaults follow PyTorch's AdamW except ``weight_decay`` (0, as transformers' trainers).
  """
  if schedule == 'constant':
    sched = optax.constant_schedule(learning_rate)
    if warmup_steps:
      sched = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), sched], [warmup_steps])
  elif schedule == 'cosine':
    if not total_steps:
      raise ValueError('schedule="cosine" needs total_steps')
    sched = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1))
  else:
    raise ValueError(f'schedule={schedule!r}: expected "constant" or "cosine"')
  parts = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
  parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts), sched


def optimizer_from_config(optim, total_steps: int | None = None
                          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """:func:`make_optimizer` from an ``optim`` block of the configs (``configs/common.py:optim_config``)."""
  return make_optimizer(optim.lr, weight_decay=optim.weight_decay, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        max_grad_norm=optim.max_grad_norm or None, warmup_steps=optim.warmup_steps,
                        total_steps=total_steps, schedule=optim.schedule)


# ------------------------------------------------------------------------------------------- shardings


def _key_name(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for any pytree holding model-shaped leaves (params, optimizer moments, reference copy).

  Each leaf's path (``'/'``-joined, attribute hops such as ``.value`` dropped) is matched against
  ``medad_jax.sharding.PARAM_RULES``, which anchor at the end of the path: ``opt_state/0/mu/model/layers/0/
  self_attn/q_proj/lora_a`` is sharded like the adapter itself. Scalars and unmatched leaves are replicated.
  """
  from medad_jax.sharding import param_spec

  def one(path, x):
    names = [_key_name(k) for k in path if not isinstance(k, jax.tree_util.GetAttrKey) or
             _key_name(k) not in ('value', 'raw_value')]
    shape = getattr(x, 'shape', ())
    return NamedSharding(mesh, param_spec(tuple(names), shape, mesh) if len(shape) else P())

  return jax.tree_util.tree_map_with_path(one, tree)


# Batch keys whose batch axis is not 0, or that are not batch-major at all (None: replicated).
BATCH_DIMS = {'prompt_positions_3PT': 1, 'positions_3BT': 1, 'pixel_values_LC': None, 'vision_meta': None}


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
  """Shardings for a step batch: the batch axis (``BATCH_DIMS``, default 0; for a pytree value such as
  ``vision_meta_I``, of each leaf) over (data, fsdp) where it divides, else replicated."""
  from medad_jax.sharding import BATCH_AXES
  n = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))

  def one(bd, x):
    shape = np.shape(x)
    if bd is None or len(shape) <= bd or shape[bd] % n:
      return NamedSharding(mesh, P())
    spec = [None] * len(shape)
    spec[bd] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))

  return {k: jax.tree.map(lambda x, bd=BATCH_DIMS.get(k, 0): one(bd, x), v) for k, v in batch.items()}


def put_batch(batch: dict, mesh: Mesh | None) -> dict:
  """Host batch -> device arrays (sharded as :func:`batch_shardings` says when a mesh is given)."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, batch)
  sh = batch_shardings(batch, mesh)
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x) if not isinstance(x, jax.Array) else x, s),
                      batch, sh)


class JittedStep:
  """``(state, batch) -> (state, metrics)`` compiled once per batch structure, with shardings and donation.

  Without a mesh it is ``jax.jit(fn, donate_argnums=0)``. With a mesh, the state's shardings come from
  :func:`tree_shardings` and the batch's from :func:`batch_shardings`; metrics come back replicated.
  """

  def __init__(self, fn: Callable, mesh: Mesh | None = None, donate: bool = True):
    self.mesh, self._donate = mesh, donate
    self.traces = 0  # how many times the step was traced (= compiled); mu inner iterations must not add any

    def counted(state, batch):
      self.traces += 1
      return fn(state, batch)

    self._fn = counted
    self._compiled: dict = {}
    self._lock = threading.Lock()   # a program may be compiled ahead on another thread (train/precompile.py)

  def _get(self, state, batch):
    key = (jax.tree.structure(state), jax.tree.structure(batch))
    with self._lock:
      if key not in self._compiled:
        kw = dict(donate_argnums=0) if self._donate else {}
        if self.mesh is not None:
          ssh = tree_shardings(state, self.mesh)
          kw.update(in_shardings=(ssh, batch_shardings(batch, self.mesh)),
                    out_shardings=(ssh, NamedSharding(self.mesh, P())))
        self._compiled[key] = jax.jit(self._fn, **kw)
      return self._compiled[key]

  def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    return self._get(state, batch)(state, batch)

  def lower(self, state, batch):
    return self._get(state, batch).lower(state, batch)

  def export(self, state, batch, platforms: tuple[str, ...]):
    """``jax.export`` of the step for other platforms (e.g. ``('tpu',)`` or ``('cuda',)`` from a CPU host);
    ``state`` / ``batch`` may be ``jax.ShapeDtypeStruct`` trees."""
    from jax import export
    return export.export(self._get(state, batch), platforms=platforms)(state, batch)


def place_state(state: TrainState, mesh: Mesh) -> TrainState:
  """Puts every leaf of ``state`` onto its sharding (:func:`tree_shardings`)."""
  return jax.device_put(state, tree_shardings(state, mesh))
