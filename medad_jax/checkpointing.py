"""Training checkpoints with orbax: save, keep the last N, resume after a crash or ``kill -9``, save on SIGTERM,
and export the merged policy as a Hugging Face directory.

What a checkpoint holds (``<workdir>/checkpoints/<step>/``, one orbax ``CheckpointManager`` step)::

    state/   the TrainState *without* its frozen base: trainable params (LoRA adapters, or every parameter for
             full fine-tuning), the optimizer state, the step counter, the RNG key, and the reference copy when
             there is one (orbax ``StandardSave``; restored straight onto the current shardings)
    data/    the input iterator's position, ``grain.DatasetIterator.get_state()`` (JSON)
    meta/    JSON: the stage, the frozen base's fingerprint and anything the trainer adds (epoch, counters)

The frozen base is not written (it is the checkpoint the run started from, with the SFT adapters merged into it
for Con-GRPO): the trainer rebuilds it the same way on resume, and the stored fingerprint (per-leaf float64 sums)
makes a mismatch fail loudly instead of resuming onto different weights. The exception: a base that no config
rebuilds -- the miniature's, whose vision tower the warm-up stage trained before SFT (``train/vision_warmup.py``)
and which SFT of the decoder then keeps frozen. A ``Checkpointer(save_frozen=True)`` writes the frozen base into
``state/`` too (meta ``frozen_saved``), and any restore of such a step puts it back, whatever the caller rebuilt
(a resumed SFT, ``sft.checkpoint=<run dir>``, the evaluation of a finished run, on any machine).

Crash safety: orbax writes each step into a temporary directory and renames it when complete, so a ``kill -9``
during a save leaves the previous steps intact and :meth:`Checkpointer.restore_latest` ignores the partial one.
A complete step that no longer restores (a truncated array file or ``_METADATA``, a disk error) makes
:meth:`Checkpointer.restore_latest` fall back to the newest step that restores cleanly, logging which step failed
and why. The unreadable step is never deleted: when training reaches its step number again, it is renamed to
``<step>.unreadable-<n>`` (logged) and the new step is written in its place.
Saves are asynchronous by default (the next training step runs while the previous state is written).

Preemption: :class:`PreemptionGuard` turns SIGTERM into a flag. The loop checks ``guard.should_stop`` after each
step, saves (``force=True``), waits for the write and returns normally (exit code 0). Single-host only: on several
hosts every process must agree on the step (``orbax`` ``reached_preemption`` or a collective), which this module
does not do.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def frozen_fingerprint(frozen: Any) -> list[float]:
  """Per-leaf float64 sums of the frozen base (cheap, order-stable), to check a resume rebuilt the same base."""
  leaves = jax.tree.leaves(frozen)
  sums = jax.device_get([jax.numpy.sum(x.astype(jax.numpy.float32)) for x in leaves])
  return [float(np.float64(s)) for s in sums]


def _saved_part(state, frozen: bool = False):
  """The TrainState fields a checkpoint holds (everything but the frozen base, unless ``frozen``)."""
  part = {'params': state.params, 'opt_state': state.opt_state, 'step': state.step, 'rng': state.rng,
          'ref_params': state.ref_params}
  return {**part, 'frozen': state.frozen} if frozen else part


def _abstract(tree):
  """Shape/dtype/sharding targets for ``StandardRestore`` (restores onto the same shardings)."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class FrozenBaseMismatch(ValueError):
  """The frozen base differs from the one a checkpoint was trained on (every step of the run would say so)."""


def _short(e: BaseException, limit: int = 300) -> str:
  """One line of an exception (orbax / TensorStore errors run to many lines)."""
  text = ' '.join(str(e).split())
  text = text if len(text) <= limit else text[:limit - 3] + '...'
  return f'{type(e).__name__}: {text}'


