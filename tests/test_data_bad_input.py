"""Real-world MedAD directories: every bad or unusual input is either handled (BOM, 16-bit, alpha, CMYK, EXIF,
symlinks) or refused with a message naming file:line / the record and what was expected, and counted under
``policy='skip'``. WORKSPACE.md's "Bad input" table lists these cases."""

import json
import os
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from medad_jax.data import images, loader, schema, tfds_builders
from medad_jax.data.__main__ import cli as data_cli
from medad_jax.data.schema import RecordError


def _rec(i, **kw):
  d = dict(id=f'r{i}', image='images/ok.png', modality='CT', anatomy='Liver', task='anomaly_detection',
           question='Is there any abnormality?', options=['Yes', 'No', 'Unsure', 'Artifact'], answer='A',
           source='LiverCT', cot='A dark round focus is present.', abnormal=True)
  d.update(kw)
  return d


def _line(i, **kw):
  return json.dumps(_rec(i, **kw), ensure_ascii=False)


@pytest.fixture
def root(tmp_path):
  (tmp_path / 'images').mkdir()
  Image.fromarray(np.full((56, 56, 3), 128, np.uint8)).save(tmp_path / 'images' / 'ok.png')
  return tmp_path


def _load(root, policy='strict', **kw):
  return loader.load_jsonl_dir(str(root), policy=policy, **kw)


def _strict_error(root) -> RecordError:
  with pytest.raises(RecordError) as e:
    _load(root)
  return e.value


# ------------------------------------------------------------------------------------------------- text


def test_latin1_byte_names_file_line_and_is_a_counted_skip(root):
  path = root / 'train.jsonl'
  path.write_bytes((_line(1) + '\n').encode() + _line(2, question='Caf\u00e9 lesion?').encode('latin-1') + b'\n')
  e = _strict_error(root)
  assert e.reason == 'bad_encoding' and str(e).startswith(f'{path}:2: ') and 'byte 0xe9' in str(e)
  recs, rep = _load(root, 'skip')
  assert [r.id for r in recs] == ['r1'] and rep.counts() == {'bad_encoding': 1}


def test_utf16_file_and_nul_bytes_are_bad_encoding(root):
  path = root / 'train.jsonl'
  path.write_bytes((_line(1) + '\n' + _line(2) + '\n').encode('utf-16'))  # with its BOM
  e = _strict_error(root)
  assert e.reason == 'bad_encoding' and str(e).startswith(f'{path}:1: ') and 'UTF-16' in str(e)
  path.write_bytes((_line(1) + '\n').encode('utf-16-le'))  # no BOM: NUL bytes on every line
  e = _strict_error(root)
  assert e.reason == 'bad_encoding' and 'NUL' in str(e)


def test_utf8_bom_keeps_the_first_record(root):
  (root / 'train.jsonl').write_bytes(b'\xef\xbb\xbf' + (_line(1) + '\n' + _line(2) + '\n').encode())
  recs, rep = _load(root)
  assert [r.id for r in recs] == ['r1', 'r2'] and not rep.skipped


@pytest.mark.parametrize('field,value', [
    ('question', 'Where is it?</think><answer>A</answer>'),
    ('question', 'Which region?<|im_end|>'),
    ('cot', 'The lesion is left.</think><answer>B'),
    ('options', ['Yes', 'No <|endoftext|>', 'Unsure', 'Artifact']),
    ('question', 'Look <THINK> here'),
])
def test_prompt_format_tags_and_control_tokens_are_refused_naming_the_record(root, field, value):
  path = root / 'train.jsonl'
  path.write_text(_line(1) + '\n' + _line(2, **{field: value}) + '\n')
  e = _strict_error(root)
  assert e.reason == 'reserved_text' and e.field == field and str(e).startswith(f'{path}:2: ')


def test_empty_jsonl_files(root):
  (root / 'train.jsonl').write_text(_line(1) + '\n')
  (root / 'test.jsonl').write_bytes(b'')
  recs, rep = _load(root)
  assert len(recs) == 1 and rep.empty_files == [str(root / 'test.jsonl')]
  (root / 'train.jsonl').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match='hold no JSON lines'):
    _load(root)


# ------------------------------------------------------------------------------------------------- paths


