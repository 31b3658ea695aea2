"""Benchmarks: ``python -m medad_jax.bench <name> [flags]`` runs ``medad_jax.bench.<name>.main(argv)``.

Each benchmark is a module of this package with a ``main(argv: list[str]) -> int`` that compares our code with a
peer implementation on the same weights and inputs and writes a table (``common.format_table``) to stdout.
"""

import importlib
import pkgutil

_NOT_BENCHMARKS = frozenset({'common'})


def available() -> list[str]:
  """Names of the benchmark modules in this package."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_')
                and m.name not in _NOT_BENCHMARKS)


def run(name: str, argv: list[str]) -> int:
  """Imports ``medad_jax.bench.<name>`` and runs its ``main(argv)``."""
  names = available()
  if name not in names:
    raise SystemExit(f'unknown benchmark {name!r}; available: {", ".join(names)}')
  module = importlib.import_module(f'{__name__}.{name}')
  if not callable(getattr(module, 'main', None)):
    raise SystemExit(f'medad_jax.bench.{name} has no main(argv) function')
  return int(module.main(argv) or 0)
