"""JSONL-directory loader: strict mode names file:line, field and expectation; skip mode counts every reason."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from medad_jax.data import loader
from medad_jax.data.schema import RecordError


def _good(i, **kw):
  d = dict(id=f'r{i}', image='images/ok.png', modality='CT', anatomy='Liver', task='anomaly_detection',
           question='Is there any abnormality?', options=['Yes', 'No', 'Unsure', 'Artifact'], answer='A',
           source='LiverCT', cot='A dark round focus is present. So A.', abnormal=True)
  d.update(kw)
  return json.dumps(d)


# (line text, reason) for each kind of bad record the issue lists, plus a few more.
BAD = [
    ('{"id": "x1", "image": "images/ok.png", ', 'malformed_json'),
    (_good(101, options=['a', 'b', 'c']), 'bad_options'),
    (_good(102, options=['a', 'b', 'c', 'd', 'e']), 'bad_options'),
    (_good(103, answer='E'), 'bad_answer'),
    (_good(104, answer='Maybe'), 'bad_answer'),
    (_good(105, task='report_generation'), 'unknown_task'),
    (_good(106, region='Upper Middle', abnormal=True), 'unknown_region'),
    (_good(107, image='images/missing.png'), 'missing_image'),
    (_good(108, image='images/garbage.png'), 'corrupt_image'),
    (_good(109, image='images/truncated.png'), 'corrupt_image'),
    (_good(1), 'duplicate_id'),
    ('[1, 2, 3]', 'bad_type'),
]


@pytest.fixture
def medad_dir(tmp_path):
  os.makedirs(tmp_path / 'images')
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(tmp_path / 'images' / 'ok.png')
  (tmp_path / 'images' / 'garbage.png').write_bytes(b'not an image at all')
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(buf, format='PNG')
  (tmp_path / 'images' / 'truncated.png').write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  lines = [_good(1), _good(2)] + [b for b, _ in BAD] + ['', _good(3)]
  (tmp_path / 'train.jsonl').write_text('\n'.join(lines) + '\n')
  (tmp_path / 'test.jsonl').write_text(_good(4, split='test') + '\n')
  return tmp_path


def test_skip_mode_counts_every_skipped_record_by_reason(medad_dir):
  recs, rep = loader.load_jsonl_dir(str(medad_dir), policy='skip')
  assert sorted(r.id for r in recs) == ['r1', 'r2', 'r3', 'r4']
  expected = {}
  for _, reason in BAD:
    expected[reason] = expected.get(reason, 0) + 1
  assert rep.counts() == expected
  assert len(rep.skipped) == len(BAD) and rep.blank_lines == 1 and rep.lines == 4 + len(BAD)
  train = str(medad_dir / 'train.jsonl')
  for k, (s, (_, reason)) in enumerate(zip(rep.skipped, BAD)):
    assert s.where == f'{train}:{k + 3}' and s.reason == reason and s.where in s.message
  assert {r.split for r in recs} == {'train', 'test'}  # split from the file name


@pytest.mark.parametrize('k', range(len(BAD)))
def test_strict_mode_names_file_line_field(tmp_path, medad_dir, k):
  line, reason = BAD[k]
  path = medad_dir / 'train.jsonl'
  path.write_text('\n'.join([_good(1), _good(2), line]) + '\n')
  with pytest.raises(RecordError) as e:
    loader.load_jsonl_dir(str(medad_dir), policy='strict')
  assert e.value.reason == reason
  assert str(e.value).startswith(f'{path}:3: [{reason}] field ')
  assert 'expected' in str(e.value)


def test_strict_mode_stops_at_first_bad_record(medad_dir):
  with pytest.raises(RecordError, match=r'train\.jsonl:3: \[malformed_json\]'):
    loader.load_jsonl_dir(str(medad_dir))


def test_missing_dir_and_no_files_are_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    loader.load_jsonl_dir(str(tmp_path / 'nope'))
  with pytest.raises(FileNotFoundError, match='no \\*.jsonl'):
    loader.load_jsonl_dir(str(tmp_path))
  with pytest.raises(ValueError, match='policy'):
    loader.load_jsonl_files([], base_dir=str(tmp_path), policy='lenient')
