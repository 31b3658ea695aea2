"""TFDS builders (``array_record``, no TensorFlow needed) for ``medad-synth`` and a MedAD-38K directory, and a
random-access record source over a built split for grain.

One TFDS example = one image with all its questions (``qa`` sequence), so an image is stored once however many
questions it has. The features avoid everything that needs TensorFlow at write time (ragged nested text does:
options are four ``Text`` fields), images are PNG bytes, and ``disable_shuffling=True`` keeps examples in
generation order so that ``info.metadata`` can hold each split's ``image_ids`` and per-image question counts.
``RecordSource`` uses those to map a flat question index to ``(example, question)`` without decoding anything, and
reads images with ``SkipDecoding`` so records carry PNG bytes (decoded later, by the preprocessing function).

Build with ``build_synth(cfg, data_dir)`` / ``build_medad38k(manual_dir, data_dir)`` or the CLI
(``python -m medad_jax.data build ...``); read with ``RecordSource(builder_dir, split)``.

Caching: a build is reused only for the same data. A medad-synth build is named by every generator setting; a
MedAD directory's build by the loader settings and ``medad_jax.data.fingerprint.source_fingerprint`` of the
directory (its real path, the JSONL files' contents, every image's path, size and modification time), so another
directory, or the same one after an edit, is built afresh. The small tokenizer is cached by the builder directory,
hence by the same key. TFDS's own first-run lines ("Downloading and preparing dataset Unknown size", "Using custom
data configuration"; nothing is downloaded) are replaced by ours: what is built from where, and where it is cached.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import logging
import time
from typing import Iterable, Sequence

import filelock
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from medad_jax.data import fingerprint, images, loader, synth
from medad_jax.data.regions import REGIONS
from medad_jax.data.schema import ANATOMIES, LETTERS, MODALITIES, TASKS, MedADRecord

log = logging.getLogger(__name__)

_NO_REGION = 'none'
_IMAGE_FIELDS = ('modality', 'anatomy', 'region', 'pathology', 'abnormal', 'source')


def features() -> tfds.features.FeaturesDict:
  """One example per image; ``qa`` holds its questions. Empty text / ``abnormal = -1`` mean "not given"."""
  return tfds.features.FeaturesDict({
      'image_id': tfds.features.Text(),
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
      'modality': tfds.features.ClassLabel(names=MODALITIES),
      'anatomy': tfds.features.ClassLabel(names=ANATOMIES),
      'region': tfds.features.ClassLabel(names=(_NO_REGION,) + REGIONS),
      'pathology': tfds.features.Text(),
      'abnormal': np.int8,
      'source': tfds.features.Text(),
      'qa': tfds.features.Sequence({
          'id': tfds.features.Text(),
          'task': tfds.features.ClassLabel(names=TASKS),
          'question': tfds.features.Text(),
          **{f'option_{l.lower()}': tfds.features.Text() for l in LETTERS},
          'answer': tfds.features.ClassLabel(names=LETTERS),
          'cot': tfds.features.Text(),
      }),
  })


def _png(image: str | bytes) -> bytes:
  """PNG bytes of an image file or encoded bytes: 8-bit RGB by ``images.to_rgb`` (EXIF orientation, 16-bit
  scaling, alpha on white), re-encoded unless already an RGB PNG."""
  raw = image if isinstance(image, bytes) else open(image, 'rb').read()
  with Image.open(io.BytesIO(raw)) as im:
    if im.format == 'PNG' and im.mode == 'RGB' and im.info.get('transparency') is None:
      return raw
    im.load()
    buf = io.BytesIO()
    images.to_rgb(im).save(buf, format='PNG')
    return buf.getvalue()


def example_from_records(records: Sequence[MedADRecord], png: bytes | None = None) -> dict:
  """The TFDS example of one image. All records must share the image and its image-level labels."""
  r0 = records[0]
  for r in records[1:]:
    for f in ('image',) + _IMAGE_FIELDS:
      if getattr(r, f) != getattr(r0, f):
        raise ValueError(f'records {r0.id!r} and {r.id!r} of image {r0.image_id!r} disagree on {f!r}: '
                         f'{getattr(r0, f)!r} vs {getattr(r, f)!r}')
  return {
      'image_id': r0.image_id, 'image': png if png is not None else _png(r0.image), 'modality': r0.modality,
      'anatomy': r0.anatomy, 'region': r0.region or _NO_REGION, 'pathology': r0.pathology or '',
      'abnormal': -1 if r0.abnormal is None else int(r0.abnormal), 'source': r0.source,
      'qa': [{'id': r.id, 'task': r.task, 'question': r.question,
              **{f'option_{l.lower()}': o for l, o in zip(LETTERS, r.options)},
              'answer': r.answer, 'cot': r.cot or ''} for r in records],
  }


def _s(b) -> str:
  return b.decode('utf-8') if isinstance(b, bytes) else str(b)


def records_from_example(ex: dict, split: str) -> list[MedADRecord]:
  """Inverse of ``example_from_records`` for an example read with ``SkipDecoding`` on the image."""
  qa = ex['qa']
  region = ([_NO_REGION] + list(REGIONS))[int(ex['region'])]
  abnormal = int(ex['abnormal'])
  out = []
  for q in range(len(qa['id'])):
    cot = _s(qa['cot'][q])
    out.append(MedADRecord(
        id=_s(qa['id'][q]), image_id=_s(ex['image_id']), image=bytes(ex['image']),
        modality=MODALITIES[int(ex['modality'])], anatomy=ANATOMIES[int(ex['anatomy'])],
        task=TASKS[int(qa['task'][q])], question=_s(qa['question'][q]),
        options=tuple(_s(qa[f'option_{l.lower()}'][q]) for l in LETTERS), answer=LETTERS[int(qa['answer'][q])],
        source=_s(ex['source']), split=split, cot=cot or None, region=None if region == _NO_REGION else region,
        pathology=_s(ex['pathology']) or None, abnormal=None if abnormal < 0 else bool(abnormal)))
  return out


def group_by_image(records: Iterable[MedADRecord]) -> dict[str, dict[str, list[MedADRecord]]]:
  """``{split: {image_id: [records]}}`` in first-seen order; an image may not span splits."""
  out: dict[str, dict[str, list[MedADRecord]]] = collections.defaultdict(dict)
  split_of: dict[str, str] = {}
  for r in records:
    if split_of.setdefault(r.image_id, r.split) != r.split:
      raise ValueError(f'image {r.image_id!r} appears in splits {split_of[r.image_id]!r} and {r.split!r} '
                       f'(record {r.id!r}): a 70/30 split must be by image')
    out[r.split].setdefault(r.image_id, []).append(r)
  return dict(out)


def _set_index_metadata(info: tfds.core.DatasetInfo, groups: dict[str, dict[str, list]]) -> None:
  info.metadata['image_ids'] = {s: list(g) for s, g in groups.items()}
  info.metadata['qa_counts'] = {s: [len(v) for v in g.values()] for s, g in groups.items()}


# ---------------------------------------------------------------------------------------------- builders


class _PackagedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Pins ``code_path`` to this file. TFDS's default for builders inside a package probes
  ``importlib_resources.abc.Traversable``, which needs the optional ``importlib_resources`` backport (an
  ``etils[epath]`` extra that this environment lacks); the file path is what it would compute anyway."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _what(self) -> str:
    raise NotImplementedError

  def _log_download_bytes(self) -> None:  # TFDS prints "Downloading and preparing dataset Unknown size ..."
    self._t_build = time.time()
    log.info('data: building %s into %s (once: later runs with the same data reuse it)', self._what(),
             self.data_dir)

  def _log_download_done(self) -> None:  # TFDS prints "Dataset ... downloaded and prepared to ..."
    counts = ', '.join(f'{s}: {sum(self.info.metadata["qa_counts"].get(s, []))} questions'
                       for s in sorted(self.info.metadata.get('qa_counts', {})))
    log.info('data: built in %.1f s (%s); cached at %s', time.time() - getattr(self, '_t_build', time.time()),
             counts, self.data_dir)


class _QuietCustomConfig(logging.Filter):
  """Drops TFDS's "Using custom data configuration" warning: every MedAD build uses one by design (its name is
  the source fingerprint), so the warning says nothing a user can act on."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Using custom data configuration')


