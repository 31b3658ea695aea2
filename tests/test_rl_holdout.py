"""``data.rl_holdout``: Con-GRPO's prompts from training images the warm-up and SFT never read."""

import random
import types

import ml_collections
import pytest

from medad_jax.train import pipeline


def _ids(n_images: int, per_image: int = 5) -> list[str]:
  return [f'img{i:04d}' for i in range(n_images) for _ in range(per_image)]


def test_holdout_split_holds_out_whole_images_by_id():
  ids = _ids(40)
  kept, held = pipeline.holdout_split(ids, 0.1)
  assert sorted(kept + held) == list(range(len(ids)))
  held_images = {ids[q] for q in held}
  assert len(held_images) == 4 and len(held) == 20         # round(0.1 * 40) images, all 5 questions of each
  assert not held_images & {ids[q] for q in kept}
  shuffled = ids[:]
  random.Random(0).shuffle(shuffled)                        # the draw depends on the ids, not on their order
  k2, h2 = pipeline.holdout_split(shuffled, 0.1)
  assert {shuffled[q] for q in h2} == held_images
  assert pipeline.holdout_split(ids, 0.0) == (list(range(len(ids))), [])
  with pytest.raises(ValueError, match='rl_holdout'):
    pipeline.holdout_split(ids, 1.0)


def _run(fraction: float, n_images: int = 20):
  records = [types.SimpleNamespace(image_id=i, task=t) for i in _ids(n_images, 1) for t in ('a', 'b')]
  config = ml_collections.ConfigDict({'data': {'rl_holdout': fraction}})
  data = types.SimpleNamespace(train=records, lengths={'train': list(range(len(records)))})
  return types.SimpleNamespace(config=config, data=data), records


def test_train_part_gives_sft_and_rl_disjoint_images():
  run, records = _run(0.25)
  (sft, sft_len), (rl, rl_len) = pipeline.train_part(run, 'sft'), pipeline.train_part(run, 'rl')
  assert len(sft) == 30 and len(rl) == 10                  # 15 and 5 of 20 images, 2 questions each
  assert {r.image_id for r in sft}.isdisjoint({r.image_id for r in rl})
  assert sorted(sft_len + rl_len) == list(range(40))        # each record's length goes with it
  assert all(records[n] is r for n, r in zip(sft_len, sft))
  assert len(pipeline.train_part(_run(0.0)[0], 'rl')[0]) == 40   # off: every stage reads the whole split
