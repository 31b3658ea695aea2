"""SFT length grouping (``sft.group_by_length``, ``distributed.length_grouped``) and configurable length buckets
(``sft.length_buckets``): the same examples per run of batches, batches of similar length, the same global batches
for any process count, resumable mid-epoch, and bad settings refused by name."""

import numpy as np
import pytest

from medad_jax import distributed

# 12 records; record i has LENGTHS[i] tokens.
LENGTHS = [50, 10, 40, 20, 60, 30, 11, 41, 21, 61, 31, 51]


def _batches(global_batch=2, shard_count=1, group=3, seed=0, num_epochs=1, shuffle=False, state=None, n=None):
  """Global batches (lists of record indices) of ``process_dataset`` over ``range(12)``, shards concatenated."""
  its = []
  for i in range(shard_count):
    ds = distributed.process_dataset(list(range(12)), name='t', global_batch=global_batch, shard_index=i,
                                     shard_count=shard_count, preprocess=lambda r: r, seed=seed, shuffle=shuffle,
                                     num_epochs=num_epochs, read_threads=1, lengths=LENGTHS, group_by_length=group)
    it = iter(ds)
    if state is not None:
      it.set_state(state)
    its.append(it)
  out = []
  while n is None or len(out) < n:
    try:
      parts = [next(it) for it in its]
    except StopIteration:
      break
    out.append([x for p in parts for x in p])
  return out


def test_a_run_of_batches_is_sorted_by_length_and_its_batches_shuffled_by_hand():
  """Unshuffled order 0..11, batch 2, group 3: runs {0..5} and {6..11}. Sorted by length, run 0 is
  1(10) 3(20) 5(30) 2(40) 0(50) 4(60) -> batches [1,3] [5,2] [0,4]; run 1 is 6(11) 8(21) 10(31) 7(41) 11(51) 9(61)
  -> [6,8] [10,7] [11,9]. Each run's three batches come in the order of ``default_rng([seed, run])``."""
  got = _batches()
  run0 = [[1, 3], [5, 2], [0, 4]]
  run1 = [[6, 8], [10, 7], [11, 9]]
  p0, p1 = (np.random.default_rng([0, r]).permutation(3) for r in (0, 1))
  assert got == [run0[i] for i in p0] + [run1[i] for i in p1]
  assert got != run0 + run1 or list(p0) == list(p1) == [0, 1, 2]   # the permutation is not the identity here
  # padding: each batch's longest minus its shortest is at most 10 tokens (ungrouped, batch [0, 1] spans 40)
  assert max(max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) for b in got) <= 10


def test_every_example_is_read_once_per_epoch_and_the_order_is_the_same_for_any_process_count():
  one = _batches(global_batch=4, group=2, shuffle=True, seed=3, num_epochs=2)
  two = _batches(global_batch=4, group=2, shuffle=True, seed=3, num_epochs=2, shard_count=2)
  assert one == two
  flat = [x for b in one for x in b]
  assert len(one) == 6 and sorted(flat) == sorted(list(range(12)) * 2)
  # each run of 2 batches holds the examples that run held without grouping
  plain = distributed.process_dataset(list(range(12)), name='t', global_batch=4, shard_index=0, shard_count=1,
                                      preprocess=lambda r: r, seed=3, shuffle=True, num_epochs=2, read_threads=1)
  plain = [x for b in plain for x in b]
  for r in range(3):
    assert sorted(flat[8 * r:8 * r + 8]) == sorted(plain[8 * r:8 * r + 8])


def test_a_resumed_iterator_continues_with_the_same_batches():
  full = _batches(global_batch=2, group=3, shuffle=True, seed=1, num_epochs=None, n=9)
  ds = distributed.process_dataset(list(range(12)), name='t', global_batch=2, shard_index=0, shard_count=1,
                                   preprocess=lambda r: r, seed=1, shuffle=True, num_epochs=None, read_threads=1,
                                   lengths=LENGTHS, group_by_length=3)
  it = iter(ds)
  for _ in range(4):
    next(it)
  assert _batches(global_batch=2, group=3, shuffle=True, seed=1, num_epochs=None, state=it.get_state(), n=5) == \
      full[4:]


