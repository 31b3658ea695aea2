"""Shared pieces of the experiment configs (big_vision style: plain functions that fill a ConfigDict).

Every config file (``sft.py``, ``congrpo.py``, ``eval.py``) has ``get_config(arg)``; ``arg`` is the text after
the colon of ``--config=configs/congrpo.py:paper,acc_only`` (comma-separated variant names, parsed by
:func:`parse_variants`). Configs are locked (``config.lock()``), so an override of a key that does not exist fails
when the flags are parsed, before any work; :func:`validate` then checks values (ranges and choices) with a message
naming the key.

:func:`load` applies a spec plus ``key=value`` overrides through the same ``ml_collections.config_flags`` parser the
launcher uses (for tests and notebooks); :func:`config_path` turns a short name (``congrpo:paper``) into the file
path ``config_flags`` expects.

Paper hyper-parameters (§4.1) are the defaults of the ``paper`` variant and, where they are not a matter of scale,
of the embedded CPU miniature too: AdamW, SFT with LoRA at lr 1e-4 for 2 epochs, Con-GRPO with G = 8, beta = 0.04,
lr 1e-6 for one epoch, global batch 64, bf16 on accelerators, reward weights 1/3 each (Eq. 3).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import ml_collections
from ml_collections import config_dict

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
STAGES = ('sft', 'congrpo', 'eval')
RATIO_TO = ('old', 'sft')
AGGREGATIONS = ('seq_mean_token_mean', 'token_mean', 'token_sum')
SCHEDULES = ('constant', 'cosine')
JUDGE_BACKENDS = ('local', 'rule', 'sglang', 'openai')
DATA_SOURCES = ('synth', 'medad38k')
POLICY_SOURCES = ('run', 'hf', 'endpoint')
DTYPES = ('float32', 'bfloat16')
REMAT = ('none', 'full', 'dots')            # = medad_jax.model.text.REMAT_POLICIES (configs import no JAX code)
ATTENTION = ('xla', 'cudnn', 'auto')       # = medad_jax.model.text.ATTENTION_IMPLEMENTATIONS
TRAINABLE = ('lora', 'all', 'decoder')
ANSWER_FORMATS = ('letter', 'option')  # = medad_jax.data.schema.ANSWER_FORMATS (configs import no JAX code)
LOSSES = ('grpo', 'gspo', 'dr_grpo')  # = medad_jax.rl.algo.LOSSES
CON_MODES = ('deduce', 'evidence')  # = medad_jax.judge.evidence.CON_MODES
EVIDENCE_PARTS = ('visual_grounding', 'question_relevance', 'answer_support', 'no_hallucination',
                  'no_contradiction')  # = medad_jax.judge.evidence.PARTS

# Table 3 of the paper (lambda_fmt, lambda_acc, lambda_con), and the two reward ablations of Table 2.
REWARD_WEIGHTS = {
    'balanced': (1 / 3, 1 / 3, 1 / 3),
    'fmt_focused': (0.8, 0.1, 0.1),
    'acc_focused': (0.1, 0.8, 0.1),
    'con_focused': (0.1, 0.1, 0.8),
    'acc_only': (0.0, 1.0, 0.0),
    'con_only': (0.0, 0.0, 1.0),
}


def parse_variants(arg: str | None, known: Sequence[str]) -> list[str]:
  """``'paper,acc_only'`` -> ``['paper', 'acc_only']``; an unknown name fails listing the known ones."""
  names = [a.strip() for a in (arg or '').split(',') if a.strip()]
  bad = [n for n in names if n not in known]
  if bad:
    raise ValueError(f'unknown config variant(s) {bad}; known variants: {sorted(known)}')
  return names


def config_path(spec: str) -> str:
  """``'congrpo:paper'`` or ``'configs/congrpo.py:paper'`` -> ``'/abs/configs/congrpo.py:paper'``."""
  name, sep, arg = spec.partition(':')
  if not name.endswith('.py'):
    name = os.path.join(CONFIG_DIR, f'{name}.py')
  if not os.path.exists(name):
    known = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith('.py') and f not in ('common.py',
                                                                                              '__init__.py'))
    raise FileNotFoundError(f'config {spec!r}: no file {name}; known configs: {known}')
  return f'{name}{sep}{arg}'


# Keys that no longer exist, with the reason (a plain "unknown key" would not say why).
REMOVED_KEYS = {
    'lora.dropout': 'LoRA dropout is not supported: the adapters train without dropout (the paper names none); '
                    'remove this override',
}


def load(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """The config of ``spec`` with ``'a.b=value'`` overrides, parsed exactly as ``--config.a.b=value`` flags."""
  from absl import flags
  from ml_collections import config_flags

  for o in overrides:
    key = o.partition('=')[0].strip()
    if key in REMOVED_KEYS:
      raise ValueError(f'config.{key} (override {o!r}): {REMOVED_KEYS[key]}')
  argv = ['load', f'--config={config_path(spec)}', *[f'--config.{o}' for o in overrides]]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'experiment config', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  try:
    fv(argv)
  except (AttributeError, KeyError, flags.Error) as e:  # unknown key / unparsable value
    raise ValueError(f'config {spec!r} with overrides {list(overrides)}: {e}') from e
  cfg = fv.config
  validate(cfg)
  return cfg


# -------------------------------------------------------------------------------------------- building blocks


def model_config(preset: str = 'small', *, dtype: str = 'float32', param_dtype: str = 'float32',
                 tokenizer: str = 'small') -> ml_collections.ConfigDict:
  """``checkpoint`` (a local HF Qwen2.5-VL directory) wins over ``preset`` (an architecture of
  ``Qwen25VLConfig``, randomly initialised) when set."""
  return ml_collections.ConfigDict({
      'preset': preset,
      'checkpoint': config_dict.placeholder(str),
      'dtype': dtype,
      'param_dtype': param_dtype,
      # 'qwen2' (the Qwen2 BPE, rebuilt offline) or 'small' (trained on the synthetic corpus, for the miniature
      # whose vocabulary is a few thousand tokens).
      'tokenizer': tokenizer,
      'vocab_size': 2048,   # of the 'small' tokenizer (learned from the training split); ignored for 'qwen2'
      # Memory / kernels (medad_jax/model/text.py): rematerialisation of decoder layers and vision blocks in the
      # backward pass ('none' | 'full' | 'dots'), and the attention kernel ('xla' | 'cudnn' | 'auto').
      'remat': 'none',
      'attention': 'xla',
      # The sampler's decode runs the decoder layers as one scan, one layer's weights in flight: for XLA:CPU with
      # bf16 weights (it otherwise keeps an fp32 copy of every decoder weight through the decode loop).
      'decode_scan': False,
  })


def lora_config(rank: int = 16, alpha: float = 32.0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      'rank': rank,
      'alpha': alpha,
      'pattern': r'^model/layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)$',
  })


def optim_config(lr: float, *, warmup_steps: int = 0, schedule: str = 'constant', weight_decay: float = 0.0,
                 max_grad_norm: float = 1.0) -> ml_collections.ConfigDict:
  """AdamW (paper §4.1) with global-norm clipping; ``medad_jax.rl.update.make_optimizer`` reads it."""
  return ml_collections.ConfigDict({
      'lr': lr, 'warmup_steps': warmup_steps, 'schedule': schedule, 'weight_decay': weight_decay,
      'b1': 0.9, 'b2': 0.999, 'eps': 1e-8, 'max_grad_norm': max_grad_norm,
  })


def data_config(source: str = 'synth', *, synth_images: int = 200, image_size: int = 56,
                data_dir: str | None = None) -> ml_collections.ConfigDict:
  """``synth``: the generated benchmark (``medad_jax.data.synth``), built under ``cache_dir`` on first use;
  ``medad38k``: the real benchmark's JSONL + images in ``dir``."""
  return ml_collections.ConfigDict({
      'source': source,
      'dir': config_dict.placeholder(str) if data_dir is None else data_dir,
      # Relative: under $MEDAD_JAX_CACHE (default ~/.cache/medad_jax); built once, reused by later runs.
      'cache_dir': 'data',
      'synth_images': synth_images,
      'synth_seed': 0,
      'synth_lesion_scale': 1.0,  # lesion conspicuity: every lesion's size x this (medad_jax.data.synth.SynthConfig)
      'image_size': image_size,
      'test_fraction': 0.3,  # paper §4.1
      # Comma-separated task names (Table 1's, e.g. 'anomaly_detection,lesion_localization') to train and evaluate
      # on, the others left out of both splits; '' = every task.
      'tasks': '',
      # What the SFT target's answer block holds: 'letter' (the paper, <answer>C</answer>) or 'option' (the
      # option text, <answer>Chest</answer>; with synth data the thoughts then name no letter either). Rewards
      # and evaluation read both (medad_jax.rewards.parse_answer maps an option text to its letter).
      'answer_format': 'letter',
      # Per record, in tokens (image tokens included in the prompt): a longer record is skipped and counted under
      # policy 'skip', refused under 'strict' (a truncated target would lose </answer> and teach a broken format).
      'max_prompt_len': 512,
      'max_target_len': 256,
      'read_threads': 2,
      # Bad records of a MedAD directory: 'strict' stops at the first (naming file:line), 'skip' drops and counts
      # each by reason (run summary: data.skipped). medad_jax/data/loader.py lists the reasons.
      'policy': 'strict',
      # Images above this many pixels are refused at load (decoding one costs seconds and GBs; the processor
      # shrinks it to image_size anyway); <= 0 disables the cap.
      'max_image_pixels': 4096 * 4096,
      # Patches-per-image buckets for a MedAD directory, chosen from its own image sizes with the least padding
      # (medad_jax/data/buckets.py): at most this many compiled programs per sequence-length bucket.
      'patch_buckets': 4,
      # Padded prompt lengths of the sampler's batches (Con-GRPO's rollouts and the evaluation), comma-separated,
      # ascending ('' = medad_jax.train.pipeline.PROMPT_LENGTH_BUCKETS): each bucket a batch falls into compiles
      # its own prefill, decode, log-prob and update programs.
      'prompt_length_buckets': '',
      # > 0: this fraction of the training split's images (drawn by a hash of their ids: the same images for
      # every training seed) is held out of the vision warm-up and SFT, and Con-GRPO draws its prompts from
      # their questions only -- images the SFT policy has not seen (medad_jax.train.pipeline.train_part);
      # 0: every stage reads the whole training split.
      'rl_holdout': 0.0,
  })