class _SiblingReadErrors(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" dumps of a failed restore's sibling reads.

  When one array of a damaged step fails, orbax abandons the other reads of that step; each failed one is later
  reported by asyncio as a ~3,000-character TensorStore spec. The failure is already logged in one line by
  :meth:`Checkpointer.restore_latest`, so these copies are dropped: only that asyncio message, and only while
  ``restore_latest`` tries a step (every try, failed or not, ends with a ``gc.collect()`` under the filter).
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Task exception was never retrieved')


@contextlib.contextmanager
def _quiet_sibling_reads():
  logger, quiet = logging.getLogger('asyncio'), _SiblingReadErrors()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    gc.collect()  # the abandoned tasks are reported when collected: collect them here, under the filter
    logger.removeFilter(quiet)


class Checkpointer:
  """An orbax ``CheckpointManager`` for :class:`medad_jax.rl.update.TrainState` + data-iterator state.

  Args:
    directory: where the steps go (``<workdir>/checkpoints``).
    keep: keep the last ``keep`` steps (older ones are deleted once a newer save completes).
    every_steps: :meth:`maybe_save` saves when ``step % every_steps == 0``.
    async_save: write in a background thread (``wait`` / ``close`` join it).
    meta_defaults: added to every step's metadata (the run's config fingerprint, ``medad_jax.rundir``).
    save_frozen: write the frozen base too (a base no config rebuilds: the module docstring).
  """

  def __init__(self, directory: str, *, keep: int = 3, every_steps: int = 1, async_save: bool = True,
               meta_defaults: Mapping | None = None, save_frozen: bool = False):
    if keep < 1 or every_steps < 1:
      raise ValueError(f'Checkpointer: keep={keep} and every_steps={every_steps} must be >= 1')
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps
    self.save_frozen = save_frozen
    self.meta_defaults = dict(meta_defaults or {})
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=opts, item_names=('state', 'data', 'meta'))
    self.unreadable: dict[int, str] = {}  # step -> why it did not restore (restore_latest fell back past it)

  # ------------------------------------------------------------------------------------------------ saving

  def save(self, step: int, state, *, data_state: Mapping | None = None, meta: Mapping | None = None,
           force: bool = False) -> bool:
    """Saves ``state`` (frozen base excluded unless ``save_frozen``), the iterator state and metadata as checkpoint
    ``step``."""
    meta = {**self.meta_defaults, **(meta or {})}
    meta.setdefault('frozen_fingerprint', frozen_fingerprint(state.frozen))
    if self.save_frozen:
      meta['frozen_saved'] = True
    if int(step) in self.unreadable and int(step) in self._mngr.all_steps():
      self._set_aside(int(step))
    saved = self._mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(_saved_part(state, self.save_frozen)),
        data=ocp.args.JsonSave(dict(data_state) if data_state is not None else {}),
        meta=ocp.args.JsonSave(meta)), force=force)
    if saved:
      log.info('checkpoint: saving step %d to %s', step, self.directory)
    return saved

  def _set_aside(self, step: int) -> None:
    src = os.path.join(self.directory, str(step))
    n = 1
    while os.path.exists(f'{src}.unreadable-{n}'):
      n += 1
    os.replace(src, f'{src}.unreadable-{n}')
    self._mngr.reload()
    log.warning('checkpoint: step %d of %s did not restore (%s); kept as %s.unreadable-%d, writing the new step %d',
                step, self.directory, self.unreadable[step], src, n, step)

  def maybe_save(self, step: int, state, **kw) -> bool:
    """:meth:`save` when ``step`` is a multiple of ``every_steps``."""
    return self.save(step, state, **kw) if step % self.every_steps == 0 else False

  def wait(self):
    """Blocks until the pending asynchronous save is on disk."""
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()

  # ---------------------------------------------------------------------------------------------- restoring

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def restore(self, step: int, state, *, check_frozen: bool = True) -> tuple[Any, dict, dict]:
    """Checkpoint ``step`` onto the structure / shardings of ``state`` -> ``(state, data_state, meta)``.

    ``state`` is a freshly built TrainState (its other fields give the targets; its frozen base is kept, unless
    the step holds one: ``save_frozen``).
    """
    if step not in self._mngr.all_steps():
      raise FileNotFoundError(f'{self.directory}: no checkpoint for step {step}; available: {self.all_steps()}')
    # the metadata first: whether the step holds its frozen base decides the restore target
    has_frozen = bool((self._mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
                       or {}).get('frozen_saved'))
    target = _abstract(_saved_part(state, has_frozen))
    try:
      out = self._mngr.restore(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f'{self.directory}/{step}: the checkpoint does not match the current TrainState '
                       f'(different LoRA targets, optimizer or model?): {e}') from e
    meta = dict(out['meta'] or {})
    if check_frozen and 'frozen_fingerprint' in meta and not has_frozen:
      now = frozen_fingerprint(state.frozen)
      was = meta['frozen_fingerprint']
      if len(now) != len(was) or not np.allclose(now, was, rtol=1e-6, atol=1e-6):
        bad = [i for i, (a, b) in enumerate(zip(now, was)) if not np.isclose(a, b, rtol=1e-6, atol=1e-6)]
        raise FrozenBaseMismatch(f'{self.directory}/{step}: the frozen base weights differ from the ones this checkpoint was '
                         f'trained on ({len(now)} vs {len(was)} leaves; first differing leaf {bad[:1]}); rebuild '
                         'the base exactly as the run did (same model checkpoint and SFT adapters)')
    saved = out['state']
    new = state.replace(params=saved['params'], opt_state=saved['opt_state'], step=saved['step'],
                        rng=saved['rng'], ref_params=saved['ref_params'])
    if has_frozen:
      new = new.replace(frozen=saved['frozen'])
    log.info('checkpoint: restored step %d from %s', step, self.directory)
    return new, dict(out['data'] or {}), meta

  def restore_latest(self, state, **kw) -> tuple[Any, dict, dict] | None:
    """:meth:`restore` of the newest step that restores cleanly, or None when there is none (a fresh run).

    A step that fails (corrupt files, or not matching ``state``) is logged with the reason and skipped for the
    next older one; it stays on disk (see the module docstring). When every step fails, the newest step's error
    is raised, naming the others. A frozen-base mismatch is raised at once (it holds for every step).
    """
    failures: list[tuple[int, BaseException]] = []
    for step in sorted(self._mngr.all_steps(), reverse=True):
      try:
        with _quiet_sibling_reads():
          out = self.restore(step, state, **kw)
      except FrozenBaseMismatch:
        raise
      except Exception as e:  # noqa: BLE001 -- orbax / TensorStore raise many types for damaged files
        log.warning('checkpoint: step %d of %s does not restore (%s); trying the previous step', step,
                    self.directory, _short(e))
        failures.append((step, e))
        continue
      for bad, e in failures:
        self.unreadable[bad] = _short(e)
      if failures:
        log.warning('checkpoint: resumed from step %d of %s; newer step(s) %s did not restore and are kept on disk '
                    '(%s)', step, self.directory, [s for s, _ in failures], '; '.join(
                        f'step {s}: {_short(e)}' for s, e in failures))
      return out
    if failures:
      step, e = failures[0]
      older = f'; the older step(s) {[s for s, _ in failures[1:]]} failed too' if len(failures) > 1 else ''
      raise ValueError(f'{self.directory}: no checkpoint step restores: step {step}: {_short(e, 600)}{older}') from e
    return None


