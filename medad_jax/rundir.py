"""Run-directory integrity: a run directory holds one experiment, and re-launching it with another config is refused
before anything is written.

A run directory's ``config.json`` is the resolved config it was trained with, and every checkpoint's metadata
carries :func:`fingerprint` of that config. :func:`check` (called by ``medad_jax.launch`` before the directory is
created or touched) compares the config of a new launch with the recorded one:

* no recorded config (a new or empty directory): go;
* only :data:`RESUMABLE` fields differ (or nothing): go -- this is a resume, with e.g. new evaluation or logging
  settings;
* any other field differs: refused with :class:`RunDirError`, listing every differing key with both values, unless
  ``--config.resume=allow``: then the recorded config is kept as ``config.previous-<n>.json``, the differences are
  logged and the run continues from its checkpoints under the new config (the caller's explicit choice).

Fields that may change on resume (:data:`RESUMABLE`; a key or a whole block): where the run lives and how it is
named (``workdir``, ``name``, ``resume``), the evaluation (``eval``), logging (``log``), checkpoint bookkeeping
(``ckpt.keep``, ``ckpt.every_steps``, ``ckpt.async_save``), ``export``, the device layout (``mesh``: a resume on
another machine), the data cache location and reader threads (``data.cache_dir``, ``data.read_threads``; the
data's identity is its fingerprint, ``medad_jax.data.fingerprint``) and the judge's transport (``judge.url``,
``judge.timeout_s``, ``judge.max_retries``, ``judge.concurrency``, ``judge.deadline_s``, ``judge.api_key_env``).
Everything else changes what is trained (model, data, optimizer, rewards, judge backend, sampling, seeds).

Starting Con-GRPO from another run's SFT (``sft.checkpoint``) reads that run directory without checking its config:
it is how ablations share one SFT (the frozen-base fingerprint in the checkpoint still guards the weights).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from typing import Any, Mapping

log = logging.getLogger(__name__)

RESUME_CHOICES = ('check', 'allow')
RESUMABLE = ('workdir', 'name', 'resume', 'eval', 'log', 'ckpt.keep', 'ckpt.every_steps', 'ckpt.async_save',
             'export', 'mesh', 'data.cache_dir', 'data.read_threads', 'judge.url', 'judge.timeout_s',
             'judge.max_retries', 'judge.concurrency', 'judge.deadline_s', 'judge.api_key_env')
CONFIG_FILE = 'config.json'


class RunDirError(ValueError):
  """A run directory that the launch must not write into."""


def config_dict(config) -> dict:
  """The config as plain JSON data (what ``config.json`` holds)."""
  if isinstance(config, Mapping) and not hasattr(config, 'to_json_best_effort'):
    return json.loads(json.dumps(config, default=str))
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _flatten(d: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(d, Mapping):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: d}


def _resumable(key: str) -> bool:
  return any(key == r or key.startswith(r + '.') for r in RESUMABLE)


def fingerprint(config) -> str:
  """SHA-256 (16 hex digits) of the config's fields that decide what is trained (all but :data:`RESUMABLE`)."""
  flat = {k: v for k, v in _flatten(config_dict(config)).items() if not _resumable(k)}
  return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: Mapping, new: Mapping, *, include_resumable: bool = False) -> list[tuple[str, Any, Any]]:
  """``(key, old value, new value)`` for every dotted key that differs (absent = ``'<absent>'``)."""
  a, b = _flatten(config_dict(old)), _flatten(config_dict(new))
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, '<absent>'), b.get(k, '<absent>')
    if va != vb and (include_resumable or not _resumable(k)):
      out.append((k, va, vb))
  return out


def _checkpoint_fingerprints(workdir: str) -> dict[str, str]:
  """``{checkpoint path: config fingerprint}`` from the checkpoints' metadata (orbax ``meta/metadata`` JSON)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'checkpoints', '*', '*', 'meta', 'metadata'))):
    try:
      with open(path) as f:
        fp = json.load(f).get('config_fingerprint')
    except (OSError, ValueError, AttributeError):
      continue  # an unreadable checkpoint is the restore's business (it falls back to an older step)
    if fp:
      out[os.path.dirname(os.path.dirname(path))] = fp
  return out


def _show(v: Any) -> str:
  s = json.dumps(v)
  return s if len(s) <= 60 else s[:57] + '...'


def _is_first_process() -> bool:
  import jax  # the launcher has initialised jax.distributed by now (a single process: index 0)
  return jax.process_index() == 0


def check(config, workdir: str | None) -> None:
  """Refuses (``RunDirError``) to launch ``config`` into ``workdir`` when it holds a run with another config; see
  the module docstring. Writes nothing unless ``config.resume == 'allow'`` accepts a changed config."""
  resume = config.get('resume', 'check') if hasattr(config, 'get') else 'check'
  if resume not in RESUME_CHOICES:
    raise RunDirError(f'config.resume = {resume!r}: expected one of {RESUME_CHOICES}')
  if not workdir or not os.path.isdir(workdir):
    return
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except ValueError as e:
      raise RunDirError(f'{path} is not valid JSON ({e}); this run directory cannot be checked: choose another '
                        '--workdir or repair the file') from None
    diffs = differences(old, config)
  else:
    stale = {p: fp for p, fp in _checkpoint_fingerprints(workdir).items() if fp != fingerprint(config)}
    if not stale:
      return
    diffs = [('<config fingerprint>', sorted(set(stale.values())), fingerprint(config))]
    log.warning('%s has no %s; its checkpoints %s were written under another config', workdir, CONFIG_FILE,
                sorted(stale))
  if not diffs:
    return
  listing = '; '.join(f'{k}: {_show(a)} -> {_show(b)}' for k, a, b in diffs)
  if resume == 'allow':
    if _is_first_process() and os.path.exists(path):  # several hosts share the directory: one archives
      n = 1
      while os.path.exists(os.path.join(workdir, f'config.previous-{n}.json')):
        n += 1
      os.replace(path, os.path.join(workdir, f'config.previous-{n}.json'))
    log.warning('%s: continuing under a changed config (--config.resume=allow); %d key(s) differ: %s', workdir,
                len(diffs), listing)
    return
  raise RunDirError(
      f'run directory {workdir} holds a run with another config; {len(diffs)} key(s) differ (recorded -> now): '
      f'{listing}. Relaunch with the recorded values, choose a new --workdir, or pass --config.resume=allow to '
      'continue these checkpoints under the new config (fields that may change on resume: '
      f'{", ".join(RESUMABLE)})')


def keep_stage_times(workdir: str, seconds: dict[str, float]) -> dict[str, float]:
  """``seconds`` (this launch's stage wall times) with the earlier ``summary.json``'s times of the stages this launch
  did not run (a resumed, finished run restores its stages instead of training them: their times stay on record)."""
  path = os.path.join(workdir, 'summary.json')
  try:
    with open(path) as f:
      before = json.load(f).get('seconds', {})
  except (OSError, ValueError, AttributeError):
    return dict(seconds)
  return {**{k: v for k, v in before.items() if k not in seconds}, **seconds}
