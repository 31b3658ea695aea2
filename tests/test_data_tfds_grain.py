"""TFDS array_record builders (no TensorFlow) and the grain pipeline: checkpointing, sharding, bucketing, seam."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from medad_jax.data import loader, pipeline, schema, synth, tfds_builders
from medad_jax.data.schema import RecordError

CFG = synth.SynthConfig(num_images=24, seed=5, image_size=56)


@pytest.fixture(scope='module')
def synth_records():
  return {r.id: r for _, rs in synth.generate(CFG) for r in rs}


@pytest.fixture(scope='module')
def built(tmp_path_factory, synth_records):
  return tfds_builders.build_synth(CFG, str(tmp_path_factory.mktemp('tfds')))


def test_synth_tfds_round_trip(built, synth_records):
  seen = []
  for split in ('train', 'test'):
    src = tfds_builders.RecordSource(built, split)
    recs = [src[i] for i in range(len(src))]
    assert all(r == synth_records[r.id] for r in recs)  # image PNG bytes included
    assert {r.split for r in recs} == {split}
    seen += [r.id for r in recs]
  assert sorted(seen) == sorted(synth_records)
  with pytest.raises(IndexError):
    src[len(src)]


def test_medad38k_builder_from_jsonl_dir_reports_skips(tmp_path):
  root = tmp_path / 'medad38k'
  cfg = synth.SynthConfig(num_images=6, seed=1, image_size=56)
  synth.write_dir(cfg, str(root))
  with open(root / 'train.jsonl', 'a') as f:
    f.write('{"id": "broken"\n')
  path = tfds_builders.build_medad38k(str(root), str(tmp_path / 'tfds'), policy='skip')
  import tensorflow_datasets as tfds
  meta = tfds.builder_from_directory(path).info.metadata
  assert meta['load_report']['skipped'] == {'malformed_json': 1}
  last_line = len((root / 'train.jsonl').read_text().splitlines())  # the broken line was appended last
  assert meta['load_report']['skipped_records'][0]['where'] == f'{root / "train.jsonl"}:{last_line}'
  ref, _ = loader.load_jsonl_dir(str(root), policy='skip')
  ref = {r.id: r for r in ref}
  got = [r for s in ('train', 'test') for r in tfds_builders.RecordSource(path, s)]
  assert len(got) == len(ref) == 30
  for r in got:
    want = ref[r.id]
    assert r == dataclasses.replace(want, image=r.image)
    assert schema.load_image(r).tobytes() == schema.load_image(want).tobytes()


def test_medad38k_strict_build_fails_with_file_line(tmp_path):
  root = tmp_path / 'medad38k'
  synth.write_dir(synth.SynthConfig(num_images=2, seed=1, image_size=56), str(root))
  (root / 'test.jsonl').write_text('{"id": "x", "options": ["a", "b", "c"]}\n')
  with pytest.raises(RecordError, match=r'test\.jsonl:1: '):
    tfds_builders.build_medad38k(str(root), str(tmp_path / 'tfds'), policy='strict')


def _ids(batches):
  return [i for b in batches for i in b['id']]


def test_iterator_state_restores_identical_remaining_sequence(built, tmp_path):
  src = tfds_builders.RecordSource(built, 'train')
  ds = pipeline.make_dataset(src, batch_size=5, seed=3, num_epochs=2, shard_index=0, shard_count=1)
  it = iter(ds)
  head = [next(it) for _ in range(7)]  # mid-epoch: 84 questions per epoch, 35 consumed
  pipeline.save_iterator_state(it, str(tmp_path / 'state.json'))
  json.loads((tmp_path / 'state.json').read_text())
  rest = list(it)
  it2 = pipeline.restore_iterator_state(iter(ds), str(tmp_path / 'state.json'))
  rest2 = list(it2)
  assert _ids(rest) == _ids(rest2) and len(_ids(rest)) == 2 * len(src) - 35
  for a, b in zip(rest, rest2):
    np.testing.assert_array_equal(a['image'], b['image'])
  ids = _ids(head) + _ids(rest)
  epoch1, epoch2 = ids[:len(src)], ids[len(src):]
  assert sorted(epoch1) == sorted(epoch2) == sorted(src[i].id for i in range(len(src)))
  assert epoch1 != epoch2  # reshuffled per epoch, epochs not mixed


@pytest.mark.parametrize('count', [1, 3, 4])
def test_sharding_disjoint_and_complete(synth_records, count):
  recs = sorted(synth_records.values(), key=lambda r: r.id)
  shards = [_ids(pipeline.make_dataset(recs, batch_size=4, seed=0, shard_index=i, shard_count=count,
                                       preprocess=lambda r: {'id': r.id}))
            for i in range(count)]
  flat = [i for s in shards for i in s]
  assert len(flat) == len(set(flat)) == len(recs)
  assert set(flat) == set(synth_records)
  assert max(map(len, shards)) - min(map(len, shards)) <= 1
  with pytest.raises(ValueError, match='shard_index'):
    pipeline.make_dataset(recs, batch_size=4, shard_index=count, shard_count=count)


def _byte_tokens(record):
  """Stand-in for the policy processor: bytes of prompt and target as token ids."""
  prompt = np.frombuffer(schema.format_question(record).encode(), np.uint8).astype(np.int32)
  target = np.frombuffer(schema.format_target(record).encode(), np.uint8).astype(np.int32)
  ids = np.concatenate([prompt, target])
  return {'input_ids': ids, 'attention_mask': np.ones_like(ids),
          'loss_mask': np.concatenate([np.zeros_like(prompt), np.ones_like(target)]),
          'pixel_values': np.ones((4, 3), np.float32), 'id': record.id}


def test_bucket_batching_pads_to_buckets(synth_records):
  recs = sorted(synth_records.values(), key=lambda r: r.id)
  longest = max(len(_byte_tokens(r)['input_ids']) for r in recs)
  buckets = (256, 384, 512, 1024)
  assert longest <= buckets[-1]
  fn = pipeline.bucket_batch_fn(buckets, pad_values={'input_ids': -1})
  ds = pipeline.make_dataset(recs, batch_size=6, shard_index=0, shard_count=1, preprocess=_byte_tokens,
                             batch_fn=fn)
  for b in ds:
    n, length = b['input_ids'].shape
    true_len = [len(_byte_tokens(synth_records[i])['input_ids']) for i in b['id']]
    assert length == min(x for x in buckets if x >= max(true_len))
    for row, L in zip(range(n), true_len):
      assert (b['input_ids'][row, L:] == -1).all() and (b['attention_mask'][row, L:] == 0).all()
      assert b['attention_mask'][row, :L].all() and b['loss_mask'][row, :L].sum() > 0
    assert b['pixel_values'].shape == (n * 4, 3)  # concatenated, the Qwen2.5-VL convention
  with pytest.raises(ValueError, match='exceeds the largest bucket 64'):
    pipeline.bucket_batch_fn((32, 64))([_byte_tokens(recs[0])])


def test_processor_seam_receives_image_prompt_and_target(synth_records):
  calls = []

  def processor(image, question, target):
    calls.append((image, question, target))
    return {'input_ids': np.arange(3, dtype=np.int32)}

  rec = next(iter(synth_records.values()))
  out = pipeline.processor_preprocess(processor)(rec)
  image, question, target = calls[-1]
  assert isinstance(image, Image.Image) and image.size == (56, 56) and image.mode == 'RGB'
  assert question == schema.format_question(rec) and target == schema.format_target(rec)
  assert out['answer'] == 'ABCD'.index(rec.answer) and out['id'] == rec.id
  pipeline.processor_preprocess(processor, with_target=False)(rec)
  assert calls[-1][2] is None


def test_default_pipeline_over_tfds_source(built):
  src = tfds_builders.RecordSource(built, 'test')
  b = next(iter(pipeline.make_dataset(src, batch_size=4, shard_index=0, shard_count=1)))
  assert b['image'].shape == (4, 56, 56, 3) and b['image'].dtype == np.uint8
  assert all(p.split('\n')[1].startswith('A. ') for p in b['prompt'])
  assert all(t.startswith('<think>') and t.endswith('</answer>') for t in b['target'])


_RACE = r'''
import os, sys, time
from medad_jax.data import synth, tfds_builders
go = sys.argv[2]
while not os.path.exists(go):   # both processes imported: start the build together
  time.sleep(0.01)
path = tfds_builders.build_synth(synth.SynthConfig(num_images=60, seed=7, image_size=56), sys.argv[1])
with open(sys.argv[3], 'w') as f:   # the builder directory, for the parent to compare
  f.write(path)
'''


def test_two_processes_building_the_same_dataset_share_one_build(tmp_path):
  """A sweep's seeds side by side share the data cache: the second process waits for the first one's build and
  reuses it (without the lock, TFDS failed in one of them on renaming its build onto the other's)."""
  import os
  import subprocess
  import sys
  import time
  data_dir, go = str(tmp_path / 'tfds'), str(tmp_path / 'go')
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [os.getcwd(), os.environ.get('PYTHONPATH')]))}
  results = [str(tmp_path / f'result{i}') for i in range(2)]
  procs = [subprocess.Popen([sys.executable, '-c', _RACE, data_dir, go, results[i]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  time.sleep(1.0)
  deadline = time.time() + 120
  open(go, 'w').close()
  outs = [p.communicate(timeout=max(1.0, deadline - time.time())) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  dirs = {open(r).read() for r in results}
  assert len(dirs) == 1
  src = tfds_builders.RecordSource(dirs.pop(), 'train')
  assert len(src) > 0
  assert not [d for d in os.listdir(os.path.dirname(src.builder_dir)) if d.startswith('incomplete')]
