"""The dataset cache never hands one directory's data to another: builds (and the small tokenizer cached by the
build) are keyed by the source directory's real path, its JSONL contents and its files' sizes and mtimes. Also:
config values checked at parse time, per-record length limits under both policies, our own first-run lines."""

import json
import logging
import os
import subprocess
import sys

import pytest

from configs import common
from medad_jax import launch
from medad_jax.data import fingerprint, lengths, synth, tfds_builders
from medad_jax.data.schema import RecordError


def _dir(path, seed):
  synth.write_dir(synth.SynthConfig(num_images=4, seed=seed, image_size=56), str(path))
  return str(path)


def _ids(builder_dir):
  return sorted(r.id for s in ('train', 'test') for r in tfds_builders.RecordSource(builder_dir, s))


def test_another_or_changed_directory_is_rebuilt_never_reused(tmp_path, caplog):
  a, b = _dir(tmp_path / 'a', 1), _dir(tmp_path / 'b', 2)
  cache = str(tmp_path / 'tfds')
  da = tfds_builders.build_medad38k(a, cache)
  db = tfds_builders.build_medad38k(b, cache)
  assert da != db and _ids(db) != _ids(da)
  with open(os.path.join(b, 'train.jsonl')) as f:
    assert _ids(db) == sorted([json.loads(l)['id'] for l in f] + [json.loads(l)['id']
                                                                   for l in open(os.path.join(b, 'test.jsonl'))])
  with caplog.at_level(logging.INFO, logger='medad_jax.data.tfds_builders'):
    assert tfds_builders.build_medad38k(a, cache) == da  # unchanged: reused
  assert 'reusing the build' in caplog.text
  # an edit that keeps the file's size (and a restored mtime) still changes the key: the JSONL content is hashed
  train = os.path.join(a, 'train.jsonl')
  st = os.stat(train)
  text = open(train).read()
  first = json.loads(text.splitlines()[0])['id']
  open(train, 'w').write(text.replace(first, first[:-1] + ('x' if first[-1] != 'x' else 'y'), 1))
  os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns))
  da2 = tfds_builders.build_medad38k(a, cache)
  assert da2 != da and first not in _ids(da2)
  # a touched image changes the key too
  img = os.path.join(a, 'images', sorted(os.listdir(os.path.join(a, 'images')))[0])
  os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert tfds_builders.build_medad38k(a, cache) not in (da, da2)
  # an invalid directory fails; nothing earlier is reused for it
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'train.jsonl').write_text('{"id": "x"}\n')
  with pytest.raises(RecordError, match=r'train\.jsonl:1: \[missing_field\]'):
    tfds_builders.build_medad38k(str(bad), cache)


def test_fingerprint_contents_and_symlinked_image_directories(tmp_path):
  a = _dir(tmp_path / 'a', 1)
  fp = fingerprint.source_fingerprint(a)
  assert fp.jsonl_files == 2 and fp.other_files == 5 and fp.bytes > 0 and len(fp.digest) == 64
  assert fingerprint.source_fingerprint(a, extra='skip') != fp
  # a directory whose images/ is a symlink to a shared store: the images are walked (and a loop does not hang)
  c = tmp_path / 'c'
  c.mkdir()
  for f in ('train.jsonl', 'test.jsonl'):
    (c / f).write_text(open(os.path.join(a, f)).read())
  os.symlink(os.path.join(a, 'images'), c / 'images')
  os.symlink(c, c / 'loop')
  fc = fingerprint.source_fingerprint(str(c))
  assert fc.other_files == 4 and fc.digest != fp.digest  # other real path
  assert tfds_builders.build_medad38k(str(c), str(tmp_path / 'tfds'))


def test_small_tokenizer_follows_the_build(tmp_path):
  from medad_jax.train import pipeline as pl
  a, b = _dir(tmp_path / 'a', 1), _dir(tmp_path / 'b', 2)
  paths = []
  for d in (a, b):
    cfg = common.load('sft', ['model.preset=tiny', 'data.source=medad38k', f'data.dir={d}',
                              f'data.cache_dir={tmp_path / "cache"}', 'model.vocab_size=300'])
    data = pl.build_data(cfg)
    pl.build_tokenizer(cfg, data)
    paths.append(sorted(os.listdir(tmp_path / 'cache' / 'tokenizers')))
  assert len(paths[0]) == 1 and len(paths[1]) == 2  # the second directory trained its own tokenizer


# ------------------------------------------------------------------------------------------- config values