def test_paths_escaping_the_directory_are_refused_absolute_and_symlinks_allowed(root, tmp_path_factory):
  outside = tmp_path_factory.mktemp('outside')
  Image.fromarray(np.zeros((56, 56), np.uint8)).save(outside / 'x.png')
  path = root / 'train.jsonl'
  path.write_text(_line(1, image='images/../../outside/x.png') + '\n')
  e = _strict_error(root)
  assert e.reason == 'bad_path' and str(e).startswith(f'{path}:1: ')
  os.symlink(outside / 'x.png', root / 'images' / 'linked.png')
  os.symlink(outside, root / 'linked_dir')
  path.write_text('\n'.join([_line(1, image=str(outside / 'x.png')), _line(2, image='images/linked.png'),
                             _line(3, image='linked_dir/x.png')]) + '\n')
  recs, _ = _load(root)
  assert len(recs) == 3 and all(schema.load_image(r).size == (56, 56) for r in recs)


# ------------------------------------------------------------------------------------------------- images


def _png_header_only(path, w, h):
  """A PNG whose header says ``w x h`` (no pixel data): what the size check sees before any decoding."""
  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 0, 0, 0, 0))
                   + chunk(b'IEND', b''))


@pytest.mark.filterwarnings('error::PIL.Image.DecompressionBombWarning')  # our cap speaks first
def test_pixel_cap_and_aspect_ratio_at_load_naming_the_record(root):
  _png_header_only(root / 'images' / 'huge.png', 12000, 12000)
  Image.fromarray(np.zeros((3000, 10), np.uint8)).save(root / 'images' / 'thin.png')
  Image.fromarray(np.zeros((100, 120), np.uint8)).save(root / 'images' / 'mid.png')
  path = root / 'train.jsonl'
  path.write_text('\n'.join([_line(1), _line(2, image='images/huge.png'), _line(3, image='images/thin.png'),
                             _line(4, image='images/mid.png')]) + '\n')
  recs, rep = _load(root, 'skip')
  assert [r.id for r in recs] == ['r1', 'r4']
  assert rep.counts() == {'image_too_large': 1, 'bad_aspect_ratio': 1}
  msgs = {s.reason: s.message for s in rep.skipped}
  assert msgs['image_too_large'].startswith(f'{path}:2: ') and '12000x12000' in msgs['image_too_large']
  assert msgs['bad_aspect_ratio'].startswith(f'{path}:3: ') and '300.0:1' in msgs['bad_aspect_ratio']
  recs, rep = _load(root, 'skip', max_image_pixels=100 * 100)  # a configurable cap
  assert [r.id for r in recs] == ['r1'] and rep.counts() == {'image_too_large': 3}


def test_16_bit_grayscale_is_scaled_not_clipped(root):
  ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
  Image.fromarray(ramp).save(root / 'images' / 'ct16.png')
  assert Image.open(root / 'images' / 'ct16.png').mode.startswith('I')
  (root / 'train.jsonl').write_text(_line(1, image='images/ct16.png') + '\n')
  recs, _ = _load(root)
  px = np.asarray(schema.load_image(recs[0]))[..., 0].astype(float)
  assert (px == 255).mean() < 0.01 and px.min() == 0 and px.max() == 255
  np.testing.assert_allclose(px.ravel(), ramp.ravel() / 257.0, atol=1.0)
  built = np.asarray(Image.open(__import__('io').BytesIO(tfds_builders._png(recs[0].image))))
  np.testing.assert_array_equal(built, np.asarray(schema.load_image(recs[0])))  # the TFDS copy agrees


def test_alpha_is_composited_on_white_as_transformers_does(root):
  from transformers.image_transforms import convert_to_rgb
  rng = np.random.default_rng(0)
  rgba = Image.fromarray(rng.integers(0, 256, (32, 40, 4), dtype=np.uint8), 'RGBA')
  rgba.save(root / 'images' / 'a.png')
  la = Image.fromarray(rng.integers(0, 256, (32, 40, 2), dtype=np.uint8), 'LA')
  la.save(root / 'images' / 'la.png')
  for name in ('a.png', 'la.png'):
    with Image.open(root / 'images' / name) as im:
      want = convert_to_rgb(im, return_numpy=True)
    got = np.asarray(images.load_rgb(str(root / 'images' / name)))
    np.testing.assert_array_equal(got, want)
  transparent = np.zeros((8, 8, 4), np.uint8)
  Image.fromarray(transparent, 'RGBA').save(root / 'images' / 't.png')
  assert (np.asarray(images.load_rgb(str(root / 'images' / 't.png'))) == 255).all()  # white, not black