class PreemptionGuard:
  """Context manager: SIGTERM (and optionally SIGINT) sets ``should_stop`` instead of killing the process.

      with PreemptionGuard() as guard:
        for step in ...:
          state, m = update(state, batch)
          if guard.should_stop:
            ckpt.save(step, state, data_state=it.get_state(), force=True); ckpt.wait(); break

  The previous handlers are restored on exit. Signals can only be handled on the main thread.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.signals = signals
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}
    self.received: int | None = None

  def _handler(self, signum, frame):
    self.received = signum
    self._event.set()
    log.warning('received signal %d: saving a checkpoint and stopping after this step', signum)

  @property
  def should_stop(self) -> bool:
    return self._event.is_set()

  def __enter__(self) -> 'PreemptionGuard':
    for s in self.signals:
      self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous.clear()


def export_hf(graphdef, state, path: str, *, dtype: str | None = None) -> str:
  """Writes the current policy (LoRA adapters merged into the base kernels) as a Hugging Face Qwen2.5-VL
  directory (``config.json`` + safetensors) that transformers, SGLang or vLLM load."""
  from medad_jax.model.checkpoint import save_hf_checkpoint
  from medad_jax.rl.update import merge_model
  return save_hf_checkpoint(merge_model(graphdef, state), path, merge_lora=True, dtype=dtype)