def test_grouping_without_lengths_is_refused():
  with pytest.raises(ValueError, match='one length per record'):
    distributed.process_dataset(list(range(12)), name='sft', global_batch=2, shard_index=0, shard_count=1,
                                preprocess=lambda r: r, read_threads=1, lengths=LENGTHS[:5], group_by_length=2)


def test_length_buckets_and_grouping_settings_are_checked_by_name():
  from configs import common, sft
  for bad in ('160,128', '128,x', '0,128', '128,128'):
    config = sft.get_config()
    config.sft.length_buckets = bad
    with pytest.raises(ValueError, match=r'config\.sft\.length_buckets = .*ascending order'):
      common.validate(config)
  for key in ('data.prompt_length_buckets', 'sft.target_buckets'):
    for bad in ('96,80', 'x'):
      config = sft.get_config()
      section, name = key.split('.')
      config[section][name] = bad
      with pytest.raises(ValueError, match=rf'config\.{section}\.{name} = .*ascending order'):
        common.validate(config)
  config = sft.get_config()
  config.sft.group_by_length = -1
  with pytest.raises(ValueError, match=r'config\.sft\.group_by_length = -1'):
    common.validate(config)


def test_the_configured_buckets_pad_the_sft_batch(tmp_path):
  """A batch whose longest example has L tokens is padded to the smallest configured bucket >= L."""
  from configs import sft
  from medad_jax.train import feed, pipeline as pl
  config = sft.get_config()
  with config.unlocked():
    config.model.preset = 'tiny'
    config.data.synth_images = 10
    config.data.image_size = 56
    config.data.read_threads = 1
    config.data.cache_dir = str(tmp_path / 'cache')
    config.sft.length_buckets = ''   # the pipeline's default buckets (the miniature sets its own)
  run = pl.setup(config, str(tmp_path / 'run'))
  assert len(run.data.lengths['train']) == len(run.data.train)
  examples = [pl.sft_preprocess(run.processor, config.data.answer_format)(run.data.train[i]) for i in range(4)]
  longest = max(len(e['input_ids']) for e in examples)
  assert [len(e['input_ids']) for e in examples] == run.data.lengths['train'][:4]   # what grouping sorts by
  default_T = feed.sft_batch(run, examples)['input_ids_BT'].shape[1]
  assert default_T == min(b for b in pl.SFT_LENGTH_BUCKETS if b >= longest)
  with config.unlocked():
    config.sft.length_buckets = f'{longest},{longest + 8}'
  assert feed.sft_batch(run, examples)['input_ids_BT'].shape[1] == longest
  # the answer tokens (where the LM head runs): the default buckets, then sft.target_buckets
  answer = max(int(np.asarray(e['loss_mask'])[1:].sum()) for e in examples)
  assert feed.sft_batch(run, examples)['target_pos_BM'].shape[1] == min(
      b for b in pl.TARGET_LENGTH_BUCKETS if b >= answer)
  with config.unlocked():
    config.sft.target_buckets = f'{answer - 1},{answer + 2}'
  batch = feed.sft_batch(run, examples)
  assert batch['target_pos_BM'].shape[1] == answer + 2
  assert batch['target_mask_BM'].sum() == sum(int(np.asarray(e['loss_mask'])[1:].sum()) for e in examples)
  run.logger.close()


def test_the_configured_prompt_buckets_pad_the_sampler_batch(tmp_path):
  """Rollout and evaluation prompts are padded to the smallest ``data.prompt_length_buckets`` entry that holds the
  longest prompt of the batch; '' keeps the pipeline's default buckets."""
  from medad_jax.testing.configs import tiny_miniature
  from medad_jax.train import feed, pipeline as pl
  config = tiny_miniature(str(tmp_path / 'cache'), images=10, prompt_length_buckets='')
  run = pl.setup(config, str(tmp_path / 'run'))
  examples = [pl.prompt_preprocess(run.processor)(run.data.train[i]) for i in range(3)]
  longest = max(len(e['input_ids']) for e in examples)
  default_T = feed.prompt_batch(run, examples, 4).input_ids_PT.shape[1]
  assert default_T == min(b for b in pl.PROMPT_LENGTH_BUCKETS if b >= longest)
  config.data.prompt_length_buckets = f'{longest - 1},{longest + 3},{default_T + 64}'
  pb = feed.prompt_batch(run, examples, 4)
  assert pb.input_ids_PT.shape == (4, longest + 3)
  run.logger.close()