logging.getLogger('absl').addFilter(_QuietCustomConfig())


@dataclasses.dataclass(eq=False)
class MedadSynthConfig(tfds.core.BuilderConfig):
  synth: synth.SynthConfig = synth.SynthConfig()


def synth_builder_config(cfg: synth.SynthConfig) -> MedadSynthConfig:
  # Every field that changes the data is in the name (non-default fractions and letter-free thoughts as suffixes,
  # so the names of earlier builds stay valid): two configs never share a cached build.
  default = synth.SynthConfig()
  name = f'n{cfg.num_images}_s{cfg.seed}_px{cfg.image_size}_{cfg.pairs}'
  if cfg.abnormal_fraction != default.abnormal_fraction:
    name += f'_ab{cfg.abnormal_fraction:g}'
  if cfg.test_fraction != default.test_fraction:
    name += f'_te{cfg.test_fraction:g}'
  if not cfg.cot_letters:
    name += '_textcot'
  if cfg.lesion_scale != default.lesion_scale:
    name += f'_ls{cfg.lesion_scale:g}'
  return MedadSynthConfig(name=name, synth=cfg, description=f'medad-synth {cfg}')


class MedadSynth(_PackagedBuilder):
  """``medad-synth`` images with five VQA questions each (see ``medad_jax.data.synth``)."""
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [synth_builder_config(c) for c in (synth.SynthConfig.tiny(), synth.SynthConfig.small(),
                                                       synth.SynthConfig.full())]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features(),
                                 metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _what(self) -> str:
    c = self.builder_config.synth
    return (f'the medad-synth benchmark from its generator ({c.num_images} images of {c.image_size} px, '
            f'seed {c.seed})')

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config.synth
    plan = synth.SynthPlan(cfg)
    ids = {s: [k for k in range(cfg.num_images) if plan.split(k) == s] for s in ('train', 'test')}
    self.info.metadata['image_ids'] = {s: [plan.image_id(k) for k in ks] for s, ks in ids.items()}
    self.info.metadata['qa_counts'] = {s: [len(TASKS)] * len(ks) for s, ks in ids.items()}
    return {s: self._generate_examples(ks) for s, ks in ids.items() if ks}

  def _generate_examples(self, indices):
    cfg = self.builder_config.synth
    for img, recs in synth.generate(cfg, indices):
      yield img.image_id, example_from_records(recs, png=img.png)