def judge_config(backend: str = 'local', url: str = 'http://127.0.0.1:30000') -> ml_collections.ConfigDict:
  """Mirrors ``medad_jax.judge.base.JudgeConfig``; ``local`` = the frozen SFT policy prompted with the question
  and the thought only."""
  return ml_collections.ConfigDict({
      'backend': backend, 'url': url, 'model': 'default', 'timeout_s': 30.0, 'max_retries': 4,
      'concurrency': 8, 'deadline_s': 300.0, 'on_failure': 'raise', 'api_key_env': '', 'template': 'chatml',
      # local judge only: 'judge' (the instruction prompt, for chat checkpoints) or 'policy' (question + thought
      # in the policy's own SFT format, the letter after <answer>; medad_jax/judge/flax_scorer.py)
      'prompt_format': 'judge',
      # R_con: 'deduce' (paper Eq. 5-6: the judge deduces an answer from question + thought, 1 iff it is the
      # model's) or 'evidence' (five rubric parts judged separately, weighted; medad_jax/judge/evidence.py)
      'con_mode': 'deduce',
      'evidence_weights': {'visual_grounding': 0.2, 'question_relevance': 0.2, 'answer_support': 0.2,
                           'no_hallucination': 0.2, 'no_contradiction': 0.2},
      # sglang / openai: the launcher checks the server (health, served model, one tiny scoring request) before
      # any training and stops within check_timeout_s if it is down, slow or serves another model; False skips
      # the check (a server started later)
      'check': True,
      'check_timeout_s': 10.0,
      # sglang / openai: the device computes the reference log-probs while the judge scores the rollouts over
      # HTTP (exact: the same values as computing them inside the update; False runs the two one after the other)
      'overlap': True,
  })


