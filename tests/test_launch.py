"""End to end through ``medad_jax.launch.main`` on the tiny model: SFT -> Con-GRPO -> evaluation in about a minute,
the run-directory layout, the logs, the final table, bad configs failing before any work, and kill-and-resume of
the real trainers equal to an uninterrupted run, bit for bit (CPU)."""

import json
import logging
import os
import re

import numpy as np
import orbax.checkpoint as ocp
import pytest

from medad_jax import launch
from medad_jax.metrics import read_jsonl, read_tensorboard_scalars
from medad_jax.train import evaluate

# The embedded pipeline shrunk to seconds: tiny architecture, 20 synthetic images of 56 px, 4 SFT steps,
# 4 Con-GRPO steps of 2 prompts x G = 2, a 6-question evaluation. Two of the 8 fake devices, so the trainers'
# sharded path (data axis of 2) is the one exercised.
SMOKE = ['model.preset=tiny', 'data.synth_images=20', 'data.image_size=56', 'data.read_threads=1',
         'sft.batch_size=4', 'sft.max_steps=4', 'sft.optim.warmup_steps=0',
         'rl.prompts_per_step=2', 'rl.group_size=2', 'rl.max_steps=4',
         'sampling.max_new_tokens=12', 'eval.max_new_tokens=12', 'eval.max_examples=6', 'eval.batch_size=4',
         'ckpt.every_steps=2', 'ckpt.async_save=False', 'mesh.devices=2', 'export=True']


def launch_main(args):
  return launch.main(['launch', *args])


def smoke_args(workdir, cache, extra=()):
  return ['--config=congrpo', f'--workdir={workdir}', f'--config.data.cache_dir={cache}',
          *[f'--config.{o}' for o in SMOKE], *[f'--config.{o}' for o in extra]]


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('launch')
  workdir, cache = str(root / 'run'), str(root / 'cache')
  summary = launch_main(smoke_args(workdir, cache))
  return workdir, cache, summary


def test_eval_hf_scores_the_exported_policy_like_the_run(smoke_run, tmp_path, caplog):
  """``eval:hf`` on the run's exported HF directory (merged weights + tokenizer) reproduces the run's own
  evaluation of its final policy: same answers (greedy), so the same accuracies and format rate."""
  workdir, cache, _ = smoke_run
  out = str(tmp_path / 'eval')
  caplog.set_level(logging.INFO, logger='medad_jax')
  launch_main(['--config=eval:hf', f'--workdir={out}', f'--config.eval.hf_dir={workdir}/export',
               f'--config.data.cache_dir={cache}', '--config.data.synth_images=20', '--config.data.image_size=56',
               '--config.eval.max_examples=6', '--config.eval.batch_size=4', '--config.eval.max_new_tokens=12',
               '--config.judge.backend=rule', '--config.mesh.devices=1'])
  # progress with an ETA through the evaluation; the last batch has nothing left
  evals = [r.getMessage() for r in caplog.records if r.getMessage().startswith('[eval] export seed 0: batch')]
  assert [m.split(',')[0] for m in evals] == ['[eval] export seed 0: batch 1/2', '[eval] export seed 0: batch 2/2']
  assert re.search(r'\| ETA \d+:\d\d:\d\d$', evals[0]) and evals[-1].endswith('| ETA 0:00:00')
  ours = {p['name']: p for p in json.load(open(os.path.join(workdir, 'eval', 'results.json')))['policies']}
  prior, theirs, control = json.load(open(os.path.join(out, 'eval', 'results.json')))['policies']
  assert prior['name'] == evaluate.PRIOR_NAME and theirs['name'] == 'export' and theirs['num_questions'] == 6
  assert control['name'] == evaluate.control_name('export')
  # the same greedy policy on the same (shuffled) questions: its control row is the run's too
  for mine, other in ((ours['SFT + Con-GRPO'], theirs), (ours[evaluate.control_name('SFT + Con-GRPO')], control)):
    for k in evaluate.COLUMNS[:-1]:  # consistency differs by design: the judge is another model here
      assert other['mean'][k] == mine['mean'][k] or (np.isnan(other['mean'][k]) and np.isnan(mine['mean'][k])), k