@dataclasses.dataclass(eq=False)
class Medad38kConfig(tfds.core.BuilderConfig):
  policy: str = 'strict'
  check_images: bool = True
  max_image_pixels: int = images.DEFAULT_MAX_PIXELS
  max_aspect_ratio: float = images.MAX_ASPECT_RATIO
  source: str = ''          # the directory's real path and fingerprint (fingerprint.Fingerprint.describe())


class Medad38k(_PackagedBuilder):
  """MedAD-38K (paper §3.1) from a directory of ``*.jsonl`` + images (``medad_jax.data.loader`` layout)."""
  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'MedAD-38K is gated until the paper is accepted. Put its JSONL annotation files and images in one directory '
      '(see medad_jax/data/loader.py for the layout) and pass it as manual_dir.')
  BUILDER_CONFIGS = [Medad38kConfig(name='strict', policy='strict'), Medad38kConfig(name='skip', policy='skip')]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features(),
                                 metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _what(self) -> str:
    return f'the MedAD benchmark from the JSONL directory {self.builder_config.source}'

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    c = self.builder_config
    records, report = loader.load_jsonl_dir(root, policy=c.policy, check_images=c.check_images,
                                            max_image_pixels=c.max_image_pixels, max_aspect_ratio=c.max_aspect_ratio)
    log.info('data: %s (policy %s)', report.summary(), c.policy)
    groups = group_by_image(records)
    _set_index_metadata(self.info, groups)
    self.info.metadata['load_report'] = {'loaded': report.loaded, 'skipped': report.counts(),
                                         'skipped_records': [dataclasses.asdict(s) for s in report.skipped],
                                         'empty_files': report.empty_files}
    self.info.metadata['source'] = {'dir': root, 'fingerprint': c.source}
    return {s: self._generate_examples(g) for s, g in groups.items()}

  def _generate_examples(self, groups):
    for image_id, recs in groups.items():
      yield image_id, example_from_records(recs)


def _config(builder_cls, config: tfds.core.BuilderConfig):
  """TFDS wants a class-level config by name (an equal object is refused), a custom one as the object."""
  known = builder_cls.builder_configs.get(config.name)
  if known is not None and dataclasses.asdict(known) != dataclasses.asdict(config):  # configs compare by identity
    raise ValueError(f'config name {config.name!r} is taken by {known}')
  return config.name if known is not None else config


def _build_lock(data_dir: str, builder_cls, config):
  """An inter-process lock on one build (builder + config name) in ``data_dir``: processes that share a local
  cache (a sweep's seeds side by side) build it once; the others wait, then reuse it. Without it the second
  finisher failed inside TFDS on renaming its build onto the first one's. A cache on an object store
  (``gs://...``) has no file locks: none is taken there (processes sharing such a cache still race)."""
  if '://' in str(data_dir):
    return contextlib.nullcontext()
  name = config if isinstance(config, str) else config.name
  lock_dir = epath.Path(data_dir) / builder_cls.name
  lock_dir.mkdir(parents=True, exist_ok=True)
  return filelock.FileLock(str(lock_dir / f'{name}.lock'))


def build_synth(cfg: synth.SynthConfig, data_dir: str) -> str:
  """Builds (or reuses) the ``array_record`` dataset for ``cfg``; returns its builder directory."""
  config = _config(MedadSynth, synth_builder_config(cfg))
  with _build_lock(data_dir, MedadSynth, config):
    b = MedadSynth(config=config, data_dir=data_dir, file_format='array_record')
    if b.is_prepared():
      log.info('data: reusing the medad-synth build at %s', b.data_dir)
    b.download_and_prepare()
  return str(b.data_dir)


