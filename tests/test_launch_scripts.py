"""launch/local.sh, tpu_pod.sh and slurm.sh: the printed command is exactly what runs (arguments passed through,
quoting kept), DRY_RUN=1 runs nothing, and missing settings fail with a clear message."""

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ['-m', 'medad_jax.launch']
EXTRA = ['--config.rl.beta=0.0', '--workdir=runs/a dir', "--config.name=it's"]


def run(script, args, env=None, check=True):
  e = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  e.update(env or {})
  proc = subprocess.run(['bash', str(ROOT / 'launch' / script), *args], capture_output=True, text=True, env=e,
                        cwd=ROOT, timeout=60)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def printed(proc) -> list[list[str]]:
  """The commands a script printed ("+ " lines), split back into argv lists."""
  return [shlex.split(l[2:]) for l in proc.stdout.splitlines() if l.startswith('+ ')]


def per_host(proc) -> list[str]:
  """The per-host command a multi-host script printed on stderr, split back into an argv list."""
  (line,) = [l for l in proc.stderr.splitlines() if 'per-host command' in l]
  return shlex.split(line.split('per-host command', 1)[1].split(': ', 1)[1])


@pytest.fixture()
def recorder(tmp_path):
  """An executable that writes its argv (as JSON) to a file: stands in for python3 / srun / gcloud."""
  out = tmp_path / 'argv.jsonl'
  exe = tmp_path / 'record'
  exe.write_text(f'#!/usr/bin/env bash\npython3 -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$@" '
                 f'>> {shlex.quote(str(out))}\n')
  exe.chmod(0o755)
  return exe, out


def test_local_prints_and_runs_the_launch_command(recorder):
  exe, out = recorder
  dry = run('local.sh', EXTRA, env={'DRY_RUN': '1', 'PYTHON': str(exe)})
  want = [str(exe), *LAUNCH, '--config=congrpo', *EXTRA]   # the CPU miniature by default
  assert printed(dry) == [want] and not out.exists()
  run('local.sh', ['--config=sft:paper', *EXTRA], env={'PYTHON': str(exe)})
  assert [json.loads(l) for l in out.read_text().splitlines()] == [[*LAUNCH, '--config=sft:paper', *EXTRA]]


def test_tpu_pod_runs_the_same_command_on_every_worker(recorder):
  exe, out = recorder
  args = ['--tpu', 'medad-v5e', '--zone', 'us-west4-a', '--project', 'proj', '--setup', '--',
          '--config=congrpo:paper', *EXTRA]
  proc = run('tpu_pod.sh', args, env={'DRY_RUN': '1', 'GCLOUD': str(exe)})
  launch, setup, remote = printed(proc)
  assert launch == ['python3', *LAUNCH, '--config=congrpo:paper', *EXTRA]
  assert per_host(proc) == launch   # what every worker runs, printed for the researcher
  ssh = [str(exe), 'compute', 'tpus', 'tpu-vm', 'ssh', 'medad-v5e', '--zone=us-west4-a', '--worker=all',
         '--project=proj']
  assert setup[:-1] == ssh and 'pip install -r requirements.txt' in setup[-1]
  assert remote[:-1] == ssh and remote[-1].startswith('--command=cd ~/medad_jax && ')
  assert shlex.split(remote[-1].split(' && ', 1)[1]) == launch
  assert not out.exists()
  run('tpu_pod.sh', args[:6] + args[7:], env={'GCLOUD': str(exe)})   # without --setup: one ssh, really run
  calls = [json.loads(l) for l in out.read_text().splitlines()]
  assert calls == [remote[1:]]


def test_slurm_runs_one_task_per_node_under_srun(recorder, tmp_path):
  exe, out = recorder
  args = ['--config=congrpo:paper', *EXTRA]
  proc = run('slurm.sh', args, env={'DRY_RUN': '1'})
  assert printed(proc) == [['srun', '--ntasks-per-node=1', '--kill-on-bad-exit=1', 'python3', *LAUNCH, *args]]
  assert per_host(proc) == ['python3', *LAUNCH, *args]
  (tmp_path / 'srun').symlink_to(exe)
  env = {'PATH': f'{tmp_path}:{os.environ["PATH"]}', 'SLURM_JOB_ID': '42', 'SLURM_JOB_NUM_NODES': '2'}
  run('slurm.sh', args, env=env)
  assert [json.loads(l) for l in out.read_text().splitlines()] == [
      ['--ntasks-per-node=1', '--kill-on-bad-exit=1', 'python3', *LAUNCH, *args]]
  # The sbatch header asks for one task per node.
  assert '#SBATCH --ntasks-per-node=1' in (ROOT / 'launch' / 'slurm.sh').read_text()


@pytest.mark.parametrize('script,args,message', [
    ('tpu_pod.sh', ['--zone', 'z', '--', '--config=c'], '--tpu and --zone are required'),
    ('tpu_pod.sh', ['--tpu', 't', '--zone', 'z'], 'give the experiment after --'),
    ('tpu_pod.sh', ['--bogus'], "unknown argument '--bogus'"),
    ('slurm.sh', [], 'give the experiment'),
    ('slurm.sh', ['--config=c'], 'not inside a Slurm job'),
])
def test_missing_settings_fail_clearly(script, args, message):
  proc = run(script, args, check=False)
  assert proc.returncode == 2 and message in proc.stderr
