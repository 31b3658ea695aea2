"""Run directories, metrics logging (TensorBoard without TensorFlow + JSONL), the progress line and the NaN guard.

Run directory (``--workdir``, default a fresh ``runs/<name>-<YYYYmmdd-HHMMSS>``)::

    <workdir>/
      config.json          the resolved experiment config (after overrides)
      metrics.jsonl        one JSON object per logged step: {"stage", "step", "time", <metric>: float, ...}
      tb/                  TensorBoard event files (tensorboardX; tags "<stage>/<metric>")
      checkpoints/         orbax CheckpointManager directory (see medad_jax/checkpointing.py)

Metrics stay on device until they are logged, and then one step late: :meth:`MetricsLogger.log` keeps this step's
device arrays and writes the *previous* step's, whose computation has finished by the time the next step was
dispatched, so pulling them does not stall the accelerator (nanodo / big_vision habit). :meth:`flush` writes the
last one. Every written value is checked: a NaN or inf stops the run with :class:`NonFiniteMetricError` naming
the stage, step and keys (the offending record is still written first, for the post-mortem).
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import math
import os
import time
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)

# Shown in the progress line, in this order, when present (everything is written to JSONL / TensorBoard).
PROGRESS_KEYS = ('loss', 'nll', 'token_accuracy', 'reward_mean', 'reward_fmt', 'reward_acc', 'reward_con', 'kl',
                 'clip_frac_high', 'clip_frac_low', 'entropy', 'grad_norm', 'accuracy')
_SHORT = {'reward_mean': 'reward', 'reward_fmt': 'fmt', 'reward_acc': 'acc', 'reward_con': 'con',
          'token_accuracy': 'tok_acc', 'clip_frac_high': 'clip_hi', 'clip_frac_low': 'clip_lo',
          'grad_norm': 'gnorm'}


class NonFiniteMetricError(FloatingPointError):
  """A logged metric was NaN or inf."""


def make_workdir(name: str, root: str = 'runs', workdir: str | None = None) -> str:
  """``workdir`` if given (created if needed, reused to resume), else a fresh ``<root>/<name>-<time>``."""
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    return workdir
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  path = os.path.join(root, f'{name}-{stamp}')
  n = 1
  while os.path.exists(path):
    n += 1
    path = os.path.join(root, f'{name}-{stamp}-{n}')
  os.makedirs(path)
  return path


def save_config(workdir: str, config) -> str:
  """Writes the resolved config as ``config.json`` (``ml_collections`` JSON, readable with ``json.load``)."""
  path = os.path.join(workdir, 'config.json')
  text = config.to_json_best_effort(indent=2, sort_keys=True) if hasattr(config, 'to_json_best_effort') else (
      json.dumps(config, indent=2, sort_keys=True, default=str))
  with open(path, 'w') as f:
    f.write(text)
  return path


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Device or numpy scalars -> Python floats (one ``device_get`` for the whole dict)."""
  import jax
  vals = jax.device_get(dict(metrics))
  out = {}
  for k, v in vals.items():
    a = np.asarray(v)
    if a.size != 1:
      raise ValueError(f'metric {k!r} has shape {a.shape}; only scalars are logged')
    out[k] = float(a.reshape(()))
  return out


def check_finite(stage: str, step: int, scalars: Mapping[str, float]) -> None:
  bad = sorted(k for k, v in scalars.items() if not math.isfinite(v))
  if bad:
    raise NonFiniteMetricError(f'{stage} step {step}: non-finite metrics ' +
                               ', '.join(f'{k}={scalars[k]}' for k in bad) +
                               ' (stopping; the last checkpoint holds the state before the divergence)')


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}'


RATE_WINDOW = 50   # writes over which the progress line's it/s (and so its ETA) is measured


def progress_line(stage: str, step: int, total: int | None, scalars: Mapping[str, float], rate: float | None
                  ) -> str:
  """``[congrpo] step 12/40 30% | reward 0.521 fmt 0.900 acc 0.400 con 0.600 | kl 0.0031 | 1.30 it/s | ETA 0:00:21``."""
  head = f'[{stage}] step {step}' + (f'/{total} {100.0 * step / total:.0f}%' if total else '')
  parts = [f'{_SHORT.get(k, k)} {scalars[k]:.4g}' for k in PROGRESS_KEYS if k in scalars]
  tail = []
  if rate:
    tail.append(f'{rate:.3g} it/s')
    if total:
      tail.append(f'ETA {format_duration((total - step) / rate)}')
  return ' | '.join([head] + ([' '.join(parts)] if parts else []) + tail)