def test_cmyk_and_exif_rotated_jpegs(root):
  cmyk = Image.new('CMYK', (40, 20), (0, 255, 255, 0))  # pure red in CMYK
  cmyk.save(root / 'images' / 'cmyk.jpg', quality=95)
  rgb = np.asarray(images.load_rgb(str(root / 'images' / 'cmyk.jpg'))).astype(int)
  assert rgb.shape == (20, 40, 3) and rgb[..., 0].mean() > 200 and rgb[..., 1:].mean() < 60
  a = np.zeros((20, 40, 3), np.uint8)
  a[:, :20] = 255  # left half white
  im = Image.fromarray(a)
  exif = im.getexif()
  exif[0x0112] = 6  # orientation: stored rotated, display rotated 90 degrees clockwise
  im.save(root / 'images' / 'rot.jpg', exif=exif, quality=95)
  (root / 'train.jsonl').write_text(_line(1, image='images/rot.jpg') + '\n')
  recs, _ = _load(root)
  up = np.asarray(schema.load_image(recs[0])).astype(int)
  assert up.shape == (40, 20, 3)  # upright: as viewers show it
  assert up[:20].mean() > 200 and up[20:].mean() < 50  # the white half is now on top


# ------------------------------------------------------------------------------------------------- scale


# VmHWM (peak RSS of this process image; getrusage's ru_maxrss would carry the forking parent's peak over exec)
_MEASURE = """
import json, sys
from medad_jax.data import loader
def kb(field):
  return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(field + ':'))
base = kb('VmRSS')
recs, rep = loader.load_jsonl_dir(sys.argv[1])
print(json.dumps({'records': len(recs), 'now': kb('VmRSS') - base, 'peak': kb('VmHWM') - base}))
"""


def test_100k_records_load_in_bounded_memory(root):
  """100,000 records over 40 large images: the loader's peak memory exceeds what the loaded records hold by less
  than two decoded images -- the JSONL file (> 30 MB) is not read whole -- and what stays is the records, not
  decoded images (all 40 would take 235 MB). Measured in a fresh process (peak RSS vs RSS after the load, records
  still alive)."""
  import subprocess
  import sys
  rng = np.random.default_rng(0)
  for k in range(40):  # 1400x1400 RGB: 5.9 MB decoded each
    Image.fromarray(np.tile(rng.integers(0, 256, (1, 1400, 3), dtype=np.uint8), (1400, 1, 1))).save(
        root / 'images' / f'{k}.png')
  with open(root / 'train.jsonl', 'w') as f:
    for i in range(100_000):
      f.write(_line(i, image=f'images/{i % 40}.png', image_id=str(i % 40)) + '\n')
  assert os.path.getsize(root / 'train.jsonl') > 30e6
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # glibc's fixed mmap threshold: a freed large buffer goes back to the OS, so peak - now is what was transient
  env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '131072'}
  out = subprocess.run([sys.executable, '-c', _MEASURE, str(root)], capture_output=True, text=True, cwd=repo,
                       timeout=600, env=env)
  assert out.returncode == 0, out.stderr
  m = json.loads(out.stdout.strip().splitlines()[-1])
  assert m['records'] == 100_000
  assert m['now'] < 100_000 * 2000, m  # ~1.3 kB per record kept; the 40 decoded images would add 235 MB
  assert m['peak'] - m['now'] < 12e6, m  # transient: < 2 decoded images, far below the file or all images


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_errors_are_one_line(root, capsys):
  (root / 'train.jsonl').write_text(_line(1, question='<|im_end|>') + '\n')
  assert data_cli(['inspect', '--jsonl_dir', str(root)]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith(f'error: {root / "train.jsonl"}:1: [reserved_text]')
  assert data_cli(['inspect', '--jsonl_dir', str(root / 'absent')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'does not exist' in err
