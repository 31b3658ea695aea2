"""medad-synth: reproducible bytes, balanced letters, and every label true of the drawn pixels."""

import collections
import dataclasses
import re

import numpy as np
import pytest

from medad_jax.data import loader, regions, schema, synth, templates
from medad_jax.data.schema import LETTERS, TASKS

N = 160


@pytest.fixture(scope='module')
def generated():
  """Images + records of a 160-image set over every modality x anatomy pair."""
  cfg = synth.SynthConfig(num_images=N, seed=11, pairs='all')
  return cfg, list(synth.generate(cfg))


def _patch(px, x, y, r=3):
  h = px.shape[0]
  i, j = int(y * h), int(x * h)
  return np.median(px[max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].reshape(-1, 3).astype(float), axis=0)


def classify_modality(px: np.ndarray) -> str:
  """Reads the modality off the pixels with hand-written rules, one per visual signature (independent of synth)."""
  f = px.astype(float)
  h = px.shape[0]
  gray = np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 1], px[..., 2])
  corners = [_patch(px, x, y).max() for x, y in ((0.02, 0.02), (0.98, 0.02), (0.02, 0.98), (0.98, 0.98))]
  if gray:
    g, side, band = f[..., 0], int(0.08 * h), int(0.1 * h)
    if g[:, :side].max() == 0 and g[:, -side:].max() == 0:
      return 'CE-MRI'  # black bars left and right
    if _patch(px, 0.06, 0.06).min() > 230 and min(corners[1:]) > 5:
      return 'X-ray'  # bright corner marker on a full frame
    if max(corners) == 0 and _patch(px, 0.5, 0.925, 1).min() > 150 and _patch(px, 0.02, 0.5).max() == 0:
      return 'CT'  # circular field of view and a table bar
    if max(corners) == 0 and _patch(px, 0.5, 0.02).max() == 0 and _patch(px, 0.03, 0.5).max() > 0:
      return 'Ultrasound'  # a fan: black top and corners, content reaching the sides
    if g[:band].mean() < 12 and g[-band:].mean() < 12 and g[int(0.2 * h):int(0.8 * h), :5].mean() > 12:
      return 'OCT'  # a full-width horizontal band
    mid = g[int(0.3 * h):int(0.7 * h), int(0.3 * h):int(0.7 * h)]
    if np.median(np.abs(np.diff(mid, axis=1))) <= 6:
      return 'MRI'  # smooth, unframed
    return '?'
  if max(corners) == 0:  # a black frame: fundus disc (orange) or endoscope octagon (pink)
    bright = f[f[..., 0] > 100]
    return 'Fundus' if np.median(bright[:, 2] / bright[:, 0]) < 0.25 else 'Endoscopy'
  if max(corners) < 60:
    return 'Dermoscopy'  # dark vignette
  if (np.abs(f - np.array([92, 51, 140])).max(-1) < 25).mean() > 0.005:
    return 'Microscopy'  # purple nuclei
  return '?'


def test_same_seed_same_bytes_and_other_seed_differs(generated):
  cfg, items = generated
  again = list(synth.generate(cfg, indices=range(0, N, 7)))
  for img, recs in again:
    ref_img, ref_recs = items[img.index]
    assert img.png == ref_img.png
    assert recs == ref_recs
  other = list(synth.generate(synth.SynthConfig(num_images=N, seed=12, pairs='all'), indices=[0, 1, 2]))
  assert all(o.png != items[i][0].png for i, (o, _) in enumerate(other))


def test_random_access_matches_sequential(generated):
  cfg, items = generated
  plan = synth.SynthPlan(cfg)
  img = synth.generate_image(plan, 37)
  assert img.png == items[37][0].png


def test_split_is_70_30_by_image(generated):
  cfg, items = generated
  splits = collections.Counter(img.split for img, _ in items)
  assert splits['test'] == round(0.3 * N) and splits['train'] == N - round(0.3 * N)
  for img, recs in items:
    assert {r.split for r in recs} == {img.split}


def test_answer_letters_balanced_per_split_and_task(generated):
  _, items = generated
  counts = collections.defaultdict(collections.Counter)
  for _, recs in items:
    for r in recs:
      counts[(r.split, r.task)][r.answer] += 1
  for key, c in counts.items():
    per_letter = [c[l] for l in LETTERS]
    assert max(per_letter) - min(per_letter) <= 1, (key, c)


