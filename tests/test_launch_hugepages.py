"""The launcher's huge-page malloc tunable (``launch.huge_page_env``): when it applies, that the launcher re-executes
itself with it, and that it takes the page faults of large buffers away."""

import os
import platform
import subprocess
import sys

import pytest

from medad_jax import launch

TUNABLE = launch.HUGEPAGE_TUNABLE


@pytest.mark.parametrize('environ, libc, want', [
    ({}, ('glibc', '2.36'), TUNABLE),
    ({}, ('glibc', '2.35'), TUNABLE),
    ({'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0'}, ('glibc', '2.39'),
     'glibc.malloc.tcache_count=0:' + TUNABLE),
    ({}, ('glibc', '2.34'), None),                              # no such tunable before 2.35
    ({}, ('', ''), None),                                       # musl and others
    ({}, ('glibc', 'x.y'), None),
    ({'MEDAD_JAX_HUGEPAGES': '0'}, ('glibc', '2.36'), None),    # opted out
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, ('glibc', '2.36'), None),  # the user's own choice stands
    ({'GLIBC_TUNABLES': TUNABLE}, ('glibc', '2.36'), None),     # already re-executed
])
def test_huge_page_env(environ, libc, want):
  env = launch.huge_page_env(dict(environ, KEEP='1'), libc)
  assert (env if env is None else env['GLIBC_TUNABLES']) == want
  assert env is None or env['KEEP'] == '1'


def _glibc_new_enough() -> bool:
  return launch.huge_page_env({}, platform.libc_ver()) is not None and platform.system() == 'Linux'


needs_glibc = pytest.mark.skipif(not _glibc_new_enough(), reason=f'needs Linux with glibc >= 2.35, this is '
                                 f'{platform.system()} {platform.libc_ver()}')


@needs_glibc
@pytest.mark.parametrize('extra, want', [
    ({}, repr(TUNABLE)),
    ({'MEDAD_JAX_HUGEPAGES': '0'}, "''"),
    ({'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=7'}, repr('glibc.malloc.tcache_count=7:' + TUNABLE)),
])
@pytest.mark.parametrize('command, rc, reached', [
    (['medad_jax.launch', '--config=no_such_config'], 2, "config 'no_such_config': no file"),
    (['medad_jax.sweep', '--help'], 0, 'usage:'),
])
def test_the_entry_points_reexecute_themselves_with_the_tunable(extra, want, command, rc, reached):
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'MEDAD_JAX_HUGEPAGES')}
  p = subprocess.run([sys.executable, '-m', *command], env=dict(env, **extra), capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == rc, p.stderr
  assert f'malloc: GLIBC_TUNABLES={want} ' in p.stderr, p.stderr
  assert p.stderr.count('malloc: GLIBC_TUNABLES=') == 1   # logged once: the re-execution happens before any work
  assert reached in p.stdout + p.stderr                   # and the command line reached the new process


# A process that mallocs and writes a 256 MiB buffer (libc's malloc, as XLA:CPU's allocations; not numpy, which
# advises huge pages on its own large arrays) and prints its minor page faults.
_TOUCH = ('import ctypes, resource; libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; '
          'n = 256 << 20; p = libc.malloc(ctypes.c_size_t(n)); ctypes.memset(p, 1, n); '
          'print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)')


def _thp_mode() -> str:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return f.read().split('[')[1].split(']')[0]
  except (OSError, IndexError):
    return 'unknown'


@needs_glibc
@pytest.mark.skipif(_thp_mode() != 'madvise', reason=f'transparent huge pages are {_thp_mode()!r} here (the '
                    "tunable acts where they are 'madvise')")
def test_the_tunable_takes_the_page_faults_of_a_large_buffer_away():
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  plain = int(subprocess.run([sys.executable, '-c', _TOUCH], env=env, capture_output=True, text=True,
                             check=True).stdout)
  huge = int(subprocess.run([sys.executable, '-c', _TOUCH], env=dict(env, GLIBC_TUNABLES=TUNABLE),
                            capture_output=True, text=True, check=True).stdout)
  pages = (256 << 20) // 4096   # 65,536 pages of 4 KiB
  assert plain > pages, (plain, huge)
  assert plain - huge > pages // 2, (plain, huge)
