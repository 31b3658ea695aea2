r"""Pixel ceilings: how much of each task a small CNN reads off the images a run's model sees.

    python -m medad_jax.bench probe                                        # the embedded default (congrpo)
    python -m medad_jax.bench probe --config.data.image_size=112 --config.data.synth_images=1000
    python -m medad_jax.bench probe --config=congrpo --epochs 40 --json probe.json
    python -m medad_jax.bench probe --arch vit          # the run's own vision tower instead of the CNN

What it measures: the data of a run config (``--config=<name>[:variants]`` and ``--config.<key>=<value>``
overrides, parsed and checked as ``python -m medad_jax.launch`` does; default ``--config=congrpo``), built exactly
as the run builds it (``train.pipeline.build_data``, the tokenizer and processor, the length limits of
``data.lengths.apply_limits``: the same train / test questions). Each image is taken as the model sees it: the
processor's resized, normalised patches put back into an ``[H, W, 3]`` picture (:func:`model_view`).

One :class:`PixelCNN` (three stride-2 convolutions, a max-pool onto 4 x 4 cells, a dense layer, one linear head per
task) is trained from scratch on the *train* questions: each task's head predicts the correct answer's text among
that task's answer texts (every option text of its train questions). It is scored on the *test* questions: its
answer is the question's option whose text gets the highest logit of the task's head. That is the question a policy
answers (pick one of the four options from the image), with no language to learn, so its accuracy is a floor on
what the pixels allow -- a ceiling a VLM trained from scratch on the same data can hope to approach.
With ``--arch vit`` the CNN is replaced by the run's own vision tower under the same kind of head
(:class:`PixelViT`): what the tower's architecture can read when its output is supervised directly.
It is printed beside the blind answer prior of the run's evaluation (``train.evaluate.prior_baseline``, the
``Answer prior (no image)`` row: the most frequent correct text per task in train) and the embedded run's targets:
every task >= prior + 15 points, anomaly detection >= 77 %, lesion localisation >= 60 %, overall (all test
questions) >= 80 %.

Deterministic on one machine: fixed probe seeds (``--seeds``, default three; mean ± std) for the initialisation
and the batch order; no early stopping and no choice made on the test questions (the settings were chosen on
another medad-synth seed, ``--config.data.synth_seed=1``). Unlike the other benchmarks it times nothing: its
yardstick is the blind prior. WORKSPACE.md ("pixel ceilings") has the figures of the embedded default and of data
variants (``data.image_size``, ``data.synth_images``, ``data.synth_lesion_scale``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medad_jax.model.layers import Linear
from medad_jax.train.vision_warmup import (TowerClassifier, answer_correct, answer_labels, fit, multi_head_loss,
                                          norm_text, tower_logits, tower_step)

log = logging.getLogger(__name__)

# The embedded run's targets (fractions): per task at least prior + MARGIN, and these floors; overall at least
# OVERALL_TARGET.
MARGIN = 0.15
TASK_FLOORS = {'anomaly_detection': 0.77, 'lesion_localization': 0.60}
OVERALL_TARGET = 0.80


class PixelCNN(nnx.Module):
  """Stride-2 3x3 convolutions (ReLU), an optional max-pool of the last feature map onto a ``grid x grid`` array
  of cells, a dense layer (ReLU) and one linear head per entry of ``num_classes``.

  ``x_BHWC`` float images of side ``size``; returns a tuple of logits, one ``[B, n]`` array per head.
  """

  def __init__(self, size: int, num_classes: Sequence[int], rngs: nnx.Rngs, *,
               channels: Sequence[int] = (16, 32, 32), hidden: int = 64, grid: int | None = None):
    widths = (3, *channels)
    self.convs = nnx.List([nnx.Conv(c_in, c_out, (3, 3), strides=2, rngs=rngs)
                           for c_in, c_out in zip(widths[:-1], widths[1:])])
    side = size
    for _ in channels:
      side = -(-side // 2)   # 'SAME' padding, stride 2
    self.grid = grid
    cells = side if grid is None else grid
    self.fc = Linear(cells * cells * channels[-1], hidden, use_bias=True, rngs=rngs, init_std=0.02)
    self.heads = nnx.List([Linear(hidden, n, use_bias=True, rngs=rngs) for n in num_classes])

  def __call__(self, x_BHWC):
    for c in self.convs:
      x_BHWC = jax.nn.relu(c(x_BHWC))
    if self.grid is not None:
      B, H, W, C = x_BHWC.shape
      g = self.grid
      ch, cw = -(-H // g), -(-W // g)
      x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, ch * g - H), (0, cw * g - W), (0, 0)))  # zeros: below any ReLU max
      x_BHWC = x_BHWC.reshape(B, g, ch, g, cw, C).max((2, 4))
    h = jax.nn.relu(self.fc(x_BHWC.reshape(x_BHWC.shape[0], -1)))
    return tuple(head(h) for head in self.heads)


def PixelViT(vision_cfg, tokens: int, num_classes: Sequence[int], rngs: nnx.Rngs, *, hidden: int = 64):
  """The run's own vision tower (``VisionTransformer`` of its ``VisionConfig``, trained from scratch) under the same
  kind of head as :class:`PixelCNN`: ``train.vision_warmup.TowerClassifier``, the head the miniature's vision
  warm-up stage trains the policy's tower under. Next to :class:`PixelCNN` on the same data it separates what the
  tower's architecture can read from what the policy's training makes it read."""
  from medad_jax.model.vision import VisionTransformer
  return TowerClassifier(VisionTransformer(vision_cfg, rngs=rngs), tokens, num_classes, rngs, hidden=hidden)


def view_to_patches(x_HWC: np.ndarray, vision_cfg) -> np.ndarray:
  """The inverse of :func:`model_view` for a still image: ``[H, W, C]`` -> the processor's ``pixel_values[L, P]``
  (the frame repeated over the temporal patch, as the processor does for an image)."""
  v = vision_cfg
  m, p, tp = v.spatial_merge_size, v.patch_size, v.temporal_patch_size
  H, W, C = x_HWC.shape
  gh, gw = H // p, W // p
  x = x_HWC.reshape(gh // m, m, p, gw // m, m, p, C).transpose(0, 3, 1, 4, 6, 2, 5)   # (h/m, w/m, m, m, C, p, p)
  x = np.repeat(x[..., :, None, :, :], tp, axis=-3)                                   # (..., C, Tp, p, p)
  return np.ascontiguousarray(x.reshape(gh * gw, C * tp * p * p), dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """How the probe trains (fixed before any test question is read)."""
  epochs: int = 60
  batch_size: int = 32
  lr: float = 2e-3
  weight_decay: float = 1e-4
  seed: int = 0
  channels: tuple[int, ...] = (16, 32, 64)
  hidden: int = 64
  grid: int | None = 4   # max-pool the last feature map onto 4 x 4 cells (the lesion regions are quadrants + centre)
  arch: str = 'cnn'      # 'cnn': PixelCNN; 'vit': the run's own vision tower (PixelViT)


def _loss(model, x_BHWC, y_BK):
  return multi_head_loss(model(x_BHWC), y_BK)


@nnx.jit
def _step(model, opt, x, y):
  loss, grads = nnx.value_and_grad(_loss)(model, x, y)
  opt.update(model, grads)
  return loss


@nnx.jit
def _logits(model, x):
  return model(x)


class _ViTInputs:
  """Turns batches of model-view images into the tower's inputs (patches ``[B, L, P]`` and the meta of B images)."""

  def __init__(self, vision_cfg, image_hw: tuple[int, int]):
    from medad_jax.model.vision import vision_meta
    self.cfg = vision_cfg
    p = vision_cfg.patch_size
    self.grid = (1, image_hw[0] // p, image_hw[1] // p)
    self.tokens = self.grid[1] * self.grid[2] // vision_cfg.spatial_merge_size**2
    self._meta = {}
    self._vision_meta = vision_meta

  def meta(self, b: int):
    if b not in self._meta:
      self._meta[b] = jax.tree.map(jnp.asarray, self._vision_meta(np.tile(self.grid, (b, 1)), self.cfg))
    return self._meta[b]

  def patches(self, x_NHWC: np.ndarray) -> np.ndarray:
    return np.stack([view_to_patches(x, self.cfg) for x in x_NHWC])


def train_classifier(x_NHWC: np.ndarray, y_NK: np.ndarray, num_classes: Sequence[int], s: TrainSettings,
                     vision_cfg=None):
  """A :class:`PixelCNN` (``s.arch='cnn'``) or :class:`PixelViT` (``'vit'``, the tower of ``vision_cfg``) with a
  head per entry of ``num_classes``, trained by AdamW on images ``x`` and labels ``y[:, k]`` (class of head k, -1
  where the row has none) for ``s.epochs`` shuffled passes (the last partial batch of each pass is dropped, a
  different one each pass)."""
  if s.arch == 'cnn':
    model = PixelCNN(x_NHWC.shape[1], tuple(num_classes), nnx.Rngs(s.seed), channels=s.channels, hidden=s.hidden,
                     grid=s.grid)
  elif s.arch == 'vit':
    if vision_cfg is None:
      raise ValueError("train_classifier(arch='vit') needs the run's vision_cfg")
    vit = _ViTInputs(vision_cfg, x_NHWC.shape[1:3])
    model = PixelViT(vision_cfg, vit.tokens, tuple(num_classes), nnx.Rngs(s.seed), hidden=s.hidden)
  else:
    raise ValueError(f"probe arch {s.arch!r}; expected 'cnn' or 'vit'")
  if s.arch == 'vit':
    pv_NLP = vit.patches(x_NHWC)   # once, not per batch
    inputs, step_fn = (lambda b: (jnp.asarray(pv_NLP[b]), vit.meta(len(b)))), tower_step
  else:
    inputs, step_fn = (lambda b: (jnp.asarray(x_NHWC[b]),)), _step
  return fit(model, step_fn, inputs, y_NK, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
             weight_decay=s.weight_decay, seed=s.seed)


def predict_logits(model, x_NHWC: np.ndarray, batch_size: int = 256, vision_cfg=None) -> list[np.ndarray]:
  """Every head's logits ``[N, n_k]`` on ``x``."""
  if isinstance(model, TowerClassifier):
    vit = _ViTInputs(vision_cfg, x_NHWC.shape[1:3])
    parts = [tower_logits(model, jnp.asarray(vit.patches(x_NHWC[i:i + batch_size])),
                         vit.meta(len(x_NHWC[i:i + batch_size])))
             for i in range(0, len(x_NHWC), batch_size)]
  else:
    parts = [_logits(model, jnp.asarray(x_NHWC[i:i + batch_size])) for i in range(0, len(x_NHWC), batch_size)]
  return [np.concatenate([np.asarray(p[k]) for p in parts]) for k in range(len(parts[0]))]


# ----------------------------------------------------------------------------------------------- the data


def model_view(processor, image) -> np.ndarray:
  """``[H, W, 3]`` float32: the image as the model sees it -- the processor's patches (resized to its pixel
  bounds, normalised) put back in place (first temporal frame of each patch)."""
  pv_LP, (t, gh, gw) = processor.process_image(image)
  v = processor.vision_cfg
  m, p = v.spatial_merge_size, v.patch_size
  # transformers' Qwen2-VL patch order: (t, h/m, w/m, m, m) patches of (C, temporal, p, p) values.
  x = pv_LP.reshape(t, gh // m, gw // m, m, m, v.in_channels, v.temporal_patch_size, p, p)[0, ..., 0, :, :]
  return np.ascontiguousarray(x.transpose(0, 2, 5, 1, 3, 6, 4).reshape(gh * p, gw * p, v.in_channels)
                              .astype(np.float32))


def _records(source) -> list:
  it = source.iter_records() if hasattr(source, 'iter_records') else (source[i] for i in range(len(source)))
  return list(it)


def load_run_data(config):
  """``(train records, test records, images by image id, the model's VisionConfig)`` of the run ``config``
  describes, built as ``train.pipeline.setup`` builds them (dataset, tokenizer, processor, length limits)."""
  from medad_jax.data.lengths import apply_limits
  from medad_jax.data.schema import load_image
  from medad_jax.train import pipeline as pl
  data = pl.build_data(config)
  tok = pl.build_tokenizer(config, data)
  proc = pl.build_processor(config, tok, pl.model_config(config, tok))
  data = dataclasses.replace(data, **apply_limits(config.data, data, proc))
  train, test = _records(data.train), _records(data.test)
  images: dict[str, np.ndarray] = {}
  for r in train + test:
    if r.image_id not in images:
      images[r.image_id] = model_view(proc, load_image(r))
  shapes = {x.shape for x in images.values()}
  if len(shapes) != 1:
    raise ValueError(f'the probe needs one image size after the processor\'s resize; this dataset has {len(shapes)} '
                     f'({sorted(shapes)[:5]}...)')
  return train, test, images, proc.vision_cfg


@dataclasses.dataclass
class TaskResult:
  task: str
  n_train: int
  n_test: int
  classes: int
  prior: float
  probe: float        # mean over the probe seeds
  probe_std: float    # population std over the probe seeds
  target: float

  @property
  def meets(self) -> bool:
    return self.probe >= self.target


def probe(train: Sequence, test: Sequence, images: dict, tasks: Sequence[str], s: TrainSettings,
          vision_cfg=None) -> dict[str, np.ndarray]:
  """Trains one :class:`PixelCNN` with a head per task on the train questions and answers every test question:
  ``{task: correctness (1 / 0) of each of its test questions, in test order}``."""
  tasks = list(tasks)
  train = [r for r in train if r.task in tasks]
  test = [r for r in test if r.task in tasks]
  labels, index, ids, y = answer_labels(train, tasks)
  model = train_classifier(np.stack([images[i] for i in ids]), y, [len(ls) for ls in labels], s, vision_cfg)
  test_ids = sorted({r.image_id for r in test})
  pos = {t: i for i, t in enumerate(test_ids)}
  logits = predict_logits(model, np.stack([images[i] for i in test_ids]), vision_cfg=vision_cfg)
  return answer_correct(logits, pos, index, tasks, test)


def run_probe(config, s: TrainSettings, data=None, seeds: Sequence[int] = (0,)) -> tuple[list[TaskResult], dict]:
  """The probe on the run's data (``data``: a :func:`load_run_data` result, loaded when None), once per probe seed
  in ``seeds`` (``s.seed`` is replaced); returns the per-task results (Table 1's order, mean and std over the
  seeds) and the overall figures."""
  from medad_jax.train.evaluate import TABLE1, prior_baseline
  t0 = time.perf_counter()
  train, test, images, vision_cfg = data if data is not None else load_run_data(config)
  data_s = time.perf_counter() - t0
  tasks = [t for t, _ in TABLE1]
  missing = [t for t in tasks if not any(r.task == t for r in train) or not any(r.task == t for r in test)]
  if missing:
    raise ValueError(f'tasks {missing} have no train or no test questions; the probe needs both for every task')
  prior = prior_baseline(train, test).per_seed[0]
  t0 = time.perf_counter()
  runs = []
  for seed in seeds:
    runs.append(probe(train, test, images, tasks, dataclasses.replace(s, seed=int(seed)), vision_cfg))
    log.info('probe seed %d: %s', seed, ', '.join(f'{t} {100 * runs[-1][t].mean():.1f} %' for t in tasks))
  train_s = time.perf_counter() - t0
  acc = {t: np.array([c[t].mean() for c in runs]) for t in tasks}
  acc_all = np.array([np.concatenate([c[t] for t in tasks]).mean() for c in runs])
  results = [TaskResult(t, sum(r.task == t for r in train), len(runs[0][t]),
                        len({norm_text(o) for r in train if r.task == t for o in r.options}), prior[t],
                        float(acc[t].mean()), float(acc[t].std()), max(prior[t] + MARGIN, TASK_FLOORS.get(t, 0.0)))
             for t in tasks]
  overall = {'n_train': len(train), 'n_test': len(test), 'prior': prior['overall'], 'probe': float(acc_all.mean()),
             'probe_std': float(acc_all.std()), 'seeds': [int(x) for x in seeds],
             'per_seed': {t: acc[t].tolist() for t in tasks} | {'overall': acc_all.tolist()}, 'target': OVERALL_TARGET,
             'images': len(images), 'image_shape': list(next(iter(images.values())).shape), 'data_s': data_s,
             'train_s': train_s, 'arch': s.arch}
  return results, overall


def format_report(results: Sequence[TaskResult], overall: dict) -> str:
  """The per-task table (accuracies in %, the probe's as mean ± std over its seeds) and an overall row."""
  n = len(overall['seeds'])
  pm = lambda m, sd: f'{100 * m:.2f}' + (f' ± {100 * sd:.2f}' if n > 1 else '')  # noqa: E731
  header = ('task', 'n_train', 'n_test', 'classes', 'prior %', 'probe %', 'target %', 'meets')
  rows = [(r.task, r.n_train, r.n_test, r.classes, f'{100 * r.prior:.2f}', pm(r.probe, r.probe_std),
           f'{100 * r.target:.2f}', 'yes' if r.meets else 'no') for r in results]
  rows.append(('overall', overall['n_train'], overall['n_test'], '-', f'{100 * overall["prior"]:.2f}',
               pm(overall['probe'], overall['probe_std']), f'{100 * overall["target"]:.2f}',
               'yes' if overall['probe'] >= overall['target'] else 'no'))
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  line = lambda cells: '  '.join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  sep = '-' * len(line(header))
  h, w, _ = overall['image_shape']
  model = {'cnn': 'a PixelCNN', 'vit': "the run's vision tower (PixelViT)"}[overall.get('arch', 'cnn')]
  title = (f'pixel ceilings: {model} (one head per task) on {overall["images"]} images of {h}x{w} px as the '
           f'model sees them, {n} probe seed(s)\n(targets: prior + {100 * MARGIN:.0f} points, anomaly detection >= '
           f'{100 * TASK_FLOORS["anomaly_detection"]:.0f} %, lesion localisation >= '
           f'{100 * TASK_FLOORS["lesion_localization"]:.0f} %, overall >= {100 * OVERALL_TARGET:.0f} %)')
  return '\n'.join([title, sep, line(header), sep, *map(line, rows), sep,
                    f'data {overall["data_s"]:.1f} s, training + scoring {overall["train_s"]:.1f} s'])


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """Probe flags and the run-config flags (``--config=...``, ``--config.<key>=<value>``), kept apart."""
  p = argparse.ArgumentParser(prog='python -m medad_jax.bench probe', description=__doc__.split('\n')[0],
                              epilog='Run-config flags: --config=<name>[:variants] (default congrpo) and '
                                     '--config.<key>=<value>, as for python -m medad_jax.launch.')
  d = TrainSettings()
  p.add_argument('--arch', choices=('cnn', 'vit'), default=d.arch,
                 help="cnn: a small CNN; vit: the run's own vision tower from scratch under the same head")
  p.add_argument('--epochs', type=int, default=d.epochs, help='passes over the training images')
  p.add_argument('--batch-size', type=int, default=d.batch_size)
  p.add_argument('--lr', type=float, default=d.lr, help='AdamW learning rate')
  p.add_argument('--weight-decay', type=float, default=d.weight_decay)
  p.add_argument('--seeds', default='0,1,2', help='probe seeds (initialisation and batch order), comma-separated')
  p.add_argument('--json', default=None, help='also write the results to this JSON file')
  config_argv = [a for a in argv if a.startswith('--config=') or a.startswith('--config.')]
  args = p.parse_args([a for a in argv if a not in config_argv])
  try:
    args.seeds = [int(x) for x in args.seeds.split(',') if x.strip()]
  except ValueError:
    p.error(f'--seeds: expected comma-separated integers, got {args.seeds!r}')
  if not args.seeds:
    p.error('--seeds: give at least one seed')
  if not any(a.startswith('--config=') for a in config_argv):
    config_argv = ['--config=congrpo', *config_argv]
  return args, config_argv


def main(argv: list[str]) -> int:
  from medad_jax import launch
  from medad_jax.bench import common
  common.setup_logging()
  for noisy in ('absl', 'tensorflow_datasets', 'etils', 'grain'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  args, config_argv = parse_args(argv)
  try:
    config, _ = launch.parse(['probe', *config_argv])
  except launch.ConfigError as e:
    raise SystemExit(f'python -m medad_jax.bench probe: {e}') from None
  s = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                    arch=args.arch)
  common.emit(f'machine: {common.machine_summary()}')
  common.emit(f'config: {" ".join(config_argv)}; probe: {s}, seeds {args.seeds}')
  results, overall = run_probe(config, s, seeds=args.seeds)
  common.emit(format_report(results, overall))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(common.to_jsonable({'argv': argv, 'config': config_argv, 'machine': common.machine_summary(),
                                    'settings': dataclasses.asdict(s),
                                    'tasks': [dict(dataclasses.asdict(r), meets=r.meets) for r in results],
                                    'overall': overall}), f, indent=2)
  return 0