def reward_config(variant: str = 'balanced') -> ml_collections.ConfigDict:
  fmt, acc, con = REWARD_WEIGHTS[variant]
  return ml_collections.ConfigDict({'fmt': fmt, 'acc': acc, 'con': con})


def sampling_config(max_new_tokens: int = 256) -> ml_collections.ConfigDict:
  """Rollout sampling (``medad_jax.sampling.ops.SamplingConfig``). The Con-GRPO update takes its log-probs at the
  same ``temperature`` (ratio, KL and entropy under the distribution the rollouts were drawn from; see
  ``medad_jax.rl.update.GRPOConfig``); top-k / top-p truncation is refused for Con-GRPO (``validate``)."""
  return ml_collections.ConfigDict({'max_new_tokens': max_new_tokens, 'temperature': 1.0, 'top_k': 0,
                                    'top_p': 1.0})


def vision_warmup_config(*, epochs: int = 30, batch_size: int = 8, lr: float = 1e-3) -> ml_collections.ConfigDict:
  """Stage 0 of the miniature (``medad_jax/train/vision_warmup.py``): before SFT, the policy's randomly initialised
  vision tower is trained under a throw-away classification head on the training split's (image, answer text)
  pairs -- the miniature's stand-in for the pretrained vision encoder a real VLM starts from. Off unless a config
  turns it on (``apply_miniature`` does)."""
  return ml_collections.ConfigDict({
      'enabled': False,
      'epochs': epochs,           # seeded passes over the training images
      'batch_size': batch_size,   # images per step
      'hidden': 64,               # the head's dense layer
      'pool': 'flat',             # how the head reads the merged tokens: 'flat' (one weight each), 'mean' or 'max'
      'then_epochs': 0,           # > 0: then this many passes under a fresh head reading by ``then_pool``
      'then_pool': 'mean',        # (the average a decoder attending uniformly receives; WORKSPACE.md)
      'then_position': False,     # True: in that phase each merged token also learns its own row and column
                                  # (two linear heads shared by all tokens): the position pretext
      'noise': 0.0,               # > 0: each step's images get Gaussian noise of this std on their normalised
                                  # patches (a fresh draw per step: the head never sees one image twice alike)
      'optim': ml_collections.ConfigDict({'lr': lr, 'weight_decay': 1e-4}),
  })


