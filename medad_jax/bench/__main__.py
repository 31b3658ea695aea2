"""``python -m medad_jax.bench <name> [flags]``: runs one benchmark (``--help`` after the name for its flags)."""

import sys

from medad_jax import bench


def main(argv: list[str]) -> int:
  if not argv or argv[0] in ('-h', '--help'):
    sys.stdout.write(f'usage: python -m medad_jax.bench <name> [flags]\nbenchmarks: {", ".join(bench.available())}\n')
    return 0 if argv else 2
  return bench.run(argv[0], argv[1:])


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
