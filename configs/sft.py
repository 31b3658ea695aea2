r"""Stage 1 only: Cognitive Injection (SFT on ``<think>..</think><answer>..</answer>``, Eq. 1), then evaluation.

This is also Table 2's **SFT-only** row.

  python -m medad_jax.launch --config=configs/sft.py                 # embedded CPU miniature (synthetic data)
  python -m medad_jax.launch --config=configs/sft.py:paper \
      --config.model.checkpoint=/ckpt/Qwen2.5-VL-3B-Instruct --config.data.dir=/data/MedAD-38K

Variants (comma-separated after the colon):
  paper   Qwen2.5-VL-3B from a local HF directory, MedAD-38K, bf16, global batch 64, LoRA lr 1e-4, 2 epochs.
  (none)  the miniature: the ``small`` architecture, randomly initialised, on the synthetic benchmark.

Miniature settings that differ from the paper because of scale: those of ``configs/congrpo.py`` (there is no
pretrained base, so SFT trains all parameters of the ``mini`` architecture at lr 3e-3, cosine, batch 16, 4 epochs).
"""

import ml_collections

from configs import common

VARIANTS = ('paper',)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants = common.parse_variants(arg, VARIANTS)
  config = common.run_config('sft')
  config.model = common.model_config('small')
  config.lora = common.lora_config()
  config.data = common.data_config('synth')
  config.sft = common.sft_config()
  config.vision_warmup = common.vision_warmup_config()
  config.eval = common.eval_config()
  config.judge = common.judge_config('local')   # consistency rate of the evaluation
  if 'paper' in variants:
    common.apply_paper_scale(config)
    config.name = 'sft-paper'
  else:
    from configs.congrpo import apply_miniature
    apply_miniature(config)   # the same miniature as configs/congrpo.py (model, data, SFT schedule, eval)
  config.lock()
  return config
