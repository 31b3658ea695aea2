"""Start an SGLang judge server as a child process, wait for ``/health``, stop it on exit.

    with SGLangServer(SGLangLaunchConfig(model_path='Qwen/Qwen2.5-7B-Instruct', port=30000)) as srv:
      judge = make_judge(JudgeConfig(backend='sglang', url=srv.url))
      ...

SGLang is not a dependency of this package (it pins its own torch/CUDA stack). Install it on the GPU host that
serves the judge -- ``pip install "sglang[all]"`` in a separate environment, see ``launch/judge_sglang.sh`` -- and
point ``SGLangLaunchConfig.python`` at that environment's interpreter. The same shell script starts the server
from a job script when the trainer runs elsewhere.

The child runs in its own session (process group), so stopping it reaches the scheduler/detokenizer processes
SGLang forks; stop sends SIGTERM to that group, then SIGKILL after ``grace_s``.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import httpx

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SGLangLaunchConfig:
  """Arguments of ``python -m sglang.launch_server`` and of the health wait.

  Attributes:
    model_path: judge model (hub id or local directory); any Qwen2.5 / Qwen2.5-VL instruct model works, the
      judge reads text only.
    host, port: where the server listens (the judge URL is ``http://host:port``).
    extra_args: further launcher flags, e.g. ``('--tp', '2', '--mem-fraction-static', '0.8')``.
    startup_timeout_s: how long to wait for ``/health`` (model loading and CUDA-graph capture take minutes).
    poll_interval_s: time between health probes.
    python: interpreter of the environment where SGLang is installed.
  """
  model_path: str
  host: str = '127.0.0.1'
  port: int = 30000
  extra_args: tuple[str, ...] = ()
  startup_timeout_s: float = 900.0
  poll_interval_s: float = 1.0
  python: str = sys.executable


def launch_command(cfg: SGLangLaunchConfig) -> list[str]:
  """The SGLang launcher command line for ``cfg``."""
  return [cfg.python, '-m', 'sglang.launch_server', '--model-path', cfg.model_path, '--host', cfg.host,
          '--port', str(cfg.port), *cfg.extra_args]


class SGLangServer:
  """A judge server child process: :meth:`start` launches it and blocks until ``/health`` answers 200.

  ``command`` replaces the launcher command line (tests use a fake server script; a site may wrap SGLang in
  its own launcher). The child's output goes to ``log_path`` (a temporary file by default); the last lines are
  quoted in the error when the child dies or never becomes healthy.
  """

  def __init__(self, cfg: SGLangLaunchConfig, *, command: Sequence[str] | None = None, log_path: str | None = None,
               env: dict[str, str] | None = None, cwd: str | None = None):
    self.cfg = cfg
    self.command = list(command) if command is not None else launch_command(cfg)
    self.log_path = log_path
    self.env, self.cwd = env, cwd
    self.proc: subprocess.Popen | None = None
    self._log_file = None
    self._lock = threading.Lock()

  @property
  def url(self) -> str:
    return f'http://{self.cfg.host}:{self.cfg.port}'

  def log_tail(self, n: int = 20) -> str:
    if not self.log_path or not os.path.exists(self.log_path):
      return ''
    with open(self.log_path, errors='replace') as f:
      return ''.join(collections.deque(f, maxlen=n))

  def start(self) -> SGLangServer:
    """Launch the child and wait until healthy; on any failure the child is stopped before raising."""
    with self._lock:
      if self.proc is not None and self.proc.poll() is None:
        raise RuntimeError(f'judge server already running (pid {self.proc.pid})')
      if self.log_path is None:
        fd, self.log_path = tempfile.mkstemp(prefix='sglang-judge-', suffix='.log')
        os.close(fd)
      self._log_file = open(self.log_path, 'ab')  # noqa: SIM115 -- closed in stop()
      log.info('starting judge server: %s (log: %s)', ' '.join(self.command), self.log_path)
      self.proc = subprocess.Popen(self.command, stdout=self._log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env=self.env, cwd=self.cwd)
      atexit.register(self.stop)
    try:
      self.wait_until_healthy()
    except BaseException:
      self.stop()
      raise
    return self

  def wait_until_healthy(self) -> None:
    """Poll ``GET /health`` until 200; raise if the child exits or ``startup_timeout_s`` passes."""
    deadline = time.monotonic() + self.cfg.startup_timeout_s
    last = 'no answer yet'
    with httpx.Client(timeout=max(self.cfg.poll_interval_s, 1.0)) as client:
      while True:
        rc = self.proc.poll()
        if rc is not None:
          raise RuntimeError(f'judge server exited with code {rc} before {self.url}/health answered; '
                             f'command: {" ".join(self.command)}; last log lines ({self.log_path}):\n'
                             f'{self.log_tail()}')
        try:
          r = client.get(f'{self.url}/health')
          if r.status_code == 200:
            log.info('judge server healthy at %s (pid %d)', self.url, self.proc.pid)
            return
          last = f'HTTP {r.status_code}'
        except httpx.TransportError as e:
          last = f'{type(e).__name__}'
        if time.monotonic() > deadline:
          raise TimeoutError(f'judge server at {self.url} not healthy after {self.cfg.startup_timeout_s:g}s '
                             f'(last probe: {last}); last log lines ({self.log_path}):\n{self.log_tail()}')
        time.sleep(self.cfg.poll_interval_s)

  def stop(self, grace_s: float = 30.0) -> int | None:
    """SIGTERM the child's process group, SIGKILL it after ``grace_s``; returns the exit code (None if never
    started). Safe to call twice."""
    with self._lock:
      proc = self.proc
      if proc is None:
        return None
      if proc.poll() is None:
        log.info('stopping judge server (pid %d)', proc.pid)
        self._signal_group(proc, signal.SIGTERM)
        try:
          proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
          log.warning('judge server (pid %d) ignored SIGTERM for %.0fs; killing it', proc.pid, grace_s)
          self._signal_group(proc, signal.SIGKILL)
          proc.wait()
      if self._log_file is not None:
        self._log_file.close()
        self._log_file = None
      atexit.unregister(self.stop)
      return proc.returncode

  @staticmethod
  def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
      os.killpg(proc.pid, sig)  # the child leads its own session (start_new_session=True)
    except ProcessLookupError:
      pass

  def __enter__(self) -> SGLangServer:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def main(argv: list[str] | None = None) -> int:
  """``python -m medad_jax.judge.server --model-path M [--port P] [-- extra launcher args]``: serve until Ctrl-C."""
  ap = argparse.ArgumentParser(description='Start an SGLang judge server and keep it up until interrupted.')
  ap.add_argument('--model-path', required=True)
  ap.add_argument('--host', default='127.0.0.1')
  ap.add_argument('--port', type=int, default=30000)
  ap.add_argument('--startup-timeout', type=float, default=900.0)
  ap.add_argument('--python', default=sys.executable, help='interpreter of the SGLang environment')
  args, extra = ap.parse_known_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(message)s')
  cfg = SGLangLaunchConfig(model_path=args.model_path, host=args.host, port=args.port,
                           extra_args=tuple(a for a in extra if a != '--'), startup_timeout_s=args.startup_timeout,
                           python=args.python)
  with SGLangServer(cfg) as srv:
    log.info('judge ready at %s; Ctrl-C stops it', srv.url)
    try:
      while srv.proc.poll() is None:
        time.sleep(1.0)
    except KeyboardInterrupt:
      pass
  return 0


if __name__ == '__main__':
  sys.exit(main())
