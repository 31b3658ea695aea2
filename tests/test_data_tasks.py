"""``data.tasks``: a run trains and evaluates on the named tasks only, with its own tokenizer cache entry."""

import pytest

from configs import common
from medad_jax.testing.configs import tiny_miniature
from medad_jax.train import pipeline as pl


def _config(tmp_path, tasks):
  return tiny_miniature(str(tmp_path / 'cache'), tasks=tasks)


def test_tasks_keep_only_their_questions_in_both_splits(tmp_path):
  full = pl.build_data(_config(tmp_path, ''))
  config = _config(tmp_path, 'lesion_localization, anomaly_detection')
  data = pl.build_data(config)
  assert pl.data_tasks(config) == ('anomaly_detection', 'lesion_localization')
  for split in ('train', 'test'):
    want = [r.id for r in getattr(full, split) if r.task in pl.data_tasks(config)]
    got = [getattr(data, split)[i].id for i in range(len(getattr(data, split)))]
    assert got == want and 0 < len(got) < len(getattr(full, split))
  # the tokenizer learns from the kept questions only: another cache entry than the full build's
  tok_full, tok = pl.build_tokenizer(_config(tmp_path, ''), full), pl.build_tokenizer(config, data)
  assert tok_full.name_or_path != tok.name_or_path


def test_unknown_task_fails_before_any_work(tmp_path):
  with pytest.raises(ValueError, match=r'data\.tasks.*unknown.*lesion_detection'):
    common.validate(_config(tmp_path, 'anomaly_detection,lesion_detection'))


def test_task_repeats_weigh_the_sft_epoch_by_task(tmp_path):
  """``sft.task_repeats``: each question of a named task appears that many times in an SFT epoch (with its length),
  every other question once; with no repeats the train split itself."""
  import collections
  import types
  config = _config(tmp_path, '')
  data = pl.build_data(config)
  n = len(data.train)
  data.lengths['train'] = list(range(n))
  config.sft.task_repeats = 'lesion_localization=3, anomaly_detection=2'
  source, lengths = pl.sft_records(types.SimpleNamespace(config=config, data=data))
  tasks = [data.train[i].task for i in range(n)]
  count = collections.Counter(tasks)
  assert len(source) == n + 2 * count['lesion_localization'] + count['anomaly_detection']
  got = collections.Counter(source[i].id for i in range(len(source)))
  for i in range(n):
    want = {'lesion_localization': 3, 'anomaly_detection': 2}.get(tasks[i], 1)
    assert got[data.train[i].id] == want, (tasks[i], got[data.train[i].id])
  assert sorted(lengths) == sorted(i for i in range(n) for _ in range(
      {'lesion_localization': 3, 'anomaly_detection': 2}.get(tasks[i], 1)))
  assert all(source[k].id == data.train[lengths[k]].id for k in range(len(source)))
  config.sft.task_repeats = ''
  assert pl.sft_records(types.SimpleNamespace(config=config, data=data))[0] is data.train


@pytest.mark.parametrize('text, match', [
    ('lesion_detection=2', r"sft\.task_repeats.*'lesion_detection=2' is not TASK=WEIGHT"),
    ('anomaly_detection=0', r"sft\.task_repeats.*weight of 'anomaly_detection' is '0'"),
    ('anomaly_detection=0.0', r"sft\.task_repeats.*weight of 'anomaly_detection' is '0\.0'"),
    ('anomaly_detection=-1', r"sft\.task_repeats.*weight of 'anomaly_detection' is '-1'"),
    ('anomaly_detection=1e3', r"sft\.task_repeats.*weight of 'anomaly_detection' is '1e3'"),
    ('anomaly_detection', r"sft\.task_repeats.*'anomaly_detection' is not TASK=WEIGHT"),
    ('anomaly_detection=2,anomaly_detection=3', r"sft\.task_repeats.*named twice"),
])
@pytest.mark.parametrize('stage', ['sft', 'rl'])
def test_bad_task_repeats_fail_before_any_work(tmp_path, text, match, stage):
  config = _config(tmp_path, '')
  config[stage].task_repeats = text
  with pytest.raises(ValueError, match=match.replace('sft', stage)):
    common.validate(config)