def sft_config(*, lr: float = 1e-4, epochs: int = 2, batch_size: int = 64) -> ml_collections.ConfigDict:
  """Stage 1 (Cognitive Injection, Eq. 1). ``checkpoint``: a finished SFT run's adapters (or an HF directory); when
  given, the Con-GRPO config skips SFT and starts from it."""
  return ml_collections.ConfigDict({
      'enabled': True,
      'checkpoint': config_dict.placeholder(str),
      'trainable': 'lora',        # 'lora' (paper), 'all' (full fine-tuning) or 'decoder' (all but the vision tower)
      'epochs': epochs,
      'max_steps': -1,            # > 0 caps the number of steps (quick runs)
      'batch_size': batch_size,   # examples per optimizer step (global)
      'num_microbatches': 1,
      'logits_chunk': 1024,       # target tokens whose LM-head logits exist at once (rl/update.py)
      'aggregation': 'token_mean',
      'focal_gamma': 0.0,         # > 0: each target token's NLL weighed by (1 - p)^gamma (rl/update.py SFTConfig)
      'group_by_length': 0,       # k > 0: every k batches' examples regrouped by length (less padding; the
                                  # examples of an epoch are the same; distributed.length_grouped)
      'length_buckets': '',       # padded sequence lengths, e.g. '128,160,192,256' ('': pipeline.SFT_LENGTH_BUCKETS)
      'target_buckets': '',       # padded answer-token counts per row, where the LM head runs ('':
                                  # pipeline.TARGET_LENGTH_BUCKETS)
      'task_repeats': '',         # e.g. 'anomaly_detection=3,anatomy_identification=0.5': a named task's questions
                                  # that many times per epoch (0.5: half of them), the rest once (a data-mixture
                                  # weight; pipeline.task_mixture)
      'compile_ahead': True,      # with the vision warm-up (one process): the step's length buckets compile on a
                                  # background thread while the warm-up runs (train/precompile.py); same results
      'optim': optim_config(lr),
  })


