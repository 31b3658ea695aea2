"""What identifies a MedAD directory's contents, so that a cached build is reused only for the same data.

``source_fingerprint(root)`` hashes (SHA-256):

* the directory's identity: its real path (symlinks resolved), so another directory with equal contents is a
  separate build (it may be changed independently later);
* every ``*.jsonl`` annotation file directly under ``root``: its name and its full contents (a few MB even for
  MedAD-38K, so hashing them is cheap and catches an edit that keeps the size and the modification time);
* every other file below ``root`` (images, recursively, following symlinked directories once): its relative
  path, size and modification time in nanoseconds. Image contents are not hashed (tens of GB for a real
  release): replacing an image by one of the same size with its modification time restored would go unnoticed.

Images referenced by an absolute path outside ``root`` are identified only through the JSONL text naming them.
Any change to this scheme bumps :data:`SCHEME`, so older builds are never taken for newer ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

SCHEME = 'medad-fp-v1'


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  digest: str      # hex SHA-256
  root: str        # the real path that was hashed
  jsonl_files: int
  other_files: int
  bytes: int

  @property
  def short(self) -> str:
    return self.digest[:16]

  def describe(self) -> str:
    return (f'{self.root}: {self.jsonl_files} JSONL file(s), {self.other_files} other file(s), '
            f'{self.bytes / 1e6:.1f} MB, fingerprint {self.short}')


def source_fingerprint(root: str, *, extra: str = '') -> Fingerprint:
  """The fingerprint of directory ``root`` (see the module docstring); ``extra`` is hashed too (the settings
  that change what a build of the directory contains)."""
  real = os.path.realpath(root)
  if not os.path.isdir(real):
    raise FileNotFoundError(f'MedAD directory {root!r} does not exist')
  h = hashlib.sha256()
  h.update(f'{SCHEME}\0{real}\0{extra}\0'.encode())
  n_jsonl = n_other = total = 0
  seen_dirs = set()
  for dirpath, dirnames, filenames in os.walk(real, followlinks=True):
    key = os.path.realpath(dirpath)
    if key in seen_dirs:  # a symlink cycle or a directory reached twice: count it once
      dirnames[:] = []
      continue
    seen_dirs.add(key)
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      rel = os.path.relpath(path, real)
      try:
        st = os.stat(path)
      except OSError:  # a dangling symlink: its name still counts
        h.update(f'{rel}\0dangling\0'.encode())
        n_other += 1
        continue
      total += st.st_size
      if dirpath == real and name.endswith('.jsonl'):
        fh = hashlib.sha256()
        with open(path, 'rb') as f:
          for chunk in iter(lambda: f.read(1 << 20), b''):
            fh.update(chunk)
        h.update(f'{rel}\0jsonl\0{fh.hexdigest()}\0'.encode())
        n_jsonl += 1
      else:
        h.update(f'{rel}\0{st.st_size}\0{st.st_mtime_ns}\0'.encode())
        n_other += 1
  return Fingerprint(h.hexdigest(), real, n_jsonl, n_other, total)
