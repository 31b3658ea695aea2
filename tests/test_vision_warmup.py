"""The miniature's vision warm-up (``medad_jax/train/vision_warmup.py``): its labels by hand, and on a small
medad-synth run it trains the policy's own tower in place -- and nothing else of the policy."""

import os

import numpy as np
import pytest
from flax import nnx

from medad_jax.data.schema import MedADRecord
from medad_jax.metrics import read_jsonl
from medad_jax.train import vision_warmup as vw


def _rec(image_id, task, options, answer):
  return MedADRecord(id=f'{image_id}-{task}-{len(options)}{answer}', image_id=image_id, image=b'', modality='CT',
                     anatomy='Chest', task=task, question='q?', options=tuple(options), answer=answer,
                     source='test', split='train')


def test_answer_labels_by_hand():
  """Classes of a task: every option text of its train questions, normalised and sorted; one row per image (and
  per repeated question of one task); -1 where an image has no question of a task."""
  yn = ('Yes', 'No', 'Artifact', 'Unknown')
  train = [_rec('a', 'anomaly_detection', yn, 'A'),
           _rec('a', 'anatomy_identification', ('Lung', 'Brain', 'Liver', 'Eye'), 'B'),
           _rec('b', 'anomaly_detection', ('no', 'Yes', 'Artifact', 'Unknown'), 'A'),
           _rec('b', 'anomaly_detection', yn, 'A')]          # a second anomaly question of image b: a second row
  tasks = ['anatomy_identification', 'anomaly_detection']
  labels, index, ids, y = vw.answer_labels(train, tasks)
  assert labels == [['brain', 'eye', 'liver', 'lung'], ['artifact', 'no', 'unknown', 'yes']]
  assert index[1]['yes'] == 3 and ids == ['a', 'b', 'b']
  np.testing.assert_array_equal(y, [[0, 3],      # a: Brain, Yes
                                    [-1, 1],     # b: "no" (the text, whatever its case)
                                    [-1, 3]])    # b again: Yes


def test_multi_head_loss_ignores_unlabelled_rows():
  logits = (np.log(np.array([[0.5, 0.5], [0.9, 0.1]], np.float32)),)
  got = vw.multi_head_loss(logits, np.array([[1], [-1]], np.int32))
  assert float(got) == pytest.approx(-np.log(0.5), rel=1e-6)   # the unlabelled row adds nothing


def test_token_positions_by_hand():
  """The merged tokens come in raster order (row by row), so token t of a 2 x 3 grid sits at (t // 3, t % 3)."""
  rows, cols = vw.token_positions(2, 3)
  np.testing.assert_array_equal(rows, [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(cols, [0, 1, 2, 0, 1, 2])


def test_position_loss_by_hand():
  """With zero position heads every token's row and column are uniform over the grid: the loss is ln(rows) +
  ln(cols); features that carry each token's row, read by a row head that weighs them, cut the row term to ~0;
  a grid that does not hold the tokens is refused."""
  import jax.numpy as jnp
  from medad_jax.model.config import Qwen25VLConfig
  from medad_jax.model.vision import VisionTransformer
  tower = VisionTransformer(Qwen25VLConfig.tiny().vision, rngs=nnx.Rngs(0))
  clf = vw.TowerClassifier(tower, 6, [3], nnx.Rngs(0), pool='mean', position=(2, 3))
  for head in (clf.row_head, clf.col_head):
    head.kernel[...] = jnp.zeros_like(head.kernel[...])
    head.bias[...] = jnp.zeros_like(head.bias[...])
  feats = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, tower.cfg.out_hidden_size)), jnp.float32)
  assert float(clf.position_loss(feats)) == pytest.approx(np.log(2) + np.log(3), rel=1e-6)
  # features that carry the row in their first two dimensions, and a row head that reads them
  rows, _ = vw.token_positions(2, 3)
  f = np.zeros((1, 6, tower.cfg.out_hidden_size), np.float32)
  f[0, np.arange(6), rows] = 1.0
  kernel = np.zeros(clf.row_head.kernel[...].shape, np.float32)
  kernel[0, 0] = kernel[1, 1] = 50.0
  clf.row_head.kernel[...] = jnp.asarray(kernel)
  assert float(clf.position_loss(jnp.asarray(f))) == pytest.approx(np.log(3), abs=1e-6)
  with pytest.raises(ValueError, match='does not hold'):
    vw.TowerClassifier(tower, 6, [3], nnx.Rngs(0), pool='mean', position=(2, 2))