def rl_config(*, lr: float = 1e-6, epochs: int = 1, prompts_per_step: int = 8, group_size: int = 8,
              beta: float = 0.04) -> ml_collections.ConfigDict:
  """Stage 2 (Con-GRPO, Eq. 7-8); fields map to ``medad_jax.rl.update.GRPOConfig``.

  Global batch 64 (paper) = ``prompts_per_step`` 8 x ``group_size`` 8 completions per optimizer step (the
  TRL convention: the batch counts completions).
  """
  return ml_collections.ConfigDict({
      'enabled': True,
      'trainable': 'lora',        # 'lora': SFT adapters merged into the base, fresh RL adapters, reference =
                                  # adapters off (no weight copy); 'all': full fine-tuning with a reference copy
      'epochs': epochs,
      'max_steps': -1,             # > 0 caps the number of rollout batches (for quick runs)
      'prompts_per_step': prompts_per_step,
      'task_repeats': '',          # e.g. 'anomaly_detection=3': each question of a named task that many times among
                                   # the prompts, the rest once (a data-mixture weight; pipeline.rl_records)
      'group_size': group_size,
      'inner_iterations': 1,       # mu: updates per rollout batch
      'beta': beta,
      'eps_low': 0.2,
      'eps_high': 0.2,
      'ratio_to': 'old',           # 'old': standard GRPO; 'sft': the paper's Eq. 8 (see medad_jax/rl/update.py)
      'aggregation': 'seq_mean_token_mean',
      'adv_std_norm': False,       # Eq. 7 subtracts the group mean only
      'filter_zero_variance': False,
      'num_microbatches': 1,
      # GRPO variants (WORKSPACE.md "GRPO variants"; medad_jax/rl/algo.py). Defaults: the paper's GRPO.
      'loss': 'grpo',              # 'grpo' | 'gspo' (sequence ratio) | 'dr_grpo' (constant normaliser)
      'dynamic_sampling': False,   # DAPO: drop zero-variance groups and refill with new prompts ...
      'dynamic_sampling_max_draws': 4,  # ... at most this many sampling rounds per step (then zero-var filler)
      'overlong_penalty': 0.0,     # DAPO soft overlong punishment factor (0 = off; 1.0 = DAPO)
      'overlong_buffer': 256,      # ... over the last this many tokens of sampling.max_new_tokens
      'tis_cap': 0.0,              # truncated importance sampling cap (0 = off; verl uses 2.0)
      'logits_chunk': 1024,        # completion tokens whose LM-head logits exist at once (rl/update.py)
      'optim': optim_config(lr),
  })


def eval_config(*, seeds: tuple[int, ...] = (0,), batch_size: int = 32) -> ml_collections.ConfigDict:
  """Table 1 evaluation on the test split. ``policy``: ``run`` (this run's trained policy), ``hf`` (any local HF
  Qwen2.5-VL directory, ``hf_dir``) or ``endpoint`` (an SGLang / OpenAI-compatible server, ``endpoint_*``)."""
  return ml_collections.ConfigDict({
      'enabled': True,
      'split': 'test',
      'policy': 'run',
      'hf_dir': config_dict.placeholder(str),
      'endpoint_backend': 'sglang',
      'endpoint_url': 'http://127.0.0.1:30000',
      'endpoint_model': 'default',
      'seeds': seeds,
      'batch_size': batch_size,
      'max_new_tokens': 256,
      'greedy': False,            # sampled at temperature 1 so seeds differ (paper: mean +- std of 3 runs)
      'max_examples': -1,         # > 0 evaluates a prefix of the split
      'include_sft': True,        # congrpo: also evaluate pi_SFT (the RL model with its adapters off)
      'image_control': False,     # also evaluate the final policy with every question's image swapped for another
                                  # test image (evaluate.ImageShuffled): proof the answers are read from the pixels
      'group_by_task': True,      # batches of one task's questions (evaluate.by_task): a batch decodes until its
                                  # longest answer ends, and one task's answers are of similar length
      'endpoint_api_key_env': '',
  })


def run_config(stage: str) -> ml_collections.ConfigDict:
  """The top level shared by every stage."""
  return ml_collections.ConfigDict({
      'stage': stage,
      'name': stage,                                   # run directory prefix: runs/<name>-<time>
      'seed': 0,
      'workdir': config_dict.placeholder(str),         # default: a fresh runs/<name>-<time>
      # devices: how many local devices the mesh spans (-1: all).
      'mesh': {'data': -1, 'fsdp': 1, 'tensor': 1, 'devices': -1},
      'ckpt': {'every_steps': 50, 'keep': 3, 'async_save': True},
      'log': {'every_steps': 1, 'tensorboard': True},
      'export': False,                                 # write the merged final policy as an HF dir (export/)
      # Re-launching a run directory with another config: 'check' refuses (listing the differing keys), 'allow'
      # continues its checkpoints under the new config (medad_jax/rundir.py: the fields that may change anyway).
      'resume': 'check',
  })


PAPER_MAX_NEW_TOKENS = 1024  # completion budget of rollouts and evaluation at paper scale


