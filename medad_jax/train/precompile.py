"""Compiling the next stage's programs on a background thread while the current stage computes.

A stage's first steps each wait for XLA to compile a program: in the embedded default run SFT compiles one step
program per length bucket (five, 2.8-4.2 s each on 2 cores), in the middle of its first steps. When a stage before
it runs long (the vision warm-up: thousands of ~25 ms steps), those compilations can run beside it instead:
``jitted.lower(*abstract_args).compile()`` on another thread fills the same in-memory cache that the later call
``jitted(*args)`` reads, so the stage finds its programs ready and computes exactly what it would have computed
(the same programs, compiled earlier).

    pre = Precompiler('sft')
    pre.submit('step T=128', step_fn.lower, abstract(state), abstract(batch))   # returns at once
    ... the warm-up runs ...
    pre.join()   # before the first SFT step: waits for what is left, logs what was compiled and how long it took

Only shapes known ahead are compiled; a batch of another shape compiles when it comes, as without this module. A
compilation that fails here is logged and left to the stage, which compiles that program itself (and raises there
if it must). JAX traces and compiles thread-safely. The compiler competes for the cores with the running stage: on
2 cores the net gain is a few seconds (WORKSPACE.md "The embedded default run"); it is larger where the running
stage leaves cores idle.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any, Callable

import jax

log = logging.getLogger(__name__)


def abstract(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves with each array's shape, dtype, weak type and, for a committed (placed)
  array, its sharding: the signature a later call with these arrays looks up."""

  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=x.weak_type,
                                  sharding=x.sharding if x.committed else None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)   # a host (numpy) array: placed on the default device

  return jax.tree.map(one, tree)


class Precompiler:
  """One background thread that lowers and compiles submitted programs, in order (see the module docstring)."""

  def __init__(self, stage: str):
    self.stage = stage
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f'precompile-{stage}')
    self._jobs: list[tuple[str, concurrent.futures.Future]] = []

  def submit(self, name: str, lower: Callable[..., Any], *args, **kwargs) -> None:
    """Compiles ``lower(*args, **kwargs)`` (a ``jax.jit(...).lower`` or ``JittedStep.lower``) in the background."""

    def job():
      t = time.perf_counter()
      lower(*args, **kwargs).compile()
      return time.perf_counter() - t

    self._jobs.append((name, self._pool.submit(job)))

  def join(self) -> dict[str, float]:
    """Waits for every submitted program; -> ``{name: seconds}`` of those compiled (failures are logged)."""
    t = time.perf_counter()
    done = {}
    for name, fut in self._jobs:
      try:
        done[name] = fut.result()
      except Exception as e:   # noqa: BLE001 -- the stage compiles this program itself when it needs it
        log.warning('%s: compiling %s ahead failed (%s: %s); the stage compiles it when it needs it', self.stage,
                    name, type(e).__name__, e)
    self._pool.shutdown(wait=True)
    waited = time.perf_counter() - t
    if done:
      log.info('%s: %d program(s) compiled ahead in %.1f s (%s); waited %.1f s for them', self.stage, len(done),
               sum(done.values()), ', '.join(done), waited)
    self._jobs = []
    return done
