"""Experiment configs: every variant builds, paper defaults, overrides change behaviour, bad keys/values fail."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, congrpo, eval as eval_cfg, sft
from medad_jax.model.config import RANDOM_INIT_PRESETS, Qwen25VLConfig
from medad_jax.rl import update as U


def all_specs():
  specs = ['sft', 'sft:paper', 'eval', 'eval:paper', 'eval:hf', 'eval:paper,endpoint']
  for v in congrpo.VARIANTS:
    specs += [f'congrpo:{v}']
    if v not in ('paper', 'quick'):   # 'quick' is the miniature's learning check (refused with 'paper', below)
      specs += [f'congrpo:paper,{v}']
  return specs + ['congrpo']


@pytest.mark.parametrize('spec', all_specs())
def test_every_variant_builds_locked_and_valid(spec):
  cfg = common.load(spec)
  assert cfg.is_locked
  with pytest.raises(AttributeError):
    cfg.not_a_key = 1
  assert cfg.stage == spec.split(':')[0]


def test_the_quick_check_is_the_miniature_cut_short():
  """``quick`` (``tests/test_quick_run.py``): the default miniature with the ``micro`` decoder under the same
  tower, two tasks, fewer warm-up passes and 400 SFT steps in which anomaly detection weighs 3, on the 1,000 images
  it was measured on (the default has 1,500); everything else -- the images'
  size and lesions, tower, SFT recipe but its learning rate -- as the default."""
  base, quick = common.load('congrpo:sft_only'), common.load('congrpo:sft_only,quick')
  assert quick.data.tasks == 'anomaly_detection,lesion_localization' and base.data.tasks == ''
  assert (quick.vision_warmup.epochs, quick.vision_warmup.then_epochs, quick.sft.max_steps) == (10, 5, 400)
  # the default's lesion-task weights and position pretext are not part of what the check measured
  assert (base.sft.epochs, base.vision_warmup.then_position) == (1, True) and base.sft.task_repeats
  assert (quick.sft.task_repeats, quick.vision_warmup.then_position) == ('anomaly_detection=3', False)
  assert base.rl.task_repeats == base.sft.task_repeats and quick.rl.task_repeats == ''
  assert (base.model.preset, quick.model.preset) == ('mini', 'micro')
  mini, micro = (Qwen25VLConfig.preset(n) for n in ('mini', 'micro'))
  assert micro.vision == dataclasses.replace(mini.vision, out_hidden_size=micro.text.hidden_size)
  assert (micro.text.num_layers, micro.text.hidden_size, micro.text.head_dim) == (2, 128, mini.text.head_dim)
  assert (quick.data.synth_images, quick.data.test_fraction, quick.data.rl_holdout) == (1000, 0.15, 0.0)
  for key in ('model.tokenizer', 'model.vocab_size', 'data.image_size',
              'data.synth_lesion_scale', 'sft.trainable', 'sft.batch_size', 'vision_warmup.then_pool'):
    a, b = base, quick
    for part in key.split('.'):
      a, b = a[part], b[part]
    assert a == b, key
  with pytest.raises(ValueError, match="'quick'.*'paper'"):
    common.load('congrpo:paper,quick')


def test_paper_defaults_section_4_1():
  c = common.load('congrpo:paper')
  assert c.model.preset == 'qwen2_5_vl_3b' and c.model.dtype == 'bfloat16'
  assert c.data.source == 'medad38k' and c.judge.backend == 'sglang'
  assert (c.sft.trainable, c.sft.optim.lr, c.sft.epochs, c.sft.batch_size) == ('lora', 1e-4, 2, 64)
  assert (c.rl.optim.lr, c.rl.epochs, c.rl.group_size, c.rl.beta) == (1e-6, 1, 8, 0.04)
  assert c.rl.prompts_per_step * c.rl.group_size == 64
  assert (c.reward.fmt, c.reward.acc, c.reward.con) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
  assert c.rl.ratio_to == 'old' and c.rl.aggregation == 'seq_mean_token_mean' and not c.rl.adv_std_norm
  assert common.load('congrpo:paper,eq8').rl.ratio_to == 'sft'


@pytest.mark.parametrize('variant,weights', [
    ('fmt_focused', (0.8, 0.1, 0.1)), ('acc_focused', (0.1, 0.8, 0.1)), ('con_focused', (0.1, 0.1, 0.8)),
    ('balanced', (1 / 3, 1 / 3, 1 / 3)), ('acc_only', (0, 1, 0)), ('con_only', (0, 0, 1))])
def test_reward_weight_variants(variant, weights):
  c = common.load(f'congrpo:paper,{variant}')
  assert (c.reward.fmt, c.reward.acc, c.reward.con) == pytest.approx(weights)
  assert c.sft.enabled and c.rl.enabled


def test_stage_ablations():
  assert not common.load('congrpo:rl_only').sft.enabled and common.load('congrpo:rl_only').rl.enabled
  assert not common.load('congrpo:sft_only').rl.enabled
  assert common.load('eval:hf').eval.policy == 'hf'


def _objective(cfg):
  g = U.GRPOConfig.from_config(cfg.rl)
  rng = np.random.default_rng(0)
  logp = jnp.asarray(rng.normal(-1, 0.5, (8, 5)), jnp.float32)
  old = logp + jnp.asarray(rng.normal(0, 0.4, (8, 5)), jnp.float32)
  ref = logp + jnp.asarray(rng.normal(0, 0.4, (8, 5)), jnp.float32)
  adv, _ = U.grpo_advantages(jnp.asarray([1, 0, 0, 1, 1, 1, 0, 1.0]), g)  # one group of G = 8
  mask = jnp.asarray(rng.random((8, 5)) > 0.2, jnp.float32)
  num, _ = U.grpo_objective(logp, old, ref, adv, mask, g)
  return float(num)


def test_an_override_changes_the_value_and_the_behaviour():
  base = common.load('congrpo:paper')
  for override, key in (['rl.beta=0.5', 'beta'], ['rl.ratio_to=sft', 'ratio_to'],
                        ['rl.eps_high=0.05', 'eps_high'], ['rl.aggregation=token_sum', 'aggregation']):
    c = common.load('congrpo:paper', [override])
    assert c.rl[key] != base.rl[key]
    assert _objective(c) != pytest.approx(_objective(base), abs=1e-6), override
  c = common.load('congrpo', ['rl.group_size=4', 'sft.optim.lr=3e-4', 'eval.seeds=(0,1,2)'])
  assert (c.rl.group_size, c.sft.optim.lr, tuple(c.eval.seeds)) == (4, 3e-4, (0, 1, 2))
  assert U.GRPOConfig.from_config(c.rl).group_size == 4


@pytest.mark.parametrize('overrides,message', [
    (['rl.betta=0.1'], r"betta.*Did you mean \"beta\""),
    (['rl.optim.lrr=1e-4'], 'lrr'),
    (['nope=1'], 'nope'),
    (['rl.beta=abc'], "could not convert string to float: 'abc'"),
    (['rl.ratio_to=ref'], r"config.rl.ratio_to = 'ref': expected one of \('old', 'sft'\)"),
    (['rl.aggregation=mean'], 'config.rl.aggregation'),
    (['rl.group_size=1'], 'config.rl.group_size = 1: expected at least 2'),
    (['rl.num_microbatches=3'], 'a divisor of rl.prompts_per_step'),
    (['reward.fmt=-1'], r'config.reward.fmt = -1.0: expected a number >= 0'),
    (['judge.backend=grpc'], 'config.judge.backend'),
    (['sft.trainable=all', 'sft.num_microbatches=2'], "config.sft.num_microbatches = 2: expected 1 when"),
    (['sft.trainable=decoder', 'sft.num_microbatches=2'], "config.sft.num_microbatches = 2: expected 1 when"),
])
def test_unknown_keys_and_bad_values_fail_clearly(overrides, message):
  with pytest.raises(ValueError, match=message):
    common.load('congrpo', overrides)


def test_unknown_variant_config_and_conflicts_fail_clearly():
  with pytest.raises(ValueError, match=r"unknown config variant\(s\) \['papr'\]"):
    congrpo.get_config('papr')
  with pytest.raises(ValueError, match='all set the reward weights'):
    congrpo.get_config('acc_only,con_only')
  with pytest.raises(ValueError, match="'hf' and 'endpoint'"):
    eval_cfg.get_config('hf,endpoint')
  with pytest.raises(FileNotFoundError, match="known configs: \\['congrpo', 'eval', 'sft'\\]"):
    common.config_path('grpo:paper')
  assert sft.get_config(None).stage == 'sft'


def test_paper_variant_names_each_missing_path(tmp_path):
  missing = common.missing_paths(common.load('congrpo:paper'))
  assert any('config.model.checkpoint is not set' in m for m in missing)
  assert any('config.data.dir is not set' in m for m in missing)
  c = common.load('congrpo:paper', [f'model.checkpoint={tmp_path}', f'data.dir={tmp_path / "nope"}'])
  assert common.missing_paths(c) == [f"config.data.dir = '{tmp_path / 'nope'}' does not exist (the MedAD-38K "
                                     'directory: JSONL annotations + images)']
  assert common.missing_paths(common.load('congrpo')) == []   # the embedded miniature needs nothing
  assert common.missing_paths(common.load('congrpo:sft_only,quick')) == []   # nor its micro-decoder check
  for name in RANDOM_INIT_PRESETS:   # each names a preset; the public architectures are not among them
    assert Qwen25VLConfig.preset(name).text.num_layers <= 8, name
  assert not {'qwen2_5_vl_3b', 'qwen2_5_vl_7b'} & set(RANDOM_INIT_PRESETS)
