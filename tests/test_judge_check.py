"""The served judge is checked before any training (``medad_jax.judge.remote.check_server``, called by the
launcher): health, the served model's name, one tiny scoring request; failures name the URL, what answered and
what to do, within seconds."""

import os
import subprocess
import sys
import time

import pytest

from medad_jax import launch
from medad_jax.judge import JudgeConfig
from medad_jax.judge.base import JudgeCheckError
from medad_jax.testing.fake_server import FakeSGLangServer
from medad_jax.judge.remote import check_server
from medad_jax.testing.multiprocess import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def server():
  with FakeSGLangServer() as s:
    yield s


def test_healthy_server_passes_with_its_model_and_a_verdict(server):
  out = check_server(JudgeConfig(backend='sglang', url=server.url), timeout_s=5)
  assert out['models'] == ['judge-model'] and out['verdict'] == 'C'   # the probe's thought concludes C
  # the probe went through the configured form: one /generate with the letter constraint
  gen = [s for s in server.seen if s.path == '/generate']
  assert len(gen) == 1 and gen[0].body['sampling_params']['regex']
  assert check_server(JudgeConfig(backend='sglang', url=server.url, model='judge-model'), timeout_s=5)


def test_other_model_name_is_a_clear_error(server):
  with pytest.raises(JudgeCheckError) as e:
    check_server(JudgeConfig(backend='sglang', url=server.url, model='Qwen2.5-7B-Instruct'), timeout_s=5)
  msg = str(e.value)
  assert server.url in msg and "['judge-model']" in msg and "'Qwen2.5-7B-Instruct'" in msg
  assert '--config.judge.model=judge-model' in msg
  assert not [s for s in server.seen if s.path == '/generate']   # stopped before scoring anything


def test_unhealthy_and_slow_servers_fail_fast_naming_the_url():
  with FakeSGLangServer(unhealthy=True) as s:
    with pytest.raises(JudgeCheckError, match=r'GET /health answered HTTP 503') as e:
      check_server(JudgeConfig(backend='sglang', url=s.url), timeout_s=2)
    assert s.url in str(e.value) and '--config.judge.check=False' in str(e.value)
  with FakeSGLangServer(delay_s=5.0) as s:
    t0 = time.monotonic()
    with pytest.raises(JudgeCheckError, match='no verdict within 1 s') as e:
      check_server(JudgeConfig(backend='sglang', url=s.url), timeout_s=1)
    assert time.monotonic() - t0 < 4 and s.url in str(e.value)


def test_launcher_exits_nonzero_within_seconds_when_the_judge_is_down(tmp_path):
  url = f'http://127.0.0.1:{free_port()}'   # nothing listens there
  workdir = tmp_path / 'run'
  env = {k: v for k, v in os.environ.items() if not k.startswith('MEDAD_')}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  t0 = time.monotonic()
  p = subprocess.run([sys.executable, '-m', 'medad_jax.launch', '--config=congrpo', f'--workdir={workdir}',
                      '--config.judge.backend=sglang', f'--config.judge.url={url}',
                      f'--config.data.cache_dir={tmp_path / "cache"}'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  took = time.monotonic() - t0
  assert p.returncode == 3, p.stderr[-2000:]
  assert took < 10, took
  assert url in p.stderr and 'cannot connect' in p.stderr and 'launch/judge_sglang.sh' in p.stderr
  assert 'Traceback' not in p.stderr and '[sft]' not in p.stderr and 'sft:' not in p.stderr
  assert not workdir.exists()   # nothing started: no run directory, no data, no SFT


def test_launcher_names_the_served_model_on_a_mismatch_and_check_false_skips(server, tmp_path):
  args = ['launch', '--config=congrpo', f'--workdir={tmp_path / "run"}', '--config.judge.backend=sglang',
          f'--config.judge.url={server.url}', '--config.judge.model=medad-judge']
  with pytest.raises(JudgeCheckError, match="serves model \\['judge-model'\\] but config.judge.model is "
                                            "'medad-judge'"):
    launch.main(args)
  assert not (tmp_path / 'run').exists()
  config, _ = launch.parse(args + ['--config.judge.check=False'])
  n = len(server.seen)
  launch.check_judge(config)   # skipped: no request at all
  assert len(server.seen) == n


def test_paper_scale_evaluation_decodes_as_far_as_the_rollouts():
  from configs import common
  for name in ('congrpo:paper', 'eval:paper', 'sft:paper'):
    c = common.load(name)
    if 'sampling' in c:
      assert c.eval.max_new_tokens == c.sampling.max_new_tokens == common.PAPER_MAX_NEW_TOKENS, name
    else:
      assert c.eval.max_new_tokens == common.PAPER_MAX_NEW_TOKENS, name