def test_smoke_run_layout_logs_and_table(smoke_run):
  workdir, _, summary = smoke_run
  for f in ('config.json', 'metrics.jsonl', 'summary.json', 'eval/results.json', 'eval/table.md',
            'export/config.json', 'export/model.safetensors', 'export/tokenizer.json'):
    assert os.path.isfile(os.path.join(workdir, f)), f
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['congrpo', 'sft']
  # keep = 3 (default); steps 2 and 4 of each stage
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', 'sft'))) == ['2', '4']
  recs = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  sft = [r for r in recs if r['stage'] == 'sft']
  rl = [r for r in recs if r['stage'] == 'congrpo']
  assert [r['step'] for r in sft] == [1, 2, 3, 4] and [r['step'] for r in rl] == [1, 2, 3, 4]
  for k in ('loss', 'kl', 'clip_frac_low', 'clip_frac_high', 'ratio_mean', 'grad_norm', 'entropy', 'reward_mean',
            'reward_fmt', 'reward_acc', 'reward_con', 'zero_var_groups'):
    assert k in rl[0], k
  assert rl[0]['ratio_mean'] == pytest.approx(1.0, abs=1e-4)  # mu = 1: the update sees the sampler's policy
  # the local judge shares the device: it scores synchronously, the reference pass stays inside the update
  assert all(r['overlap_frac'] == 0 and 'device_seconds' not in r and r['judge_seconds'] >= 0 for r in rl)
  tb = read_tensorboard_scalars(os.path.join(workdir, 'tb'))
  assert len(tb['sft/loss']) == 4 and len(tb['congrpo/kl']) == 4
  res = json.load(open(os.path.join(workdir, 'eval', 'results.json')))
  final = 'SFT + Con-GRPO'
  assert [p['name'] for p in res['policies']] == [evaluate.PRIOR_NAME, 'SFT', final, evaluate.control_name(final)]
  for p in res['policies']:
    assert p['num_questions'] == 6
    for k in ('overall', 'format_rate', 'consistency_rate')[:1 if p['name'] == evaluate.PRIOR_NAME else 3]:
      assert 0.0 <= p['mean'][k] <= 1.0
  # every question's completion and scores, per policy: they add up to the table's figures
  dumps = {}
  for name, p in zip(('sft', 'sft_con-grpo', 'sft_con-grpo_images_shuffled_control'), res['policies'][1:]):
    rows = dumps[name] = read_jsonl(os.path.join(workdir, 'eval', 'completions', f'{name}-seed0.jsonl'))
    assert len(rows) == 6 and all(r['completion'] is not None and r['answer'] in 'ABCD' for r in rows)
    assert np.mean([r['acc'] for r in rows]) == pytest.approx(p['mean']['overall'])
    assert np.mean([r['con'] for r in rows]) == pytest.approx(p['mean']['consistency_rate'])
  # the control's rows are the same questions, each shown another of the evaluated images (named in the dump)
  own, shown = dumps['sft_con-grpo'], dumps['sft_con-grpo_images_shuffled_control']
  assert [r['id'] for r in own] == [r['id'] for r in shown]
  assert all(a['image_id'] != b['image_id'] for a, b in zip(own, shown))
  assert {r['image_id'] for r in shown} == {r['image_id'] for r in own}
  table = open(os.path.join(workdir, 'eval', 'table.md')).read()
  assert all(h in table for h in evaluate.HEADERS) and table == summary['table'] + ''  # what the summary reports
  s = json.load(open(os.path.join(workdir, 'summary.json')))
  assert set(s['seconds']) >= {'setup', 'vision_warmup', 'sft', 'congrpo', 'eval', 'total'}
  # stage 0 (on in the miniature): its steps with their total, then its training accuracy per task
  warm = [r for r in recs if r['stage'] == 'vision_warmup']
  assert warm and 'loss' in warm[0] and all(f'train_acc/{t}' in warm[-1] for t, _ in evaluate.TABLE1)


def _final_state(workdir, stage, step):
  path = os.path.join(workdir, 'checkpoints', stage, str(step), 'state')
  return ocp.PyTreeCheckpointer().restore(path)


class Crash(RuntimeError):
  pass


def test_kill_and_resume_equals_uninterrupted(smoke_run, tmp_path, monkeypatch):
  """A crash at SFT step 3 (after the step-2 checkpoint); the same command again crashes at Con-GRPO step 3; the
  third launch finishes. The final checkpoints of both stages equal the uninterrupted run's bit for bit (CPU is
  deterministic), so parameters, optimizer moments, step, RNG and data position all resumed exactly. With the
  miniature's warm-up on and its tower frozen in SFT: the resumed SFT does not repeat the warm-up, the warmed
  tower comes back from the checkpoint (``save_frozen``; before it did, this resume was refused)."""
  from medad_jax.metrics import MetricsLogger
  ref_dir, cache, _ = smoke_run
  workdir = str(tmp_path / 'run')
  args = smoke_args(workdir, cache, ['eval.enabled=False'])
  real_log = MetricsLogger.log

  def crash_at(stage):
    def log(self, st, step, metrics):
      if st == stage and step == 3:
        raise Crash(f'simulated crash in {st} at step {step}')
      return real_log(self, st, step, metrics)
    return log

  for stage in ('sft', 'congrpo'):
    monkeypatch.setattr(MetricsLogger, 'log', crash_at(stage))
    with pytest.raises(Crash, match=stage):
      launch_main(args)
  monkeypatch.setattr(MetricsLogger, 'log', real_log)
  launch_main(args)
  for st in ('sft', 'congrpo'):
    want = dict(_flatten(_final_state(ref_dir, st, 4)))
    got = dict(_flatten(_final_state(workdir, st, 4)))
    assert want.keys() == got.keys() and len(want) > 10
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f'{st} {k}')