def apply_paper_scale(config: ml_collections.ConfigDict) -> None:
  """Qwen2.5-VL-3B from a local checkpoint, MedAD-38K, the SGLang judge, bf16 compute (paper §4.1).

  The paths are placeholders the launcher checks (naming each missing one) before any work.
  """
  # Memory settings for one accelerator: the frozen base in bf16 (LoRA adapters and their AdamW moments stay fp32),
  # rematerialised (scanned) layers, microbatches of whole prompts. The Con-GRPO update compiles to 7.5 GiB of
  # arguments + 30.3 GiB of temporaries on one device (``python -m medad_jax.plan --config=congrpo:paper
  # --mesh=data=1 --check-xla``; WORKSPACE.md "The model at paper scale"); the SFT step is not yet measured.
  config.model = model_config('qwen2_5_vl_3b', dtype='bfloat16', param_dtype='bfloat16', tokenizer='qwen2')
  config.model.remat = 'full'
  if 'sft' in config:
    config.sft.num_microbatches = 8
  if 'rl' in config:
    config.rl.num_microbatches = 4
  config.data = data_config('medad38k', image_size=448)
  config.data.max_prompt_len = 2048
  config.data.max_target_len = 1024
  if 'judge' in config:
    config.judge = judge_config('sglang')
  if 'sampling' in config:
    config.sampling = sampling_config(PAPER_MAX_NEW_TOKENS)
  if 'eval' in config:
    config.eval.max_new_tokens = PAPER_MAX_NEW_TOKENS   # evaluation decodes as far as the rollouts do
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1, 'devices': -1})
  config.ckpt.every_steps = 100


# ------------------------------------------------------------------------------------------------- checking


def _fail(key: str, value, expected: str):
  raise ValueError(f'config.{key} = {value!r}: expected {expected}')


def _choice(config, key: str, choices: Sequence[str], *, prefix: str = ''):
  v = _get(config, key)
  if v not in choices:
    _fail(prefix + key, v, f'one of {tuple(choices)}')


def _get(config, key: str):
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def _positive(config, key: str, *, allow_zero: bool = False, integer: bool = False, prefix: str = ''):
  v = _get(config, key)
  ok = (v >= 0 if allow_zero else v > 0) and (not integer or float(v).is_integer())
  if not ok:
    _fail(prefix + key, v, ('an integer ' if integer else 'a number ') + ('>= 0' if allow_zero else '> 0'))