def test_warm_up_trains_the_policys_tower_in_place(tmp_path):
  """On 40 synthetic images (34 train) the warm-up changes every tower weight, leaves the decoder bit-identical to
  the same seed's fresh model, logs its steps with their total (the progress line's ETA), and reads modality from
  the pixels of its training images (>= 90 %; random init: the 10-way chance)."""
  from medad_jax.testing.configs import tiny_miniature
  from medad_jax.train import pipeline as pl
  config = tiny_miniature(str(tmp_path / 'cache'), images=40)
  config.vision_warmup.epochs = 40
  config.vision_warmup.then_epochs = 0   # the flat phase alone (the mean phase: the test after the next)
  assert config.vision_warmup.enabled   # on in the miniature
  run = pl.setup(config, str(tmp_path / 'run'))
  fresh = pl.build_model(config, run.model_cfg, config.seed)
  warmed = vw.base_model(run)
  a, b = nnx.state(fresh, nnx.Param), nnx.state(warmed, nnx.Param)
  for (path, x), (_, w) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
    x, w = np.asarray(x[...]), np.asarray(w[...])
    if path[0] == 'visual':
      assert not np.array_equal(x, w), path
    else:
      np.testing.assert_array_equal(x, w, err_msg=str(path))
  run.logger.close()
  recs = [r for r in read_jsonl(os.path.join(run.workdir, 'metrics.jsonl')) if r['stage'] == vw.STAGE]
  total = run.logger.total_steps[vw.STAGE]
  images = len({run.data.train[i].image_id for i in range(len(run.data.train))})
  assert images == 34 and total == (40 + config.vision_warmup.then_epochs) * (images // 8)
  assert recs[-1]['step'] == total and 'loss' in recs[0]
  assert recs[-1]['train_acc/modality_classification'] >= 0.9
  assert run.timings[vw.STAGE] > 0
  # off: the same seed's fresh model
  config.vision_warmup.enabled = False
  off = vw.base_model(run)
  for (_, x), (_, w) in zip(nnx.to_flat_state(a), nnx.to_flat_state(nnx.state(off, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(w[...]))


def test_noisy_step_is_the_step_on_the_noised_images():
  """``vision_warmup.noise``: the step's loss is the plain step's on ``pv + noise * N(0, 1)`` drawn from the step's
  key -- the same key the same images, another key other ones -- and the update is the one of those images."""
  import jax
  import jax.numpy as jnp
  import optax
  from medad_jax.model.config import Qwen25VLConfig
  from medad_jax.model.vision import VisionTransformer, vision_meta

  cfg = Qwen25VLConfig.tiny().vision
  grid = np.array([1, 4, 4])
  meta = jax.tree.map(jnp.asarray, vision_meta(np.tile(grid, (2, 1)), cfg))
  P = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
  pv = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, P)), jnp.float32)
  y = jnp.asarray([[0], [2]], jnp.int32)
  key = jax.random.key(3)

  def fresh():
    clf = vw.TowerClassifier(VisionTransformer(cfg, rngs=nnx.Rngs(0)), 4, [3], nnx.Rngs(0), pool='mean')
    return clf, nnx.Optimizer(clf, optax.adamw(1e-2), wrt=nnx.Param)

  noised = pv + 0.5 * jax.random.normal(key, pv.shape, pv.dtype)
  c1, o1 = fresh()
  got = float(vw.noisy_step(0.5)(c1, o1, pv, meta, key, y))
  c2, o2 = fresh()
  want = float(vw.tower_step(c2, o2, noised, meta, y))
  assert got == want   # the same program on the same noised images: bit-identical, loss and update
  params = lambda c: nnx.to_flat_state(nnx.state(c, nnx.Param))  # noqa: E731
  for (_, a), (_, b) in zip(params(c1), params(c2)):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
  c3, o3 = fresh()
  clean = float(vw.tower_step(c3, o3, pv, meta, y))
  c4, o4 = fresh()
  other = float(vw.noisy_step(0.5)(c4, o4, pv, meta, jax.random.key(4), y))
  assert abs(got - clean) > 1e-6 and abs(got - other) > 1e-6   # (ln 3 at init: the noise moves it ~1e-5)


def test_bad_warmup_settings_fail_before_any_work():
  from configs import common, congrpo
  config = congrpo.get_config(None)
  with config.unlocked():
    config.vision_warmup.epochs = 0
  with pytest.raises(ValueError, match='vision_warmup.epochs'):
    common.validate(config)
  config = congrpo.get_config(None)
  with config.unlocked():
    config.vision_warmup.pool = 'median'
  with pytest.raises(ValueError, match='vision_warmup.pool'):
    common.validate(config)
  config = congrpo.get_config(None)
  with config.unlocked():
    config.vision_warmup.noise = -0.1
  with pytest.raises(ValueError, match='vision_warmup.noise'):
    common.validate(config)


@pytest.mark.heavy  # ~2 minutes; CI's learning test is the whole policy's (tests/test_quick_run.py), whose
                    # shorter warm-up it runs first
