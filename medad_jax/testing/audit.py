"""Records, per process, what a launcher process read and wrote (for the multi-process launcher tests).

Installed at interpreter start by a ``sitecustomize.py`` the test writes into a directory it puts first on
``PYTHONPATH`` (the launcher itself runs unchanged: ``python -m medad_jax.launch ...``)::

    from medad_jax.testing import audit; audit.install()

With ``MEDAD_AUDIT_LOG=<path>`` set, every event becomes one JSON line of ``<path>``:

* ``{"event": "write", "path": ...}`` -- a file opened for writing, created directory or rename target under
  ``MEDAD_AUDIT_ROOT`` (Python's audit hooks: ``open``, ``os.mkdir``, ``os.rename``; writes done in C++ such as
  tensorstore's checkpoint shards are not seen, which is fine for files outside ``checkpoints/``);
* ``{"event": "read", "stage": ..., "id": ...}`` -- a record read through ``distributed.process_dataset`` (the
  ``preprocess`` of every stage's input pipeline is wrapped).

With ``MEDAD_AUDIT_WELL_FORMED=1`` the completions are also decoded through :func:`well_formed`, so an untrained
model's rollouts carry rewards (and reach the judge).
"""

from __future__ import annotations

import json
import os
import sys
import threading

_lock = threading.Lock()


def _emit(log_path: str, rec: dict) -> None:
  line = json.dumps(rec) + '\n'
  with _lock:
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      os.write(fd, line.encode())
    finally:
      os.close(fd)


def install() -> None:
  log_path = os.environ.get('MEDAD_AUDIT_LOG')
  if not log_path:
    return
  root = os.path.abspath(os.environ.get('MEDAD_AUDIT_ROOT', '/'))
  busy = threading.local()

  def under_root(p) -> str | None:
    if isinstance(p, int) or p is None:
      return None
    try:
      a = os.path.abspath(os.fsdecode(p))
    except (TypeError, ValueError):
      return None
    return a if a == root or a.startswith(root + os.sep) else None

  def hook(event, args):
    if getattr(busy, 'on', False):
      return
    path = None
    if event == 'open' and args:
      mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
      writing = (isinstance(mode, str) and any(c in mode for c in 'wax+')) or (
          isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
      path = under_root(args[0]) if writing else None
    elif event == 'os.mkdir' and args:
      p = under_root(args[0])
      path = p if p is not None and not os.path.exists(p) else None
    elif event == 'os.rename' and len(args) > 1:
      path = under_root(args[1])
    if path is not None and path != os.path.abspath(log_path):
      busy.on = True
      try:
        _emit(log_path, {'event': 'write', 'path': path})
      finally:
        busy.on = False

  sys.addaudithook(hook)

  from medad_jax import distributed
  real = distributed.process_dataset

  def spied(source, *, name, preprocess, **kw):
    def recording(record):
      busy.on = True
      try:
        _emit(log_path, {'event': 'read', 'stage': name, 'id': record.id})
      finally:
        busy.on = False
      return preprocess(record)
    return real(source, name=name, preprocess=recording, **kw)

  distributed.process_dataset = spied
  if os.environ.get('MEDAD_AUDIT_WELL_FORMED') == '1':
    from medad_jax.train import pipeline
    pipeline.decode_completions = well_formed(pipeline.decode_completions)


def well_formed(real):
  """Wraps ``pipeline.decode_completions``: an untrained model writes no think/answer tags, so no rollout would
  earn a reward or reach the judge; each completion's decoded text becomes a deterministic well-formed one (the
  tokens, which the update trains on, are untouched) concluding the option its characters pick."""
  def decode(tokenizer, tokens_BN, lengths_B):
    out = []
    for text in real(tokenizer, tokens_BN, lengths_B):
      letter = 'ABCD'[sum(map(ord, text)) % 4]
      out.append(f'<think>{text!r} so the answer is ({letter}).</think><answer>{letter}</answer>')
    return out
  return decode


def read(log_path: str) -> list[dict]:
  """The events of one process's log (empty when it recorded none)."""
  if not os.path.exists(log_path):
    return []
  with open(log_path) as f:
    return [json.loads(line) for line in f if line.strip()]