def validate(config: ml_collections.ConfigDict) -> None:
  """Value checks the type-checked flag parser cannot do; raises ``ValueError`` naming the key."""
  _choice(config, 'stage', STAGES)
  _choice(config, 'model.dtype', DTYPES)
  _choice(config, 'model.param_dtype', DTYPES)
  _choice(config, 'model.remat', REMAT)
  _choice(config, 'model.attention', ATTENTION)
  for stage in ('sft', 'rl'):
    if stage in config:
      _positive(config, f'{stage}.logits_chunk', integer=True)
  _choice(config, 'data.source', DATA_SOURCES)
  _choice(config, 'data.answer_format', ANSWER_FORMATS)
  _validate_data(config.data)
  if 'lora' in config:
    _positive(config, 'lora.rank', integer=True)
    _positive(config, 'lora.alpha')
  for stage in ('sft', 'rl'):
    if stage in config:
      _choice(config, f'{stage}.trainable', TRAINABLE)
      _choice(config, f'{stage}.optim.schedule', SCHEDULES)
      _positive(config, f'{stage}.optim.lr')
      _positive(config, f'{stage}.optim.weight_decay', allow_zero=True)
      _positive(config, f'{stage}.optim.warmup_steps', allow_zero=True, integer=True)
      _positive(config, f'{stage}.epochs', integer=True)
      _positive(config, f'{stage}.num_microbatches', integer=True)
      if config[stage].trainable in ('all', 'decoder') and config[stage].num_microbatches > 1:
        _fail(f'{stage}.num_microbatches', config[stage].num_microbatches,
              f'1 when {stage}.trainable={config[stage].trainable!r} (microbatching needs a frozen embedding and '
              'vision tower)')
  if 'sft' in config:
    _choice(config, 'sft.aggregation', AGGREGATIONS)
    _positive(config, 'sft.batch_size', integer=True)
    if config.sft.batch_size % config.sft.num_microbatches:
      _fail('sft.num_microbatches', config.sft.num_microbatches, f'a divisor of sft.batch_size={config.sft.batch_size}')
    _positive(config, 'sft.group_by_length', allow_zero=True, integer=True)
    _buckets(config, 'sft.length_buckets')
    _buckets(config, 'sft.target_buckets')
  for stage in ('sft', 'rl'):
    if stage in config and config[stage].get('task_repeats'):
      from medad_jax.data.schema import parse_task_repeats
      try:
        parse_task_repeats(config[stage].task_repeats)
      except ValueError as e:
        _fail(f'{stage}.task_repeats', config[stage].task_repeats, f"comma-separated TASK=WEIGHT, e.g. "
              f"'anomaly_detection=3,anatomy_identification=0.5' ({e})")
  if 'rl' in config:
    _choice(config, 'rl.ratio_to', RATIO_TO)
    _choice(config, 'rl.aggregation', AGGREGATIONS)
    _positive(config, 'rl.group_size', integer=True)
    if config.rl.group_size < 2:
      _fail('rl.group_size', config.rl.group_size, 'at least 2 (a group-relative advantage needs a group)')
    _positive(config, 'rl.prompts_per_step', integer=True)
    _positive(config, 'rl.inner_iterations', integer=True)
    _positive(config, 'rl.beta', allow_zero=True)
    if not 0 <= config.rl.eps_low < 1:
      _fail('rl.eps_low', config.rl.eps_low, 'a number in [0, 1)')
    _positive(config, 'rl.eps_high', allow_zero=True)
    _choice(config, 'rl.loss', LOSSES)
    if config.rl.loss == 'gspo' and config.rl.aggregation != 'seq_mean_token_mean':
      _fail('rl.aggregation', config.rl.aggregation, "'seq_mean_token_mean' with rl.loss='gspo'")
    if config.rl.loss == 'dr_grpo' and (config.rl.aggregation != 'seq_mean_token_mean' or config.rl.adv_std_norm):
      _fail('rl.loss', config.rl.loss, "rl.aggregation and rl.adv_std_norm at their defaults (Dr. GRPO sets its "
            'own constant normaliser and uses the mean-only advantage)')
    _positive(config, 'rl.dynamic_sampling_max_draws', integer=True)
    _positive(config, 'rl.overlong_penalty', allow_zero=True)
    _positive(config, 'rl.tis_cap', allow_zero=True)
    if config.rl.overlong_penalty > 0:
      _positive(config, 'rl.overlong_buffer', integer=True)
      if 'sampling' in config and config.rl.overlong_buffer > config.sampling.max_new_tokens:
        _fail('rl.overlong_buffer', config.rl.overlong_buffer,
              f'at most sampling.max_new_tokens={config.sampling.max_new_tokens}')
      if config.rl.adv_std_norm:
        _fail('rl.overlong_penalty', config.rl.overlong_penalty, '0 with rl.adv_std_norm=True')
    if config.rl.prompts_per_step % config.rl.num_microbatches:
      _fail('rl.num_microbatches', config.rl.num_microbatches,
            f'a divisor of rl.prompts_per_step={config.rl.prompts_per_step}')
  if 'reward' in config:
    for k in ('fmt', 'acc', 'con'):
      _positive(config, f'reward.{k}', allow_zero=True)
    if config.reward.fmt + config.reward.acc + config.reward.con <= 0:
      _fail('reward', dict(config.reward), 'at least one positive weight')
  if 'judge' in config:
    _choice(config, 'judge.backend', JUDGE_BACKENDS)
    _choice(config, 'judge.prompt_format', ('judge', 'policy'))
    _choice(config, 'judge.con_mode', CON_MODES)
    w = dict(config.judge.evidence_weights)
    if sorted(w) != sorted(EVIDENCE_PARTS):
      _fail('judge.evidence_weights', w, f'one weight for each of {EVIDENCE_PARTS}')
    for k in EVIDENCE_PARTS:
      _positive(config, f'judge.evidence_weights.{k}', allow_zero=True)
    if config.judge.con_mode == 'evidence' and sum(w.values()) <= 0:
      _fail('judge.evidence_weights', w, 'at least one positive weight')
  if 'sampling' in config:
    _positive(config, 'sampling.max_new_tokens', integer=True)
    _positive(config, 'sampling.temperature')
    if 'rl' in config and (config.sampling.top_k > 0 or config.sampling.top_p < 1.0):
      _fail('sampling.top_k/top_p', (config.sampling.top_k, config.sampling.top_p),
            "0 / 1.0 for Con-GRPO: the update's ratio is under softmax(z / temperature), which top-k / top-p "
            'truncation would make differ from the distribution the rollouts were drawn from')
  if 'vision_warmup' in config and config.vision_warmup.enabled:
    _choice(config, 'vision_warmup.pool', ('flat', 'mean', 'max'))  # = train.vision_warmup.POOLS
    _choice(config, 'vision_warmup.then_pool', ('flat', 'mean', 'max'))
    _positive(config, 'vision_warmup.then_epochs', integer=True, allow_zero=True)
    for k in ('epochs', 'batch_size', 'hidden'):
      _positive(config, f'vision_warmup.{k}', integer=True)
    _positive(config, 'vision_warmup.optim.lr')
    _positive(config, 'vision_warmup.optim.weight_decay', allow_zero=True)
    _positive(config, 'vision_warmup.noise', allow_zero=True)
  if 'eval' in config:
    _choice(config, 'eval.policy', POLICY_SOURCES)
    if not len(config.eval.seeds):
      _fail('eval.seeds', config.eval.seeds, 'at least one seed')
  if 'resume' in config:
    _choice(config, 'resume', ('check', 'allow'))  # = medad_jax.rundir.RESUME_CHOICES
  _positive(config, 'ckpt.keep', integer=True)
  _positive(config, 'ckpt.every_steps', integer=True)
  _positive(config, 'log.every_steps', integer=True)