def _flatten(tree, prefix=''):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f'{prefix}/{k}')
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _flatten(v, f'{prefix}/{i}')
  elif tree is not None:
    yield prefix, np.asarray(tree)


def test_unknown_key_and_bad_value_fail_before_any_work(tmp_path):
  workdir = str(tmp_path / 'never')
  with pytest.raises(launch.ConfigError, match="rl has no 'no_such_key'"):
    launch_main(['--config=congrpo', f'--workdir={workdir}', '--config.rl.no_such_key=1'])
  with pytest.raises(ValueError, match='rl.group_size'):
    launch_main(['--config=congrpo', f'--workdir={workdir}', '--config.rl.group_size=1'])
  assert not os.path.exists(workdir)


def test_image_control_over_one_image_fails_before_training(smoke_run, tmp_path):
  """3 evaluated questions are the 3 questions of one test image: the image-shuffled control has nothing to
  swap, and the launcher says so after the data is built, before any training step."""
  _, cache, _ = smoke_run
  workdir = tmp_path / 'run'
  with pytest.raises(launch.ConfigError, match=r'over 1 image id.*eval.max_examples=3.*eval.image_control=False'):
    launch_main(smoke_args(str(workdir), cache, ['eval.max_examples=3']))
  assert not (workdir / 'checkpoints').exists()


def test_paper_variant_names_every_missing_path(tmp_path):
  with pytest.raises(ValueError) as e:
    launch_main(['--config=congrpo:paper', f'--workdir={tmp_path / "never"}'])
  msg = str(e.value)
  assert 'config.model.checkpoint is not set' in msg and 'config.data.dir is not set' in msg
  assert '--config.' in msg and not os.path.exists(tmp_path / 'never')


def test_rl_from_a_finished_sft_run_gets_its_warmed_tower(smoke_run, tmp_path):
  """``--config.sft.checkpoint=<run dir>`` (how the seed sweep starts every RL variant) on a miniature run, whose
  frozen tower the warm-up trained: Con-GRPO starts from exactly that run's SFT policy -- its frozen base (the SFT
  weights merged, warmed tower included) equals the one the run itself trained Con-GRPO on, bit for bit."""
  ref_dir, cache, _ = smoke_run
  workdir = str(tmp_path / 'rl')
  launch_main(smoke_args(workdir, cache, [f'sft.checkpoint={ref_dir}', 'rl.max_steps=2', 'eval.enabled=False',
                                          'export=False']))
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', 'sft'))
  want = dict(_flatten(_final_state(ref_dir, 'congrpo', 2)['frozen']))
  got = dict(_flatten(_final_state(workdir, 'congrpo', 2)['frozen']))
  assert want.keys() == got.keys() and any('visual' in k for k in want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_rl_only_resumes_without_repeating_the_warm_up(smoke_run, tmp_path, monkeypatch):
  """RL-only (no SFT) of the miniature: its base is the random model with the warmed-up tower. A crash at Con-GRPO
  step 3; the relaunch does not run the warm-up again (the checkpoint holds that base) and ends bit for bit where
  an uninterrupted RL-only run ends."""
  from medad_jax.metrics import MetricsLogger
  from medad_jax.train import vision_warmup
  _, cache, _ = smoke_run
  ref, workdir = str(tmp_path / 'ref'), str(tmp_path / 'run')
  extra = ['eval.enabled=False', 'export=False', 'vision_warmup.epochs=2', 'vision_warmup.then_epochs=1']
  rl_only = lambda d: ['--config=congrpo:rl_only', *smoke_args(d, cache, extra)[1:]]  # noqa: E731
  launch_main(rl_only(ref))
  real_log, warmups = MetricsLogger.log, []

  def log(self, st, step, metrics):
    if st == 'congrpo' and step == 3:
      raise Crash('simulated crash in congrpo at step 3')
    return real_log(self, st, step, metrics)

  monkeypatch.setattr(MetricsLogger, 'log', log)
  with pytest.raises(Crash):
    launch_main(rl_only(workdir))
  monkeypatch.setattr(MetricsLogger, 'log', real_log)
  real_warm = vision_warmup.warm_up
  monkeypatch.setattr(vision_warmup, 'warm_up', lambda *a, **k: warmups.append(1) or real_warm(*a, **k))
  launch_main(rl_only(workdir))
  assert warmups == []
  want, got = dict(_flatten(_final_state(ref, 'congrpo', 4))), dict(_flatten(_final_state(workdir, 'congrpo', 4)))
  assert want.keys() == got.keys() and any('/frozen/' in k and 'visual' in k for k in want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