def medad38k_config(manual_dir: str, policy: str = 'strict', check_images: bool = True,
                    max_image_pixels: int = images.DEFAULT_MAX_PIXELS,
                    max_aspect_ratio: float = images.MAX_ASPECT_RATIO) -> Medad38kConfig:
  """The builder config of a MedAD directory: named by the policy and the fingerprint of the directory and of the
  loader settings (module docstring), so a different or changed directory never reuses a build."""
  if policy not in loader.POLICIES:
    raise ValueError(f'policy must be one of {loader.POLICIES}, got {policy!r}')
  settings = json.dumps({'policy': policy, 'check_images': check_images, 'max_image_pixels': max_image_pixels,
                         'max_aspect_ratio': max_aspect_ratio, 'version': str(Medad38k.VERSION)}, sort_keys=True)
  fp = fingerprint.source_fingerprint(manual_dir, extra=settings)
  name = f'{policy}{"" if check_images else "_nocheck"}_{fp.short}'
  return Medad38kConfig(name=name, policy=policy, check_images=check_images, max_image_pixels=max_image_pixels,
                        max_aspect_ratio=max_aspect_ratio, source=fp.describe(),
                        description=f'MedAD directory {fp.describe()}')


def build_medad38k(manual_dir: str, data_dir: str, policy: str = 'strict', check_images: bool = True,
                   max_image_pixels: int = images.DEFAULT_MAX_PIXELS,
                   max_aspect_ratio: float = images.MAX_ASPECT_RATIO) -> str:
  """Builds (or reuses, for the same directory contents and settings) the dataset of the MedAD directory
  ``manual_dir``; returns its builder directory."""
  cfg = medad38k_config(manual_dir, policy, check_images, max_image_pixels, max_aspect_ratio)
  config = _config(Medad38k, cfg)
  with _build_lock(data_dir, Medad38k, config):
    b = Medad38k(config=config, data_dir=data_dir, file_format='array_record')
    if b.is_prepared():
      log.info('data: reusing the build of %s at %s', cfg.source, b.data_dir)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return str(b.data_dir)


# ---------------------------------------------------------------------------------------------- reading


class RecordSource:
  """Random access to the questions of one split of a built dataset: ``len`` = number of questions, item ``i``
  is a ``MedADRecord`` whose ``image`` holds PNG bytes. Picklable (reopens the files), so grain workers can use it.
  """

  def __init__(self, builder_dir: str, split: str):
    self.builder_dir, self.split = builder_dir, split
    self._open()

  def _open(self):
    builder = tfds.builder_from_directory(self.builder_dir)
    meta = builder.info.metadata
    if meta is None or 'qa_counts' not in meta or self.split not in meta['qa_counts']:
      raise ValueError(f'{self.builder_dir}: no qa_counts for split {self.split!r} in the dataset metadata; '
                       f'was it built by medad_jax.data.tfds_builders?')
    self._ds = builder.as_data_source(split=self.split, decoders={'image': tfds.decode.SkipDecoding()})
    self._image_ids = list(meta['image_ids'][self.split])
    counts = np.asarray(meta['qa_counts'][self.split], np.int64)
    if len(counts) != len(self._ds):
      raise ValueError(f'{self.builder_dir}/{self.split}: metadata lists {len(counts)} images, files hold '
                       f'{len(self._ds)}')
    self._offsets = np.concatenate([[0], np.cumsum(counts)])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, i: int) -> MedADRecord:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f'question index {i} outside [0, {len(self)})')
    j = int(np.searchsorted(self._offsets, i, side='right')) - 1
    ex = self._ds[j]
    if _s(ex['image_id']) != self._image_ids[j]:
      raise ValueError(f'{self.builder_dir}/{self.split}: example {j} is {_s(ex["image_id"])!r}, metadata says '
                       f'{self._image_ids[j]!r} (examples were reordered?)')
    return records_from_example(ex, self.split)[i - int(self._offsets[j])]

  def iter_records(self) -> Iterable[MedADRecord]:
    """Every question in index order, reading each image's example once (``self[i]`` reads it once per
    question); one example in memory at a time."""
    for j in range(len(self._ds)):
      yield from records_from_example(self._ds[j], self.split)

  def __getstate__(self):
    return {'builder_dir': self.builder_dir, 'split': self.split}

  def __setstate__(self, state):
    self.builder_dir, self.split = state['builder_dir'], state['split']
    self._open()

  def __repr__(self) -> str:
    return f'RecordSource({self.builder_dir!r}, split={self.split!r}, questions={len(self)})'