def test_ten_phrasings_per_task_all_used(generated):
  templates.check_templates()
  _, items = generated
  used = collections.defaultdict(set)
  for _, recs in items:
    for r in recs:
      assert r.question in templates.QUESTIONS[r.task]
      used[r.task].add(r.question)
  assert all(len(used[t]) == 10 for t in TASKS), {t: len(v) for t, v in used.items()}


def test_options_four_distinct_with_correct_answer(generated):
  _, items = generated
  for img, recs in items:
    assert [r.task for r in recs] == list(TASKS)
    for r in recs:
      assert len(r.options) == 4 and len(set(r.options)) == 4
      assert r.answer_text == synth.correct_option(img, r.task)
      pool = set(templates.distractor_pool(r.task, r.answer_text))
      assert set(r.options) - {r.answer_text} <= pool


def test_lesion_labels_true_of_drawn_pixels(generated):
  cfg, items = generated
  plan = synth.SynthPlan(cfg)
  n_abnormal = 0
  for img, recs in items:
    by_task = {r.task: r for r in recs}
    fov = synth.field_of_view(img.modality, cfg.image_size)
    if img.pathology is None:
      assert not img.lesion_mask.any() and not img.lesion_footprint.any()
      assert by_task['lesion_localization'].answer_text == templates.NO_LESION
      assert by_task['anomaly_detection'].answer_text == templates.ABNORMAL_NO
      assert by_task['pathology_characterization'].answer_text == templates.NO_ABNORMALITY
      assert all(r.region is None and r.abnormal is False for r in recs)
      continue
    n_abnormal += 1
    ii, jj = np.nonzero(img.lesion_mask)
    cx, cy = (jj.mean() + 0.5) / cfg.image_size, (ii.mean() + 0.5) / cfg.image_size
    assert regions.region_of(cx, cy) == img.region == by_task['lesion_localization'].answer_text
    assert regions.boundary_distance(cx, cy) >= 0.03
    assert not np.any(img.lesion_footprint & ~fov)  # the whole lesion is visible
    assert by_task['pathology_characterization'].answer_text == img.pathology
    assert by_task['anomaly_detection'].answer_text == templates.ABNORMAL_YES
    # The lesion is what differs from the same image drawn without it, and it is clearly visible.
    base = synth.generate_image(plan, img.index, with_lesion=False)
    diff = np.abs(img.pixels.astype(np.int32) - base.pixels.astype(np.int32)).mean(-1)
    assert not np.any((diff > 0) & ~img.lesion_footprint)
    assert diff[img.lesion_mask].mean() >= 15.0, (img.image_id, img.modality, img.pathology)
  assert 0.4 * N < n_abnormal < 0.8 * N


def test_modality_signature_readable_from_pixels(generated):
  _, items = generated
  wrong = [(img.image_id, img.modality, classify_modality(img.pixels)) for img, _ in items
           if classify_modality(img.pixels) != img.modality]
  assert not wrong
  assert {img.modality for img, _ in items} == set(schema.MODALITIES)


def test_cot_grounded_in_drawn_evidence(generated):
  _, items = generated
  for img, recs in items:
    for r in recs:
      assert f'{r.answer}' in re.findall(r'\b[A-D]\b', r.cot), r.cot
      assert r.answer_text in r.cot
      assert 1 <= len(re.findall(r'[.!?](?:\s|$)', r.cot)) <= 3, r.cot
      if r.task == 'modality_classification':
        assert any(e in r.cot for e in templates.MODALITY_EVIDENCE[img.modality])
      elif r.task == 'anatomy_identification':
        assert any(e in r.cot for e in templates.ANATOMY_EVIDENCE[img.anatomy])
      elif img.pathology is not None:
        assert any(e in r.cot for e in templates.PATHOLOGY_EVIDENCE[img.pathology])
      target = schema.format_target(r)
      assert target == f'<think>{r.cot}</think><answer>{r.answer}</answer>'


