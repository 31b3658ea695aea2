"""Patch buckets from the dataset's own size distribution: exact minimum padding, every image fits."""

import itertools

import numpy as np
import pytest

from medad_jax.data import buckets


def _padding(counts, bs):
  bs = sorted(bs)
  return sum(min(b for b in bs if b >= c) - c for c in counts)


@pytest.mark.parametrize('seed', range(5))
def test_choose_buckets_is_the_exact_minimum(seed):
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, 40, 30) * 4
  for k in (1, 2, 3):
    got = buckets.choose_buckets(counts, k)
    assert len(got) <= k and got[-1] == counts.max()
    distinct = sorted(set(counts.tolist()))
    brute = min(_padding(counts, set(c) | {max(distinct)}) for c in itertools.combinations(distinct, k - 1))
    assert _padding(counts, got) == brute


def test_patch_counts_of_a_mixed_size_directory(tmp_path):
  from medad_jax.data import loader
  from medad_jax.testing.medad_dirs import write_mixed_size_dir

  class Proc:  # the processor's resize geometry (Qwen2.5-VL: patch 14, merge 2) at image_size 112
    class vision_cfg:
      patch_size, spatial_merge_size = 14, 2
    min_pixels, max_pixels = 56 * 56, 112 * 112

  write_mixed_size_dir(str(tmp_path))
  recs, _ = loader.load_jsonl_dir(str(tmp_path), policy='skip')
  counts = buckets.image_patch_counts(recs, Proc)
  assert len(counts) == 21 and (counts % 4 == 0).all() and counts.max() <= 64
  assert len(set(counts.tolist())) >= 5  # a real spread of sizes
  four = buckets.choose_buckets(counts, 4)
  rep = buckets.padding_report(counts, four)
  assert sum(rep['images_per_bucket']) == 21 and len(rep['buckets']) <= 4
  one = buckets.padding_report(counts, buckets.choose_buckets(counts, 1))
  assert rep['padded_fraction'] < one['padded_fraction']
  with pytest.raises(ValueError, match='exceeds the largest bucket'):
    buckets.padding_report(counts, [4])