class MetricsLogger:
  """JSONL + TensorBoard writer with lagged device pulls, a NaN guard and a progress line (module docstring).

  Usage in a trainer loop::

      logger = MetricsLogger(workdir, total_steps={'sft': n_sft, 'congrpo': n_rl})
      for step in ...:
        state, m = update(state, batch)
        logger.log('congrpo', step, {**m, **host_reward_parts})   # writes the previous step's metrics
      logger.flush()                                               # writes the last one
      logger.close()
  """

  def __init__(self, workdir: str, *, total_steps: Mapping[str, int] | None = None, tensorboard: bool = True,
               filename: str = 'metrics.jsonl', write: bool | None = None):
    # write: whether this process writes files (default: process 0 only). The others still pull every value and
    # run the NaN guard, so a divergence stops every process at the same step.
    if write is None:
      import jax
      write = jax.process_index() == 0
    self.writes = write
    self.workdir = workdir
    self.total_steps = dict(total_steps or {})
    self._jsonl = self._tb = None
    if write:
      os.makedirs(workdir, exist_ok=True)
      # Line-buffered: a crash or kill -9 loses at most the record being written.
      self._jsonl = open(os.path.join(workdir, filename), 'a', buffering=1)
    if tensorboard and write:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'), flush_secs=30)
    self._pending: tuple[str, int, Mapping[str, Any], float] | None = None
    # stage -> (step, time) of its recent writes, for it/s and the ETA: the rate over a window of writes, not the
    # last interval alone (steps are dispatched asynchronously and checkpoints pause the loop, so one interval's
    # rate swung 1.0 -> 7.7 it/s between consecutive SFT steps and the ETA 12 -> 2 minutes)
    self._recent: dict[str, collections.deque] = {}
    self.last_written: dict[str, float] | None = None

  def log(self, stage: str, step: int, metrics: Mapping[str, Any]) -> dict[str, float] | None:
    """Queues this step's metrics and writes the previous entry; returns what was written (host floats)."""
    prev, self._pending = self._pending, (stage, int(step), dict(metrics), time.time())
    return self._write(*prev) if prev is not None else None

  def flush(self) -> dict[str, float] | None:
    """Writes the queued entry (end of a stage, before a checkpoint or exit)."""
    prev, self._pending = self._pending, None
    out = self._write(*prev) if prev is not None else None
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()
    return out

  def write_now(self, stage: str, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Writes immediately (host-side summaries such as evaluation results); flushes anything queued first."""
    self.flush()
    out = self._write(stage, int(step), dict(metrics), time.time())
    if self._jsonl is not None:
      self._jsonl.flush()
    return out

  def _write(self, stage: str, step: int, metrics: Mapping[str, Any], t: float) -> dict[str, float]:
    scalars = to_host(metrics)
    rec = {'stage': stage, 'step': step, 'time': round(t, 3), **scalars}
    if self._jsonl is not None:
      self._jsonl.write(json.dumps(rec, allow_nan=True) + '\n')
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f'{stage}/{k}', v, global_step=step, walltime=t)
    if not self.writes:   # the progress line too is process 0's
      self.last_written = scalars
      check_finite(stage, step, scalars)
      return scalars
    recent = self._recent.setdefault(stage, collections.deque(maxlen=RATE_WINDOW + 1))
    if recent and step <= recent[-1][0]:
      recent.clear()   # the stage restarted (a resumed run, a new seed's evaluation)
    recent.append((step, t))
    s0, t0 = recent[0]
    rate = (step - s0) / (t - t0) if step > s0 and t > t0 else None
    log.info('%s', progress_line(stage, step, self.total_steps.get(stage), scalars, rate))
    self.last_written = scalars
    try:
      check_finite(stage, step, scalars)
    except NonFiniteMetricError:
      if self._jsonl is not None:
        self._jsonl.flush()
      raise
    return scalars

  def close(self):
    self.flush()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if exc[0] is None:
      self.close()
    else:  # do not pull pending device metrics while an exception unwinds; just close the files
      if self._jsonl is not None:
        self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  """The records of a ``metrics.jsonl`` (e.g. to plot a reward curve); a malformed line fails naming its number."""
  out = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}:{i}: not a JSON object ({e})') from e
  return out


def read_tensorboard_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` from the event files under ``logdir``, parsed without TensorFlow (TFRecord
  framing: length u64, crc u32, payload, crc u32; payload an ``Event`` protobuf)."""
  import struct

  from tensorboardX.proto import event_pb2

  out: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(os.listdir(logdir)):
    if 'tfevents' not in name:
      continue
    with open(os.path.join(logdir, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack('<Q', data[pos:pos + 8])
      payload = data[pos + 12:pos + 12 + n]
      if len(payload) < n:
        break  # a partially written last record
      pos += 12 + n + 4
      ev = event_pb2.Event.FromString(payload)
      for v in ev.summary.value:
        out.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
  return out
