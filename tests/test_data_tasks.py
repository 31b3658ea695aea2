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
