"""Judge-server launcher (`medad_jax.judge.server` and `launch/judge_sglang.sh`) with real child processes: the
fake SGLang server script stands in for `python -m sglang.launch_server` (SGLang needs a CUDA host)."""

import os
import pathlib
import socket
import subprocess
import sys
import time

import httpx
import pytest

from medad_jax.judge import JudgeConfig, make_judge
from medad_jax.judge.server import SGLangLaunchConfig, SGLangServer, launch_command

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'launch' / 'judge_sglang.sh'
FAKE = [sys.executable, '-m', 'medad_jax.testing.fake_server']
QUESTION = 'Which organ is shown?\nA. Brain\nB. Liver\nC. Lung\nD. Skin'


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def env():
  return {**os.environ, 'PYTHONPATH': str(REPO)}


def refused(url: str) -> bool:
  try:
    httpx.get(f'{url}/health', timeout=1.0)
  except httpx.ConnectError:
    return True
  return False


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_launch_command():
  cfg = SGLangLaunchConfig(model_path='Qwen/Qwen2.5-7B-Instruct', host='0.0.0.0', port=31000,
                           extra_args=('--tp', '2'), python='/opt/sglang/bin/python')
  assert launch_command(cfg) == ['/opt/sglang/bin/python', '-m', 'sglang.launch_server', '--model-path',
                                 'Qwen/Qwen2.5-7B-Instruct', '--host', '0.0.0.0', '--port', '31000', '--tp', '2']


def test_start_waits_for_health_then_stop_ends_the_process(tmp_path):
  port = free_port()
  cfg = SGLangLaunchConfig(model_path='unused', port=port, startup_timeout_s=30, poll_interval_s=0.1)
  cmd = FAKE + ['--port', str(port), '--startup-delay', '0.7', '--model-path', 'unused']
  srv = SGLangServer(cfg, command=cmd, log_path=str(tmp_path / 'judge.log'), env=env(), cwd=str(REPO))
  t0 = time.monotonic()
  with srv:
    assert time.monotonic() - t0 >= 0.7  # start() blocked until the port opened and /health said 200
    assert httpx.get(f'{srv.url}/health', timeout=2).status_code == 200
    judge = make_judge(JudgeConfig(backend='sglang', url=srv.url, timeout_s=5))
    assert judge.judge([QUESTION], ['Portal triads: the liver.']).letters == ['B']
    judge.close()
    pid = srv.proc.pid
  assert srv.proc.returncode is not None and not pid_alive(pid)
  assert refused(srv.url)
  assert "ignoring launcher arguments ['--model-path', 'unused']" in (tmp_path / 'judge.log').read_text()
  assert srv.stop() == srv.proc.returncode  # stopping twice is harmless


def test_child_that_dies_is_reported_with_its_log(tmp_path):
  cfg = SGLangLaunchConfig(model_path='m', port=free_port(), startup_timeout_s=30, poll_interval_s=0.1)
  cmd = [sys.executable, '-c', 'import sys; print("CUDA out of memory (pretend)"); sys.exit(3)']
  srv = SGLangServer(cfg, command=cmd, log_path=str(tmp_path / 'judge.log'))
  with pytest.raises(RuntimeError, match=r'exited with code 3 before .*/health answered(.|\n)*CUDA out of memory'):
    srv.start()


def test_never_healthy_times_out_and_is_stopped(tmp_path):
  port = free_port()
  cfg = SGLangLaunchConfig(model_path='m', port=port, startup_timeout_s=1.0, poll_interval_s=0.1)
  srv = SGLangServer(cfg, command=FAKE + ['--port', str(port), '--unhealthy'], env=env(), cwd=str(REPO),
                     log_path=str(tmp_path / 'judge.log'))
  with pytest.raises(TimeoutError, match=r'not healthy after 1s \(last probe: (HTTP 503|ConnectError)\)'):
    srv.start()
  assert srv.proc.returncode is not None  # the launcher killed what it started


def test_shell_script_runs_a_command_against_the_healthy_judge_then_stops_it(tmp_path):
  port = free_port()
  pid_file = tmp_path / 'server.pid'
  probe = ('import os, sys, httpx; u = os.environ["MEDAD_SGLANG_URL"]; '
           'assert httpx.get(u + "/health").status_code == 200; sys.exit(7)')
  r = subprocess.run(
      ['bash', str(SCRIPT), '--model', 'unused', '--port', str(port), '--timeout', '30',
       '--extra', f'--pid-file {pid_file} --startup-delay 0.5', '--', sys.executable, '-c', probe],
      env={**env(), 'JUDGE_LAUNCH': ' '.join(FAKE), 'JUDGE_LOG': str(tmp_path / 'judge.log')},
      cwd=str(REPO), capture_output=True, text=True, timeout=60)
  assert r.returncode == 7, r.stderr  # the command's own status comes back
  assert f'judge healthy at http://127.0.0.1:{port}' in r.stderr
  pid = int(pid_file.read_text())
  deadline = time.monotonic() + 5
  while pid_alive(pid) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not pid_alive(pid)  # the judge was stopped on exit
  assert refused(f'http://127.0.0.1:{port}')


def test_shell_script_reports_a_dead_launcher(tmp_path):
  dying = tmp_path / 'dying_launcher.py'
  dying.write_text('import sys\nprint("no GPU found (pretend)")\nsys.exit(4)\n')
  r = subprocess.run(['bash', str(SCRIPT), '--model', 'unused', '--port', str(free_port()), '--', 'true'],
                     env={**env(), 'JUDGE_LAUNCH': f'{sys.executable} {dying}'},
                     cwd=str(REPO), capture_output=True, text=True, timeout=60)
  assert r.returncode == 1 and 'judge exited before becoming healthy' in r.stderr
  assert 'no GPU found (pretend)' in r.stderr  # the log tail is shown


def test_shell_script_requires_a_model():
  r = subprocess.run(['bash', str(SCRIPT)], capture_output=True, text=True, timeout=30)
  assert r.returncode == 2 and '--model is required' in r.stderr