def test_write_dir_round_trips_through_loader(tmp_path):
  cfg = synth.SynthConfig(num_images=12, seed=3)
  stats = synth.write_dir(cfg, str(tmp_path))
  assert stats['images'] == 12 and stats['records'] == 60 and stats['images_per_s'] > 0
  recs, rep = loader.load_jsonl_dir(str(tmp_path))
  assert rep.loaded == 60 and not rep.skipped
  ref = {r.id: r for _, rs in synth.generate(cfg) for r in rs}
  for r in recs:
    assert schema.load_image(r).tobytes() == schema.load_image(ref[r.id]).tobytes()
    assert r == dataclasses.replace(ref[r.id], image=r.image)


def test_image_size_configurable():
  img, recs = next(synth.generate(synth.SynthConfig(num_images=2, seed=0, image_size=112)))
  assert img.pixels.shape == (112, 112, 3)
  assert schema.load_image(recs[0]).size == (112, 112)


def test_parallel_write_matches_serial(tmp_path):
  cfg = synth.SynthConfig(num_images=8, seed=4, image_size=56)
  synth.write_dir(cfg, str(tmp_path / 'serial'))
  synth.write_dir(cfg, str(tmp_path / 'parallel'), workers=2)
  for name in ('train.jsonl', 'test.jsonl'):
    assert (tmp_path / 'serial' / name).read_text() == (tmp_path / 'parallel' / name).read_text()
  for png in sorted((tmp_path / 'serial' / 'images').iterdir()):
    assert png.read_bytes() == (tmp_path / 'parallel' / 'images' / png.name).read_bytes()


def test_letter_free_thoughts_differ_only_in_the_conclusion():
  """cot_letters=False (the 'option' answer format): same images, questions, options and answers; the thought
  names the correct option text and no option letter; the first (evidence) sentence is unchanged."""
  cfg = synth.SynthConfig(num_images=8, seed=5, image_size=56)
  plain = list(synth.generate(cfg))
  textcot = list(synth.generate(dataclasses.replace(cfg, cot_letters=False)))
  for (img_a, recs_a), (img_b, recs_b) in zip(plain, textcot):
    assert img_a.png == img_b.png
    for a, b in zip(recs_a, recs_b):
      assert (a.question, a.options, a.answer) == (b.question, b.options, b.answer)
      assert a.cot != b.cot and b.answer_text in b.cot
      assert not re.findall(r'\b[A-D]\b', b.cot.replace(b.answer_text, '')), b.cot
      evidence = lambda c: c.split('. ')[0]
      assert evidence(a.cot) == evidence(b.cot)
      assert schema.format_target(b, 'option').endswith(f'<answer>{b.answer_text}</answer>')


def test_builder_names_tell_configs_apart():
  from medad_jax.data import tfds_builders
  base = synth.SynthConfig(num_images=10, image_size=56)
  names = {tfds_builders.synth_builder_config(c).name for c in (
      base, dataclasses.replace(base, cot_letters=False), dataclasses.replace(base, test_fraction=0.2),
      dataclasses.replace(base, abnormal_fraction=0.5), dataclasses.replace(base, lesion_scale=1.5))}
  assert len(names) == 5
  assert tfds_builders.synth_builder_config(base).name == 'n10_s0_px56_realistic'  # earlier builds stay valid


def test_lesion_scale_enlarges_lesions_and_changes_nothing_else():
  """The conspicuity knob: the same labels, questions, options and answers (so the same blind prior), normal
  images byte for byte, lesions ~scale**2 larger in area and still in their labelled region; out of range refused."""
  cfg = synth.SynthConfig(num_images=40, seed=7, image_size=84, pairs='all')
  base, big = list(synth.generate(cfg)), list(synth.generate(dataclasses.replace(cfg, lesion_scale=1.5)))
  areas = []
  for (img_a, recs_a), (img_b, recs_b) in zip(base, big):
    assert (img_a.modality, img_a.anatomy, img_a.pathology, img_a.region) == (
        img_b.modality, img_b.anatomy, img_b.pathology, img_b.region)
    assert [(r.question, r.options, r.answer) for r in recs_a] == [(r.question, r.options, r.answer) for r in recs_b]
    if img_a.pathology is None:
      assert img_a.png == img_b.png
    else:
      assert regions.region_of(*img_b.centroid) == img_b.region
      areas.append(img_b.lesion_mask.sum() / img_a.lesion_mask.sum())
  assert len(areas) >= 15 and np.median(areas) > 1.6, (len(areas), np.median(areas))
  with pytest.raises(ValueError, match='lesion_scale'):
    synth.SynthConfig(lesion_scale=2.0)
