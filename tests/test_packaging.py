"""An installed medad_jax finds the fake SGLang server's captures (package data), not through the source tree."""

import os
import shutil
import subprocess
import sys


def test_installed_wheel_carries_the_sglang_captures(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  wheels, target, src = tmp_path / 'wheels', tmp_path / 'site', tmp_path / 'src'
  # a copy of the sources: setuptools writes build/ next to pyproject.toml
  shutil.copytree(os.path.join(repo, 'medad_jax'), src / 'medad_jax', ignore=shutil.ignore_patterns('__pycache__'))
  shutil.copy(os.path.join(repo, 'pyproject.toml'), src)
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', str(src), '--no-deps', '--no-build-isolation', '-q', '-w',
                  str(wheels)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
  whl = next(wheels.glob('medad_jax-*.whl'))
  subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target), str(whl)],
                 check=True, capture_output=True, timeout=300, cwd=tmp_path)
  code = ('from medad_jax.testing import fake_server as f; d = f.default_fixtures_dir(); '
          'print(d); print(len(f.load_fixtures()))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**os.environ, 'PYTHONPATH': str(target)})
  assert out.returncode == 0, out.stderr
  where, n = out.stdout.split()
  assert where.startswith(str(target)) and int(n) >= 10