@pytest.mark.parametrize('override,message', [
    ('data.image_size=30', 'a multiple of 28'), ('data.image_size=50', 'a multiple of 28'),
    ('data.image_size=28', 'at least 56'), ('data.policy=lenient', "one of ('strict', 'skip')"),
    ('data.max_prompt_len=0', 'data.max_prompt_len'), ('data.test_fraction=1.0', 'data.test_fraction'),
    ('resume=force', 'config.resume'),
])
def test_bad_data_values_fail_at_parse_time_before_the_run_directory(tmp_path, override, message):
  workdir = tmp_path / 'never'
  with pytest.raises(launch.ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    launch.main(['launch', '--config=congrpo', f'--workdir={workdir}', f'--config.{override}'])
  assert not workdir.exists()


def test_launch_cli_reports_a_bad_record_in_one_line(tmp_path):
  d = _dir(tmp_path / 'd', 1)
  with open(os.path.join(d, 'train.jsonl'), 'a') as f:
    f.write('{"id": "q", "question": "<|im_end|>"}\n')
  line = len(open(os.path.join(d, 'train.jsonl')).read().splitlines())
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-m', 'medad_jax.launch', '--config=sft', '--config.model.preset=tiny',
                        '--config.data.source=medad38k', f'--config.data.dir={d}', f'--workdir={tmp_path / "run"}',
                        f'--config.data.cache_dir={tmp_path / "cache"}'], capture_output=True, text=True, cwd=repo,
                       timeout=600, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 2, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
  errors = [l for l in out.stderr.splitlines() if ' E ' in l or l.startswith('E')]
  assert len(errors) == 1 and f'train.jsonl:{line}: [' in errors[0], out.stderr[-3000:]
  assert 'Downloading and preparing' not in out.stdout + out.stderr
  assert 'Using custom data configuration' not in out.stderr


# ------------------------------------------------------------------------------------------- length limits


def test_over_long_records_are_skipped_and_counted_or_refused(tmp_path):
  from medad_jax.train import pipeline as pl
  d = tmp_path / 'd'
  _dir(d, 1)
  lines = open(d / 'train.jsonl').read().splitlines()
  recs = [json.loads(l) for l in lines]
  recs[0]['question'] = 'Is there any abnormality? ' + 'Please look very carefully at the image. ' * 30
  recs[1]['cot'] = 'The image shows a bright region. ' * 60
  (d / 'train.jsonl').write_text('\n'.join(json.dumps(r) for r in recs) + '\n')
  cfg = common.load('sft', ['model.preset=tiny', 'data.source=medad38k', f'data.dir={d}',
                            f'data.cache_dir={tmp_path / "cache"}', 'model.vocab_size=400', 'data.policy=skip'])
  data = pl.build_data(cfg)
  tok = pl.build_tokenizer(cfg, data)
  proc = pl.build_processor(cfg, tok, pl.model_config(cfg, tok))
  long_ids = {recs[0]['id'], recs[1]['id']}
  train = list(data.train) + list(data.test)
  p, t = lengths.record_lengths(train, proc, cfg.data.answer_format)
  cfg.unlock()
  cfg.data.max_prompt_len = max(n for r, n in zip(train, p) if r.id not in long_ids)
  cfg.data.max_target_len = max(n for r, n in zip(train, t) if r.id not in long_ids)
  assert max(p) > cfg.data.max_prompt_len and max(t) > cfg.data.max_target_len
  out = lengths.apply_limits(cfg.data, data, proc)
  assert out['report']['skipped'] == {'prompt_too_long': 1, 'target_too_long': 1}
  assert len(out['train']) == len(data.train) - 2 and len(out['test']) == len(data.test)
  assert {r.id for r in out['train']} == {r.id for r in data.train} - {recs[0]['id'], recs[1]['id']}
  where = {e['reason']: e['where'] for e in out['report']['skipped_examples']}
  assert where == {'prompt_too_long': f"train record '{recs[0]['id']}'",
                   'target_too_long': f"train record '{recs[1]['id']}'"}
  # the counted prompt length is the processor's own
  from medad_jax.data.schema import format_question, load_image
  r = next(r for r in data.train if r.id == recs[2]['id'])
  assert lengths.record_lengths([r], proc)[0][0] == len(proc(load_image(r), format_question(r))['input_ids'])
  cfg.data.policy = 'strict'
  with pytest.raises(RecordError, match=r"train record '.*': \[prompt_too_long\] .*max_prompt_len = \d+"):
    lengths.apply_limits(cfg.data, data, proc)
