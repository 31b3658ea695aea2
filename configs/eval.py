r"""Table 1 evaluation alone: per-task accuracy, overall accuracy, format rate and consistency rate on the test
split, as a markdown table shaped like Table 1 plus JSON, mean +- std over ``eval.seeds``.

  python -m medad_jax.launch --config=configs/eval.py --config.workdir=runs/congrpo-...   # a finished run
  python -m medad_jax.launch --config=configs/eval.py:paper,hf \
      --config.eval.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.dir=/data/MedAD-38K    # a local baseline
  python -m medad_jax.launch --config=configs/eval.py:paper,endpoint \
      --config.eval.endpoint_url=http://host:30000 --config.eval.endpoint_model=grok-4-fast  # a served baseline

Seeds sweep (the paper reports mean +- std of 3 runs): ``--config.eval.greedy=False --config.eval.seeds='(0,1,2)'``
samples every answer at ``sampling.temperature`` with one key per seed (greedy decoding, the miniature's default,
gives the same answers for every seed). A sweep over *training* seeds is a shell loop whose run directories one
command folds into one mean +- std table::

  for s in 0 1 2; do python -m medad_jax.launch --config=congrpo --config.seed=$s --workdir=runs/seed$s; done
  python -m medad_jax.train.evaluate aggregate runs/seed0 runs/seed1 runs/seed2

Variants (comma-separated after the colon):
  paper      MedAD-38K test split, the SGLang judge for the consistency rate, 3 seeds.
  hf         evaluate the local HF checkpoint in ``eval.hf_dir`` (any Qwen2.5-VL) instead of a run's policy.
  endpoint   evaluate a model behind an SGLang / OpenAI-compatible server (``eval.endpoint_*``).
"""

import ml_collections

from configs import common

VARIANTS = ('paper', 'hf', 'endpoint')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants = common.parse_variants(arg, VARIANTS)
  if 'hf' in variants and 'endpoint' in variants:
    raise ValueError("config variants 'hf' and 'endpoint' both choose the evaluated policy; pick one")
  config = common.run_config('eval')
  config.model = common.model_config('small')
  config.data = common.data_config('synth')
  config.judge = common.judge_config('local')
  config.eval = common.eval_config()
  config.sampling = common.sampling_config()   # temperature etc. of sampled (non-greedy) evaluation
  if 'paper' in variants:
    common.apply_paper_scale(config)
    config.eval.seeds = (0, 1, 2)
  else:
    from configs.congrpo import apply_miniature
    apply_miniature(config)   # the miniature's model, data and evaluation settings
  if 'hf' in variants:
    config.eval.policy = 'hf'
  if 'endpoint' in variants:
    config.eval.policy = 'endpoint'
  config.name = '-'.join(['eval'] + variants)
  config.lock()
  return config
