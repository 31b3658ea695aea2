"""Record schema, prompt/target formatting, and the five-region geometry."""

import numpy as np
import pytest

from medad_jax.data import regions, schema
from medad_jax.data.schema import RecordError, record_from_dict


def _obj(**kw):
  base = dict(id='r1', image='img/a.png', modality='MRI', anatomy='Brain', task='lesion_localization',
              question='Where is the lesion?', options=['Left Upper', 'Center Region', 'Right Lower', 'No lesion'],
              answer='B', source='BraTS2021', split='train', cot='A bright mass sits in the middle. So B.',
              region='Center Region', abnormal=True)
  base.update(kw)
  return base


def test_format_question_and_target():
  r = record_from_dict(_obj(), base_dir='/data')
  assert schema.format_question(r) == (
      'Where is the lesion?\nA. Left Upper\nB. Center Region\nC. Right Lower\nD. No lesion')
  assert schema.format_target(r) == '<think>A bright mass sits in the middle. So B.</think><answer>B</answer>'
  assert r.image == '/data/img/a.png' and r.image_id == 'img/a.png' and r.answer_text == 'Center Region'
  with pytest.raises(ValueError, match='r1.*no cot'):
    schema.format_target(record_from_dict(_obj(cot=None)))


def test_format_target_option_answer():
  r = record_from_dict(_obj(), base_dir='/data')
  assert schema.format_target(r, 'option') == (
      '<think>A bright mass sits in the middle. So B.</think><answer>Center Region</answer>')
  assert schema.format_target(r, 'letter') == schema.format_target(r)
  with pytest.raises(ValueError, match="answer_format='text'"):
    schema.format_target(r, 'text')


def test_config_answer_formats_match_schema():
  from configs import common
  assert common.ANSWER_FORMATS == schema.ANSWER_FORMATS


def test_aliases_and_answer_text_normalize():
  r = record_from_dict(_obj(modality='ce mri', anatomy='lymph node', task='Lesion Localization',
                            region='upper left', answer='right lower', split='val',
                            options={'A': 'Left Upper', 'B': 'Center Region', 'C': 'Right Lower', 'D': 'No lesion'}))
  assert (r.modality, r.anatomy, r.task, r.region, r.answer, r.split) == (
      'CE-MRI', 'Lymph Node', 'lesion_localization', 'Left Upper', 'C', 'validation')


@pytest.mark.parametrize('change, reason, field', [
    (dict(options=['a', 'b', 'c']), 'bad_options', 'options'),
    (dict(options=['a', 'b', 'c', 'd', 'e']), 'bad_options', 'options'),
    (dict(options=['a', 'b', 'a', 'd']), 'bad_options', 'options'),
    (dict(answer='E'), 'bad_answer', 'answer'),
    (dict(answer='Liver'), 'bad_answer', 'answer'),
    (dict(task='segmentation'), 'unknown_task', 'task'),
    (dict(region='Top Middle'), 'unknown_region', 'region'),
    (dict(modality='PET'), 'unknown_modality', 'modality'),
    (dict(anatomy='Kidney'), 'unknown_anatomy', 'anatomy'),
    (dict(split='holdout'), 'bad_split', 'split'),
    (dict(split=None), 'missing_field', 'split'),
    (dict(question=''), 'missing_field', 'question'),
    (dict(abnormal=False), 'inconsistent_labels', 'region'),
    (dict(abnormal='yes'), 'bad_type', 'abnormal'),
])
def test_bad_fields_name_field_and_expectation(change, reason, field):
  with pytest.raises(RecordError) as e:
    record_from_dict(_obj(**change))
  assert e.value.reason == reason and e.value.field == field
  assert f"field '{field}'" in str(e.value) and 'expected' in str(e.value)


def test_region_of_known_points_and_half_open_boundaries():
  assert regions.region_of(0.1, 0.1) == 'Left Upper'
  assert regions.region_of(0.9, 0.1) == 'Right Upper'
  assert regions.region_of(0.1, 0.9) == 'Left Lower'
  assert regions.region_of(0.9, 0.9) == 'Right Lower'
  assert regions.region_of(0.5, 0.5) == 'Center Region'
  assert regions.region_of(0.35, 0.2) == 'Left Upper'  # above the center box
  assert regions.region_of(0.3, 0.3) == 'Center Region'  # box is [0.3, 0.7)
  assert regions.region_of(0.7, 0.5) == 'Right Lower'
  assert regions.region_of(0.5, 0.1) == 'Right Upper'  # mid-line x = 0.5 belongs to the right
  with pytest.raises(ValueError):
    regions.region_of(1.2, 0.5)


def test_region_map_agrees_with_region_of_and_areas():
  m = regions.region_map(100, 100)
  for i in range(0, 100, 7):
    for j in range(0, 100, 7):
      assert regions.REGIONS[m[i, j]] == regions.region_of((j + 0.5) / 100, (i + 0.5) / 100)
  area = np.bincount(m.ravel(), minlength=5) / m.size
  np.testing.assert_allclose(area, [0.21, 0.21, 0.21, 0.21, 0.16], atol=1e-9)


def test_sample_point_respects_region_and_margin():
  rng = np.random.default_rng(0)
  for region in regions.REGIONS:
    for _ in range(50):
      x, y = regions.sample_point(rng, region, margin=0.05)
      assert regions.region_of(x, y) == region and regions.boundary_distance(x, y) >= 0.05
  assert regions.boundary_distance(0.5, 0.5) == pytest.approx(0.2)
  assert regions.boundary_distance(0.5, 0.1) == pytest.approx(0.0)
  assert regions.boundary_distance(0.1, 0.5) == pytest.approx(0.0)