def test_a_fractional_weight_keeps_that_share_of_a_tasks_questions_by_their_ids(tmp_path):
  """``anatomy_identification=0.5``: half that task's questions once, the others not at all; ``2.25``: every
  question twice and a quarter of them a third time. The share is chosen by the questions' ids: the same whatever
  the record order."""
  import collections
  import types
  config = _config(tmp_path, '')
  data = pl.build_data(config)
  n = len(data.train)
  tasks = collections.Counter(data.train[i].task for i in range(n))
  config.sft.task_repeats = 'anatomy_identification=0.5,lesion_localization=2.25'
  source, _ = pl.sft_records(types.SimpleNamespace(config=config, data=data))
  got = collections.Counter(source[i].id for i in range(len(source)))
  by_task = collections.defaultdict(collections.Counter)
  for i in range(n):
    by_task[data.train[i].task][got[data.train[i].id]] += 1
  anat, les = tasks['anatomy_identification'], tasks['lesion_localization']
  assert by_task['anatomy_identification'] == {1: round(0.5 * anat), 0: anat - round(0.5 * anat)}
  assert by_task['lesion_localization'] == {3: round(0.25 * les), 2: les - round(0.25 * les)}
  assert all(set(by_task[t]) == {1} for t in tasks if t not in ('anatomy_identification', 'lesion_localization'))
  # the same questions chosen from the split read backwards
  from medad_jax.data.lengths import Subset
  rev = Subset(data.train, list(range(n))[::-1])
  again = pl.task_mixture(rev, None, pl.task_repeats(config))[0]
  assert collections.Counter(again[i].id for i in range(len(again))) == got


def test_rl_task_repeats_weigh_the_prompts_by_task(tmp_path):
  """``rl.task_repeats``: Con-GRPO's prompt source holds each question of a named task that many times, the rest
  once; the SFT epoch is not touched by it (and the reverse)."""
  import collections
  import types
  config = _config(tmp_path, '')
  config.sft.task_repeats = config.rl.task_repeats = ''   # the miniature's default sets both
  data = pl.build_data(config)
  run = types.SimpleNamespace(config=config, data=data)
  n = len(data.train)
  assert pl.rl_records(run) is data.train
  config.rl.task_repeats = 'pathology_characterization=4'
  source = pl.rl_records(run)
  assert pl.sft_records(run)[0] is data.train
  got = collections.Counter(source[i].id for i in range(len(source)))
  for i in range(n):
    r = data.train[i]
    assert got[r.id] == (4 if r.task == 'pathology_characterization' else 1), r.task
  assert len(source) > n


def _run_with_lesion_repeats(tmp_path, stage: str):
  """-> ``(run, n, lesion)``: a tiny run whose ``<stage>.task_repeats`` triples lesion localisation, its train
  questions and how many of them are lesion localisation."""
  config = _config(tmp_path, '')
  config[stage].task_repeats = 'lesion_localization=3'
  config.sft.batch_size, config.sft.epochs, config.sft.max_steps = 4, 1, 2
  config.rl.max_steps, config.rl.epochs = -1, 1
  config.vision_warmup.enabled = False
  config.mesh.devices = 1
  config.log.tensorboard = False
  run = pl.setup(config, str(tmp_path / 'run'))
  n = len(run.data.train)
  return run, n, sum(run.data.train[i].task == 'lesion_localization' for i in range(n))


def test_the_sft_trainer_reads_the_weighted_epoch(tmp_path, monkeypatch):
  """``sft.train`` (the launcher's SFT) feeds the repeated epoch and counts its steps from it."""
  from medad_jax.train import feed, sft
  run, n, lesion = _run_with_lesion_repeats(tmp_path, 'sft')
  seen = []
  real = feed.dataset

  def spy(run_, source, **kw):
    seen.append((len(source), kw['lengths']))
    return real(run_, source, **kw)

  monkeypatch.setattr(feed, 'dataset', spy)
  sft.train(run)
  run.logger.close()
  assert run.logger.total_steps['sft'] == 2
  assert [s[0] for s in seen] == [n + 2 * lesion] and lesion > 0
  assert seen[0][1] is None or len(seen[0][1]) == n + 2 * lesion


def test_the_congrpo_trainer_draws_prompts_from_the_weighted_source(tmp_path, monkeypatch):
  """``congrpo.train`` (the launcher's Con-GRPO) builds its prompt stream from ``rl.task_repeats``'s mixture and
  counts its steps from it (stopped at the stream's creation: what it reads is the point, not a step)."""
  from medad_jax.train import congrpo, feed
  run, n, lesion = _run_with_lesion_repeats(tmp_path, 'rl')
  config = run.config
  seen = []

  class Seen(Exception):
    pass

  def spy(run_, source, **kw):
    seen.append(len(source))
    raise Seen

  monkeypatch.setattr(feed, 'dataset', spy)
  with pytest.raises(Seen):
    congrpo.train(run, pl.build_model(config, run.model_cfg, config.seed))
  run.logger.close()
  assert seen == [n + 2 * lesion] and lesion > 0
  assert congrpo.num_steps(config, n + 2 * lesion) > congrpo.num_steps(config, n)
