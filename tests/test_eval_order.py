"""The evaluation reads its questions grouped by task (``eval.group_by_task``, ``evaluate.by_task``): fewer decode
steps per batch, and the same greedy answer to every question as in the split's order."""

import json
import os
from types import SimpleNamespace

from medad_jax.train import evaluate


def test_by_task_groups_in_table_order_and_keeps_the_split_order_within_a_task():
  tasks = ['lesion_localization', 'anatomy_identification', 'lesion_localization', 'modality_classification',
           'anatomy_identification', 'anomaly_detection']
  records = [SimpleNamespace(task=t, i=i) for i, t in enumerate(tasks)]
  got = evaluate.by_task(records)
  assert len(got) == 6
  assert [r.i for r in got] == [1, 4, 5, 0, 2, 3]   # anatomy, anomaly, lesion, modality (Table 1's order)


def test_grouped_greedy_evaluation_gives_each_question_the_same_answer(tmp_path):
  from medad_jax import launch
  tiny = ['model.preset=tiny', 'data.synth_images=20', 'data.image_size=56', 'data.read_threads=1',
          'vision_warmup.enabled=False', 'sft.max_steps=3', 'eval.batch_size=4', 'eval.image_control=False',
          'judge.backend=rule', 'ckpt.async_save=False', 'mesh.devices=1', 'log.tensorboard=False']
  rows = {}
  for grouped in (True, False):
    run = tmp_path / f'grouped_{grouped}'
    launch.main(['launch', '--config=congrpo:sft_only', f'--workdir={run}', f'--config.data.cache_dir={tmp_path}/c',
                 f'--config.eval.group_by_task={grouped}', *[f'--config.{o}' for o in tiny]])
    with open(os.path.join(run, 'eval', 'completions', 'sft-seed0.jsonl')) as f:
      rows[grouped] = [json.loads(line) for line in f]
  tasks = [r['task'] for r in rows[True]]
  assert tasks == sorted(tasks, key=[t for t, _ in evaluate.TABLE1].index)   # grouped in Table 1's order
  assert [r['task'] for r in rows[False]] != tasks                           # the split's order interleaves them
  by_id = {g: {r['id']: r['completion'] for r in rs} for g, rs in rows.items()}
  assert len(by_id[True]) == len(rows[True]) > 4 and by_id[True] == by_id[False]
