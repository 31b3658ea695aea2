r"""Stage 0 of the miniature, vision warm-up: the policy's own vision tower learns to see before the decoder reads it.

    python -m medad_jax.launch --config=congrpo                      # on in the embedded miniature
    python -m medad_jax.launch --config=congrpo --config.vision_warmup.enabled=False   # the tower learns only in SFT

Why it exists. The paper starts from Qwen2.5-VL-3B, whose vision encoder was pretrained on image-text data at
scale; the miniature starts from a random 4.7M model. Trained only through the decoder (SFT), the random tower
learns the global tasks (anatomy, modality: every image token carries them) but never the lesion: WORKSPACE.md
("pixel ceilings") measured that the SFT'd tower's features carry no more of a lesion than a random tower's, while
the same tower trained under a direct head reads it in seconds. This stage is the miniature's stand-in for the
pretrained encoder every real VLM starts from: before SFT, the tower (the very module the policy uses, in place)
is trained under a small classification head on the *training split* -- for each task, which answer text is
correct for the image -- and the head is then thrown away. The decoder still has to learn to read the tower,
in SFT, through language; the image-shuffled control row (``eval.image_control``) shows whether it does.

What it sees: every training image as the processor gives it to the policy (the same patches), one label per
(image, task) question: the index of the correct answer's text among all option texts of that task in the train
split (``answer_labels``). Nothing of the test split, no benchmark-specific rule: it reads any MedAD-format
multiple-choice data. The head (:class:`TowerClassifier`): the tower's merged image tokens of one image,
flattened, a dense layer (ReLU), one linear head per task; loss = sum over tasks of the mean cross-entropy.
AdamW, ``vision_warmup.epochs`` seeded passes of ``batch_size`` images; with ``vision_warmup.noise`` > 0 each
step's images get Gaussian noise of that std on their normalised patches, a fresh draw per step (a regulariser: the
head reads its training images far better than test images; WORKSPACE.md, the part of 2026-12-04, later).
Then, with ``then_epochs`` > 0, a second phase: a fresh head reading the tokens by ``then_pool`` (the miniature:
their *mean*) trains the same tower for ``then_epochs`` passes. Why: the flat head knows each token's position by
its weight index, so the tower learns to mark the lesion in the token that holds it but not to say *where* or *what*
in the features themselves; the decoder, whose attention averages the tokens' features (RoPE moves the scores, not
the values), reads those features. Under the mean head the tower has to carry the findings in what a uniform average
of its tokens gives (from scratch it cannot: the lesion's gradient is diluted ninefold; after the flat phase it
can). With ``then_position`` (off by default, on in the miniature: alone it moved the table by less than three
seeds' spread, with the miniature's three passes over the lesion tasks +2.0 points, WORKSPACE.md) the second phase
adds a position pretext: two linear heads shared by all tokens read each merged token's own row and column from its
features alone (cross-entropy, added to the task loss). Why: the decoder cannot tell the image tokens' places apart
by their positions -- at the miniature's width M-RoPE turns the height section by at most 0.032 rad per token and
the width section by at most 1.8e-4 (``rope_theta`` 1e6, head dimension 64), nothing across a 3 x 3 grid -- so
*where* a lesion is must be written in the lesion token's features, and a token that knows its own place can write
it; the tower itself has 2D RoPE, i.e. relative positions only. Measured in WORKSPACE.md ("pixel ceilings", last
parts). The warm-up itself is off by default and on in the miniature;
never useful with a pretrained checkpoint (whose tower already sees). It runs on one device, unsharded: with
several processes each trains its own copy on the same data, seed and order (deterministic on one kind of CPU).
The heavy two-process launcher test (``tests/test_launch_multiprocess.py``, ``-m heavy``) runs through it; its
five tests pass (2026-12-03).

``bench/probe.py --arch vit`` trains a fresh tower under the same head (the ceiling it measures is this stage's).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medad_jax.model.layers import Linear

log = logging.getLogger(__name__)

STAGE = 'vision_warmup'
POOLS = ('flat', 'mean', 'max')


class TowerClassifier(nnx.Module):
  """``tower`` (a ``VisionTransformer``, shared, not copied) under a head: its ``tokens`` merged image tokens of
  one image read by ``pool`` -- ``'flat'`` (concatenated: one weight per token and feature), ``'mean'`` (their
  average: what a decoder attending uniformly receives) or ``'max'`` -- a dense layer (ReLU) and one linear head
  per entry of ``num_classes``. The warm-up's first phase uses ``'flat'``: from scratch, under the other two the
  tower does not learn where a lesion is (WORKSPACE.md "pixel ceilings"); its second phase ``'mean'``.

  With ``position=(rows, cols)`` (the merged token grid, tokens in raster order as the tower returns them) two more
  linear heads, shared by all tokens, read each token's own row and column from its features alone
  (:meth:`position_loss`): the position pretext of the warm-up's second phase.

  Called on ``pixel_values[B, L, P]`` (each image's processor patches) and the ``VisionMeta`` of ``B`` such
  images; returns a tuple of logits, one ``[B, n]`` array per head.
  """

  def __init__(self, tower: nnx.Module, tokens: int, num_classes: Sequence[int], rngs: nnx.Rngs, *,
               hidden: int = 64, pool: str = 'flat', position: tuple[int, int] | None = None):
    if pool not in POOLS:
      raise ValueError(f'pool={pool!r}: expected one of {POOLS}')
    if position is not None and position[0] * position[1] != tokens:
      raise ValueError(f'position grid {position} does not hold the {tokens} merged tokens of an image')
    self.tower, self.pool, self.position = tower, pool, position
    width = tower.cfg.out_hidden_size * (tokens if pool == 'flat' else 1)
    self.fc = Linear(width, hidden, use_bias=True, rngs=rngs, init_std=0.02)
    self.heads = nnx.List([Linear(hidden, n, use_bias=True, rngs=rngs) for n in num_classes])
    if position is not None:
      self.row_head = Linear(tower.cfg.out_hidden_size, position[0], use_bias=True, rngs=rngs)
      self.col_head = Linear(tower.cfg.out_hidden_size, position[1], use_bias=True, rngs=rngs)

  def features(self, pv_BLP, meta):
    """The tower's merged tokens, ``[B, T, D]``."""
    B, L, P = pv_BLP.shape
    return self.tower(pv_BLP.reshape(B * L, P), meta).reshape(B, -1, self.tower.cfg.out_hidden_size)

  def read(self, feats_BTD):
    B = feats_BTD.shape[0]
    if self.pool == 'flat':
      x = feats_BTD.reshape(B, -1)
    else:
      x = feats_BTD.mean(1) if self.pool == 'mean' else feats_BTD.max(1)
    h = jax.nn.relu(self.fc(x))
    return tuple(head(h) for head in self.heads)

  def position_logits(self, feats_BTD):
    """Each token's row and column logits, ``[B, T, rows]`` and ``[B, T, cols]``."""
    return self.row_head(feats_BTD), self.col_head(feats_BTD)

  def position_loss(self, feats_BTD):
    """Mean cross-entropy of each token's row plus that of its column (:func:`token_positions`)."""
    rows, cols = token_positions(*self.position)
    lr, lc = self.position_logits(feats_BTD)
    B = feats_BTD.shape[0]
    ce = optax.softmax_cross_entropy_with_integer_labels
    return (ce(lr, jnp.broadcast_to(rows, (B, rows.size))).mean()
            + ce(lc, jnp.broadcast_to(cols, (B, cols.size))).mean())

  def __call__(self, pv_BLP, meta):
    return self.read(self.features(pv_BLP, meta))


def token_positions(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
  """Row and column of each of the ``rows x cols`` merged tokens, in the raster order the tower returns them."""
  t = np.arange(rows * cols)
  return (t // cols).astype(np.int32), (t % cols).astype(np.int32)


def multi_head_loss(logits: Sequence[jax.Array], y_BK: jax.Array) -> jax.Array:
  """Sum over heads of the mean cross-entropy over the rows labelled for that head (label -1: none)."""
  total = 0.0
  for k, lg in enumerate(logits):
    y = y_BK[:, k]
    m = (y >= 0).astype(lg.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(lg, jnp.maximum(y, 0))
    total += (ce * m).sum() / jnp.maximum(m.sum(), 1.0)
  return total


def _loss(clf, pv, meta, y):
  feats = clf.features(pv, meta)
  loss = multi_head_loss(clf.read(feats), y)
  if clf.position is not None:
    loss += clf.position_loss(feats)
  return loss


@nnx.jit
def tower_step(clf, opt, pv, meta, y):
  loss, grads = nnx.value_and_grad(_loss)(clf, pv, meta, y)
  opt.update(clf, grads)
  return loss


def noisy_step(noise: float):
  """:func:`tower_step` on images with Gaussian noise of std ``noise`` added to their normalised patches, drawn
  from the step's ``key`` (``vision_warmup.noise``: every pass shows the head a new version of each image)."""
  def step(clf, opt, pv, meta, key, y):
    return tower_step(clf, opt, pv + noise * jax.random.normal(key, pv.shape, pv.dtype), meta, y)
  return step


@nnx.jit
def tower_logits(clf, pv, meta):
  return clf(pv, meta)


@nnx.jit
def tower_readout(clf, pv, meta):
  """The heads' logits and, with the position pretext, each token's row and column logits: one program for the
  end-of-stage readout (each separately jitted function and chunk shape was a compilation of its own)."""
  feats = clf.features(pv, meta)
  return clf.read(feats), (clf.position_logits(feats) if clf.position is not None else None)


READOUT_CHUNK = 32    # images per readout call, the last chunk padded to it (one compiled shape); the tower
                      # attends over a chunk's patches packed (quadratic in their count): 256 images took ~7 s


# --------------------------------------------------------------------------------------------------- labels


def norm_text(text: str) -> str:
  """The key an answer text is compared by (as the answer prior, ``train.evaluate.prior_baseline``)."""
  return text.strip().lower()


def label_rows(records: Sequence, tasks: Sequence[str]) -> tuple[list[str], list[tuple[int, int]]]:
  """Rows of a label matrix: one per image and occurrence (an image with two questions of one task gets two
  rows). Returns the rows' image ids and, per record, its ``(row, task column)``."""
  row_of: dict[tuple[str, int], int] = {}
  seen: dict[tuple[str, str], int] = {}
  ids, where = [], []
  for r in records:
    occ = seen.get((r.image_id, r.task), 0)
    seen[(r.image_id, r.task)] = occ + 1
    if (r.image_id, occ) not in row_of:
      row_of[(r.image_id, occ)] = len(ids)
      ids.append(r.image_id)
    where.append((row_of[(r.image_id, occ)], list(tasks).index(r.task)))
  return ids, where


def answer_labels(train: Sequence, tasks: Sequence[str]):
  """-> ``(labels, index, ids, y)``: per task the sorted answer texts (every option text of its train questions)
  and their positions, the label rows' image ids (:func:`label_rows`) and ``y[row, task]``, the correct text's
  index (-1 where the row has no question of that task)."""
  tasks = list(tasks)
  labels = [sorted({norm_text(o) for r in train if r.task == t for o in r.options}) for t in tasks]
  index = [{t: i for i, t in enumerate(ls)} for ls in labels]
  ids, where = label_rows(train, tasks)
  y = np.full((len(ids), len(tasks)), -1, np.int32)
  for r, (row, k) in zip(train, where):
    y[row, k] = index[k][norm_text(r.answer_text)]
  return labels, index, ids, y


def answer_correct(logits: Sequence[np.ndarray], row_of: dict, index: Sequence[dict], tasks: Sequence[str],
                   records: Sequence) -> dict[str, np.ndarray]:
  """Each question answered by the heads: the option whose text gets the highest logit of its task's head on its
  image (``logits[k][row_of[image_id]]``; a text never seen in train cannot be chosen; ties: the earlier letter)
  -> ``{task: correctness (1 / 0) of each of its questions, in order}``."""
  tasks = list(tasks)
  out: dict[str, list[float]] = {t: [] for t in tasks}
  for r in records:
    k = tasks.index(r.task)
    scores = [logits[k][row_of[r.image_id], index[k][norm_text(o)]] if norm_text(o) in index[k] else -np.inf
              for o in r.options]
    out[r.task].append(float(int(np.argmax(scores)) == r.answer_index))
  return {t: np.asarray(v) for t, v in out.items()}


# -------------------------------------------------------------------------------------------------- training


def fit(clf: nnx.Module, step_fn, inputs, y_NK: np.ndarray, *, epochs: int, batch_size: int, lr: float,
        weight_decay: float, seed: int, on_step=None) -> nnx.Module:
  """AdamW on ``clf`` for ``epochs`` seeded shuffled passes over the rows of ``y`` (the last partial batch of each
  pass is dropped, a different one each pass). ``inputs(rows)`` -> the step's input arguments for those rows;
  ``step_fn(clf, opt, *inputs, y)`` -> loss; ``on_step(step, loss)`` after each step."""
  opt = nnx.Optimizer(clf, optax.adamw(lr, weight_decay=weight_decay), wrt=nnx.Param)
  # Thousands of small steps (~20 ms each at the miniature's size): the modules are split once and the step runs as
  # a pure jitted function of their state, donated, instead of an ``nnx.jit`` call that walks the module graph at
  # every step -- the same computation, 21 -> 16 ms a step of the default warm-up (WORKSPACE.md).
  graphdef, state = nnx.split((clf, opt))

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, *args):
    c, o = nnx.merge(graphdef, state)
    loss = step_fn(c, o, *args)
    return loss, nnx.state((c, o))

  rng = np.random.default_rng(seed)
  bs = min(batch_size, len(y_NK))
  step = 0
  for _ in range(epochs):
    perm = rng.permutation(len(y_NK))
    for i in range(0, len(perm) - bs + 1, bs):
      b = perm[i:i + bs]
      loss, state = train_step(state, *inputs(b), jnp.asarray(y_NK[b]))
      step += 1
      if on_step is not None:
        on_step(step, loss)
  nnx.update((clf, opt), state)
  return clf


def num_steps(epochs: int, rows: int, batch_size: int) -> int:
  bs = min(batch_size, rows)
  return epochs * (rows // bs)


def _records(source) -> list:
  return list(source.iter_records()) if hasattr(source, 'iter_records') else [source[i] for i in range(len(source))]


def _patches(run, records) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
  """The processor's patches of each image of ``records`` (by image id) and their one patch grid."""
  from medad_jax.data.schema import load_image
  patches, grids = {}, set()
  for r in records:
    if r.image_id not in patches:
      pv, grid = run.processor.process_image(load_image(r))
      patches[r.image_id] = np.asarray(pv, np.float32)
      grids.add(tuple(int(g) for g in grid))
  if len(grids) != 1:
    raise ValueError(f'vision_warmup: the images come in {len(grids)} patch grids ({sorted(grids)[:4]}...); the '
                     'warm-up batches images of one grid (set --config.vision_warmup.enabled=False)')
  return patches, grids.pop()


def warm_up(run, model: nnx.Module, *, held_out: Sequence | None = None) -> dict:
  """Trains ``model.visual`` in place (see the module docstring); returns the stage's summary (also logged):
  the head's accuracy per task on the training questions (``train_acc/<task>``) and, when ``held_out`` records
  are given (a test's check; the launcher never passes any), on those (``held_out_acc/<task>``)."""
  from medad_jax.model.vision import vision_meta
  from medad_jax.train.evaluate import TABLE1
  c = run.config.vision_warmup
  t0 = time.time()
  from medad_jax.train.pipeline import train_part
  train = _records(train_part(run, 'sft')[0])
  tasks = [t for t, _ in TABLE1 if any(r.task == t for r in train)]
  labels, index, ids, y = answer_labels(train, tasks)
  patches, grid = _patches(run, train)
  pv_NLP = np.stack([patches[i] for i in ids])
  vcfg = model.visual.cfg
  m = vcfg.spatial_merge_size
  tokens = int(np.prod(grid)) // m ** 2
  merged = (int(grid[1]) // m, int(grid[2]) // m) if int(grid[0]) == 1 else None   # one frame: the token grid
  phases = [(c.get('pool', 'flat'), c.epochs, False)]
  if c.get('then_epochs', 0) > 0:
    phases.append((c.then_pool, c.then_epochs, bool(c.get('then_position', False))))
  if any(p for _, _, p in phases) and merged is None:
    raise ValueError(f'vision_warmup.then_position: the images have {grid[0]} temporal patches; the position '
                     'pretext reads a single frame\'s token grid')
  metas = {}
  noise = float(c.get('noise', 0.0))
  steps = [num_steps(e, len(y), c.batch_size) for _, e, _ in phases]
  keys = iter(jax.random.split(jax.random.key(run.config.seed), sum(steps)) if noise > 0 else ())  # one a step

  def inputs(rows, pv=None):
    b = len(rows)
    if b not in metas:
      metas[b] = jax.tree.map(jnp.asarray, vision_meta(np.tile(np.asarray(grid), (b, 1)), vcfg))
    return jnp.asarray((pv_NLP if pv is None else pv)[rows]), metas[b]

  def train_inputs(rows):
    return inputs(rows) + ((next(keys),) if noise > 0 else ())

  def readout(pv):
    """-> (logits per task, row logits, column logits or None) of the images ``pv``, in chunks of one shape."""
    n, C = len(pv), READOUT_CHUNK
    parts = []
    for s in range(0, n, C):
      rows = np.minimum(np.arange(s, s + C), n - 1)   # the last chunk repeats its last image (rows dropped below)
      parts.append(jax.device_get(tower_readout(clf, *inputs(rows, pv))))
    cat = lambda xs: np.concatenate(xs)[:n]  # noqa: E731
    logits = [cat([p[0][k] for p in parts]) for k in range(len(tasks))]
    if parts[0][1] is None:
      return logits, None, None
    return logits, cat([p[1][0] for p in parts]), cat([p[1][1] for p in parts])

  total = sum(steps)
  run.logger.total_steps[STAGE] = total
  every = max(run.config.log.every_steps, total // 100)   # thousands of small steps: about 100 lines
  done = 0
  for n, (pool, epochs, position) in enumerate(phases):
    # each phase a fresh head over the same tower; the second reads the token average (``then_pool``), which the
    # tower, having learnt under the flat head where a lesion is, now has to carry in every token's features --
    # with ``then_position`` together with each token's own place in the grid (the position pretext)
    clf = TowerClassifier(model.visual, tokens, [len(ls) for ls in labels], nnx.Rngs(run.config.seed),
                          hidden=c.hidden, pool=pool, position=merged if position else None)

    def on_step(step, loss, done=done):
      if (done + step) % every == 0 or done + step == total:
        run.logger.log(STAGE, done + step, {'loss': loss})

    fit(clf, noisy_step(noise) if noise > 0 else tower_step, train_inputs, y, epochs=epochs,
        batch_size=c.batch_size, lr=c.optim.lr, weight_decay=c.optim.weight_decay, seed=run.config.seed,
        on_step=on_step)
    done += num_steps(epochs, len(y), c.batch_size)
  # Accuracy per task, each question answered as the probe does (the head is discarded afterwards).
  first_row: dict[str, int] = {}
  for n, i in enumerate(ids):
    first_row.setdefault(i, n)
  pos = {i: n for n, i in enumerate(first_row)}
  rows = np.array(list(first_row.values()))
  logits, row_logits, col_logits = readout(pv_NLP[rows])
  out = {f'train_acc/{t}': float(v.mean()) for t, v in
         answer_correct(logits, pos, index, tasks, train).items() if len(v)}
  if clf.position is not None:   # the pretext: each token's row and column read from its features alone
    rr, cc = token_positions(*clf.position)
    for name, want, lg in (('token_row', rr, row_logits), ('token_col', cc, col_logits)):
      out[f'train_acc/{name}'] = float((lg.argmax(-1) == want).mean())
  if held_out is not None:
    held = [r for r in held_out if r.task in tasks]
    hp, hgrid = _patches(run, held)
    if hgrid != grid:
      raise ValueError(f'vision_warmup: held-out images have patch grid {hgrid}, the training images {grid}')
    hpos = {i: n for n, i in enumerate(hp)}
    out |= {f'held_out_acc/{t}': float(v.mean()) for t, v in
            answer_correct(readout(np.stack(list(hp.values())))[0], hpos, index, tasks, held).items() if len(v)}
  run.logger.log(STAGE, total, out)
  run.logger.flush()
  run.timings[STAGE] = time.time() - t0
  log.info('vision warm-up: %d images, %d steps in %.1f s; accuracy %s', len(pos), total, run.timings[STAGE],
           ', '.join(f'{k} {100 * v:.1f} %' for k, v in out.items()))
  return out


def enabled(config) -> bool:
  """Whether the run's base gets the warm-up -- then no config rebuilds that base, and the SFT and Con-GRPO
  checkpoints carry their frozen base (``Checkpointer(save_frozen=True)``)."""
  return config.get('vision_warmup') is not None and bool(config.vision_warmup.enabled)


def base_model(run, *, warm: bool = True) -> nnx.Module:
  """The policy a run starts from: ``pipeline.build_model`` (a checkpoint, or random for the miniature), with its
  tower warmed up first when ``vision_warmup.enabled`` and ``warm`` (False: the weights are about to be replaced
  by a checkpoint's, so the stage would be wasted)."""
  from medad_jax.train import pipeline as pl
  model = pl.build_model(run.config, run.model_cfg, run.config.seed)
  if warm and enabled(run.config):
    warm_up(run, model)
  return model