def test_warm_up_reads_anomaly_detection_on_held_out_images(tmp_path):
  """A learning test of stage 0 on the embedded default's data of 2026-12-03 (1,000 medad-synth images, lesions x 1.5,
  84 px; fixed seed): the warm-up of that default (30 passes over the 850 training images under the flat head, then 15
  under the mean head; ~1.5-2 minutes on 2 cores), then the last heads (one per task, trained together) answer the 150
  anomaly-detection questions of the *test* split. It must beat the blind answer prior (57.3 %: "Yes" is right for 86
  of the 150) by at least 10 points. Measured on a 2-core Xeon: 82.0 % (with the position pretext,
  ``then_position=True``: 82.7 %; the flat phase alone: 76.7 %; 10 flat passes: 64.7 %)."""
  from configs import congrpo
  from medad_jax.train import pipeline as pl
  from medad_jax.train.evaluate import prior_baseline
  config = congrpo.get_config('sft_only')
  with config.unlocked():
    config.data.cache_dir = str(tmp_path / 'cache')
    config.data.read_threads = 1
    config.data.synth_images, config.data.test_fraction, config.data.rl_holdout = 1000, 0.15, 0.0  # as measured
    config.vision_warmup.epochs, config.vision_warmup.then_epochs = 30, 15
  run = pl.setup(config, str(tmp_path / 'run'))
  test = [r for r in (run.data.test[i] for i in range(len(run.data.test))) if r.task == 'anomaly_detection']
  prior = prior_baseline([run.data.train[i] for i in range(len(run.data.train))], test).per_seed[0]
  out = vw.warm_up(run, pl.build_model(config, run.model_cfg, config.seed), held_out=test)
  run.logger.close()
  assert len(test) == 150 and prior['anomaly_detection'] == pytest.approx(86 / 150)
  assert out['held_out_acc/anomaly_detection'] >= prior['anomaly_detection'] + 0.10, (out, prior)


def test_a_second_phase_trains_the_same_tower_under_another_head(tmp_path):
  """``then_epochs`` passes under a fresh head reading by ``then_pool`` follow the first phase: the steps of both
  are logged under one total, and the tower ends different from the one-phase run of the same seed (the second
  phase trains it, the same tower object, in place)."""
  from medad_jax.testing.configs import tiny_miniature
  from medad_jax.train import pipeline as pl
  config = tiny_miniature(str(tmp_path / 'cache'), images=40)
  config.vision_warmup.epochs = 3
  run = pl.setup(config, str(tmp_path / 'one'))
  one = vw.base_model(run)
  run.logger.close()
  config.vision_warmup.then_epochs = 2
  config.vision_warmup.then_pool = 'max'
  run = pl.setup(config, str(tmp_path / 'two'))
  two = vw.base_model(run)
  run.logger.close()
  recs = [r for r in read_jsonl(os.path.join(run.workdir, 'metrics.jsonl')) if r['stage'] == vw.STAGE]
  total = run.logger.total_steps[vw.STAGE]
  assert total == (3 + 2) * (34 // 8) and recs[-1]['step'] == total
  differ = [not np.array_equal(np.asarray(x[...]), np.asarray(w[...])) for (p, x), (_, w) in
            zip(nnx.to_flat_state(nnx.state(one, nnx.Param)), nnx.to_flat_state(nnx.state(two, nnx.Param)))
            if p[0] == 'visual']
  assert differ and all(differ)


def test_the_position_pretext_teaches_each_token_its_place(tmp_path):
  """With ``then_position`` the second phase also trains two position heads: on 34 training images of the tiny
  preset (56 px: 2 x 2 merged tokens) the tower's tokens end up telling their own row and column from their
  features alone on their training images (>= 90 %; chance is 50 %), and the warm-up logs both accuracies. The
  tower has only relative positions (2D RoPE), so this is learnt, not given."""
  from medad_jax.testing.configs import tiny_miniature
  from medad_jax.train import pipeline as pl
  config = tiny_miniature(str(tmp_path / 'cache'), images=40)
  config.vision_warmup.epochs = 5
  config.vision_warmup.then_epochs = 30
  config.vision_warmup.then_position = True
  run = pl.setup(config, str(tmp_path / 'run'))
  vw.base_model(run)
  run.logger.close()
  last = [r for r in read_jsonl(os.path.join(run.workdir, 'metrics.jsonl')) if r['stage'] == vw.STAGE][-1]
  assert last['train_acc/token_row'] >= 0.9 and last['train_acc/token_col'] >= 0.9, last


def test_a_bad_second_phase_fails_before_any_work():
  from configs import common, congrpo
  for key, value, match in (('then_pool', 'median', 'vision_warmup.then_pool'),
                            ('then_epochs', -1, 'vision_warmup.then_epochs')):
    config = congrpo.get_config(None)
    with config.unlocked():
      config.vision_warmup[key] = value
    with pytest.raises(ValueError, match=match):
      common.validate(config)