def _buckets(config, key: str, prefix: str = '') -> None:
  """``config.<key>``: token-count buckets, comma-separated and ascending ('' = the pipeline's defaults)."""
  text = _get(config, key) or ''
  try:
    buckets = [int(x) for x in text.split(',') if x.strip()]
  except ValueError:
    buckets = None
  if buckets is None or any(b <= 0 for b in buckets) or buckets != sorted(set(buckets)):
    _fail(prefix + key, text, "comma-separated positive token counts in ascending order, e.g. "
          "'128,160,192,256' (or '' for the default buckets)")


def _validate_data(d) -> None:
  """``config.data``: sizes the processor and the planner rely on, before any run directory exists."""
  v = d.image_size
  if not isinstance(v, int) or v < 56 or v % 28:
    _fail('data.image_size', v, 'a multiple of 28 (patch 14 x merge 2) and at least 56')
  for k in ('max_prompt_len', 'max_target_len', 'read_threads', 'synth_images'):
    if k in d:
      _positive(d, k, integer=True, prefix='data.')
  if not 0 < d.test_fraction < 1:
    _fail('data.test_fraction', d.test_fraction, 'a fraction in (0, 1)')
  if not d.cache_dir:
    _fail('data.cache_dir', d.cache_dir, 'a directory (relative: under $MEDAD_JAX_CACHE)')
  if d.get('tasks'):
    from medad_jax.data.schema import TASKS
    bad = [t for t in d.tasks.split(',') if t.strip() not in TASKS]
    if bad:
      _fail('data.tasks', d.tasks, f'comma-separated task names among {TASKS} (unknown: {bad})')
  if 'policy' in d:
    _choice(d, 'policy', ('strict', 'skip'), prefix='data.')  # = medad_jax.data.loader.POLICIES
  if 'prompt_length_buckets' in d:
    _buckets(d, 'prompt_length_buckets', prefix='data.')
  if 'patch_buckets' in d and not (isinstance(d.patch_buckets, int) and d.patch_buckets >= 1):
    _fail('data.patch_buckets', d.patch_buckets, 'an integer >= 1')
  if 'max_image_pixels' in d and not isinstance(d.max_image_pixels, int):
    _fail('data.max_image_pixels', d.max_image_pixels, 'an integer (<= 0: no cap)')


def missing_paths(config: ml_collections.ConfigDict) -> list[str]:
  """The ``config.<key> (what)`` entries a run needs but does not have: unset or nonexistent paths.

  Checked by the launcher before any work, so ``--config=congrpo:paper`` says clearly which path is missing.
  """
  out = []

  def need(key: str, what: str):
    v = _get(config, key)
    if not v:
      out.append(f'config.{key} is not set ({what})')
    elif not os.path.exists(v):
      out.append(f'config.{key} = {v!r} does not exist ({what})')

  evaluates_other = config.stage == 'eval' and config.eval.policy in ('hf', 'endpoint')
  from medad_jax.model.config import RANDOM_INIT_PRESETS
  if (config.model.preset not in RANDOM_INIT_PRESETS and not evaluates_other) or config.model.checkpoint:
    need('model.checkpoint', 'a local Hugging Face Qwen2.5-VL directory with config.json and *.safetensors')
  if config.stage == 'eval' and config.eval.policy == 'run':
    need('workdir', 'the run directory whose trained policy is evaluated')
  if config.data.source == 'medad38k':
    need('data.dir', 'the MedAD-38K directory: JSONL annotations + images')
  if 'sft' in config and config.sft.checkpoint:
    need('sft.checkpoint', 'a finished SFT run directory or adapter directory')
  if 'eval' in config and config.eval.policy == 'hf':
    need('eval.hf_dir', 'a local Hugging Face Qwen2.5-VL directory to evaluate')
  return out
