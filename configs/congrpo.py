r"""The paper's pipeline: SFT (unless ``sft.checkpoint`` is given), then Con-GRPO, then the evaluation.

  python -m medad_jax.launch --config=configs/congrpo.py             # embedded CPU miniature (synthetic data)
  python -m medad_jax.launch --config=configs/congrpo.py:paper \
      --config.model.checkpoint=/ckpt/Qwen2.5-VL-3B-Instruct --config.data.dir=/data/MedAD-38K \
      --config.judge.url=http://judge-host:30000
  python -m medad_jax.launch --config=configs/congrpo.py:paper --config.sft.checkpoint=runs/sft-paper-.../

Variants (comma-separated after the colon; combine with ``paper`` for full scale, e.g. ``:paper,acc_only``):
  paper         Qwen2.5-VL-3B (local dir), MedAD-38K, SGLang judge, bf16; G = 8, beta = 0.04, lr 1e-6, 1 epoch.
  Table 2 (ablations of the components):
  rl_only       Con-GRPO from the base model, no SFT stage ("RL-only (Con-GRPO)").
  sft_only      SFT then evaluation, no RL (same as ``configs/sft.py``).
  acc_only      SFT + GRPO with the accuracy reward only: lambda = (0, 1, 0).
  con_only      SFT + GRPO with the consistency reward only: lambda = (0, 0, 1).
  Table 3 (reward weights lambda_fmt, lambda_acc, lambda_con):
  fmt_focused   (0.8, 0.1, 0.1)
  acc_focused   (0.1, 0.8, 0.1)
  con_focused   (0.1, 0.1, 0.8)
  balanced      (1/3, 1/3, 1/3), the default (MedAD-R1).
  Algorithm choices:
  eq8           ratio to pi_SFT as the paper's Eq. 8 writes it (default: to the rollout policy, standard GRPO).
  GRPO variants (WORKSPACE.md "GRPO variants"; each also a one-line override of the ``rl`` keys):
  gspo          sequence-level ratio and clipping (GSPO), clip range 3e-4 / 4e-4 as in the GSPO paper.
  dr_grpo       Dr. GRPO: token sum over a constant (sequences x completion budget), mean-only advantage.
  dapo          DAPO: clip-higher (eps_high 0.28), token-mean aggregation, dynamic sampling with refill (one
                process), soft overlong punishment.
  tis           truncated importance sampling against the sampler's log-probs, cap 2.
  Consistency reward:
  evidence      the evidence-aware R_con (five rubric parts; ``judge.con_mode='evidence'``).
  Miniature only:
  quick         a ~2-minute learning check of the whole policy (CI runs it with ``sft_only``): the ``micro``
                decoder (2 layers of width 128) under the miniature's tower, anomaly detection and lesion
                localisation only, a warm-up of 10 + 5 passes without the position pretext, 400 SFT steps at lr
                3e-3 in which 3 of every 4 examples ask for anomaly detection; the evaluation on their test
                questions (WORKSPACE.md "The embedded default run").

Any single field is a one-line override, e.g. ``--config.rl.beta=0.0 --config.reward.con=0.5``.

Miniature (the default, no variant): what differs from the paper because of scale, set in ``apply_miniature``: the
``mini`` Qwen2.5-VL architecture (4.7M parameters, randomly initialised: there is no pretrained base), a BPE
tokenizer of ~1.5k tokens learned from the synthetic training split's conversations as the chat template renders
them, medad-synth with 1,500 images of 84 px (9 image tokens each), lesions x 1.5 (``data.synth_lesion_scale``: what
a CNN needs to read every task above its prior), 1,350 train / 150 test images (6,750 / 750 questions), answers
written as the option text (``data.answer_format='option'``: a model trained from scratch in minutes does not learn
to look up an option's letter), a vision warm-up before SFT (``vision_warmup``: the random tower trained under a
throw-away head on the training split's answers, 20 passes over its tokens flattened, then 10 over their
mean with a position pretext -- the stand-in for a pretrained vision encoder), SFT of every weight but that tower
(``sft.trainable='decoder'``) at lr 1e-3 (cosine, 30 warmup steps, batch 8, one epoch in which the anomaly, lesion
and pathology questions come twice and half the anatomy and modality questions once = 1,181 steps, padded to
buckets of 16 tokens), Con-GRPO with fresh rank-8 LoRA adapters at lr 1e-3 for 30 steps of 4 prompts x G = 8 drawn
from the same mixture, completions of at most 96 tokens (prompts padded to one
bucket of 80 tokens: one compiled set of rollout and update programs), the ``local`` judge =
the frozen SFT policy (RL adapters off) reading the question and the thought in its own format
(``judge.prompt_format='policy'``), greedy evaluation of pi_SFT and of the final policy on the whole test split,
next to the blind answer-prior baseline, and the final policy again on shuffled images (``eval.image_control``).
Three training seeds on a 2-core AMD EPYC with AVX-512 switched off (``XLA_FLAGS=--xla_cpu_max_isa=AVX2``): pi_SFT
80.04 +- 0.82 %, SFT + Con-GRPO 80.58 +- 1.01 %, shuffled-image control 25.69 % (chance 25 %, answer prior 47.47 %);
570.8 s for seed 0 from scratch on that machine (results differ by machine as seeds do; WORKSPACE.md "The embedded
default run" has the table, the times and what it does not reach yet).
"""

import ml_collections

from configs import common

ABLATIONS = ('rl_only', 'sft_only', 'acc_only', 'con_only', 'fmt_focused', 'acc_focused', 'con_focused',
             'balanced')
ALGORITHMS = ('eq8', 'gspo', 'dr_grpo', 'dapo', 'tis', 'evidence')
VARIANTS = ('paper', 'quick') + ALGORITHMS + ABLATIONS
# The miniature's task mixture (``sft.task_repeats`` and ``rl.task_repeats``; ``pipeline.task_mixture``).
MIXTURE = ('anomaly_detection=2,lesion_localization=2,pathology_characterization=2,anatomy_identification=0.5,'
           'modality_classification=0.5')


def apply_miniature(config: ml_collections.ConfigDict) -> None:
  """The embedded CPU run (see the module docstring for why each setting differs from the paper)."""
  config.model = common.model_config('mini')
  config.data.image_size = 84            # 3x3 merged patches = 9 image tokens (56 px: 4 tokens, 112 px: 16 -- both
                                         # measured worse in this budget, WORKSPACE.md)
  config.data.synth_images = 1500        # 1,350 train / 150 test images = 6,750 / 750 questions (1,000 images: the
  config.data.test_fraction = 0.1        # same steps' SFT read the lesion tasks worse, WORKSPACE.md)
  config.data.synth_lesion_scale = 1.5   # lesions x 1.5: what a CNN needs to clear every target at 84 px (probe)
  config.data.answer_format = 'option'   # <answer>Chest</answer>: no text-to-letter lookup to learn from scratch
  config.data.prompt_length_buckets = '80,128,256'  # the prompts are 52-78 tokens: one compiled set of rollout,
                                         # update and evaluation programs (the default buckets 64 / 96 compiled two)
  config.judge.prompt_format = 'policy'  # the frozen SFT policy reads question + thought in its own format
  if 'vision_warmup' in config:
    config.vision_warmup.enabled = True  # the random tower learns to see first (no pretrained encoder here)
    config.vision_warmup.epochs = 20     # 20 passes over the 1,350 training images (~ the steps of 30 over 850)
    config.vision_warmup.then_epochs = 10  # then 10 passes under a mean-pool head: the findings in the features
                                           # a decoder's attention averages (WORKSPACE.md "pixel ceilings")
    config.vision_warmup.then_position = True  # ... with a position pretext: each token's row and column read
                                           # from its own features (the place a pretrained encoder's tokens carry)
  if 'sft' in config:
    config.sft.trainable = 'decoder'     # every weight but the warmed-up tower (SFT through a decoder that does
                                         # not yet read the lesion would overwrite it; WORKSPACE.md)
    config.sft.batch_size = 8
    config.sft.epochs = 1                # one epoch in which ...
    config.sft.task_repeats = MIXTURE    # ... the three lesion tasks' questions come twice, half the anatomy and
                                         # modality questions once: 1,181 steps (all of them once: 1,350 steps;
                                         # WORKSPACE.md compares the two)
    config.sft.optim.lr = 1e-3
    config.sft.optim.schedule = 'cosine'
    config.sft.optim.warmup_steps = 30
    config.sft.length_buckets = '96,112,128,144,160,192,256'  # the examples are 76-146 tokens: padded to the
                                         # next 16 (the same batches as any bucket list; WORKSPACE.md)
  if 'lora' in config:
    config.lora.rank = 8
    config.lora.alpha = 16.0
  if 'rl' in config:
    config.rl.prompts_per_step = 4       # 4 prompts x G = 8 = 32 rollouts per step
    config.rl.optim.lr = 1e-3            # LoRA adapters from zero: 1e-4 moved the policy by a KL of 3e-5 in 20 steps
    config.rl.max_steps = 30
    config.rl.task_repeats = MIXTURE     # the prompts weighed as SFT's epoch: the tasks not yet learned 2 of every
                                         # 7 prompts each
    # no DAPO dynamic sampling (``rl.dynamic_sampling``, redrawing groups without reward variance): from the same
    # three SFT policies, without it the final policy reads 80.9 +- 2.2 % against 80.4 +- 1.6 with it (lesion 61.1
    # against 59.3), and Con-GRPO draws 30 batches instead of 65-73 (WORKSPACE.md "The embedded default run")
    config.sampling.max_new_tokens = 96  # the synthetic CoTs are 40-60 tokens
    config.rl.overlong_buffer = 24       # DAPO's overlong buffer: the last quarter of the budget
  config.eval.batch_size = 32
  config.eval.max_new_tokens = 96
  config.eval.greedy = True              # one deterministic pass (sampled seeds: --config.eval.greedy=False)
  config.eval.image_control = True       # + the final policy on shuffled images: are the answers read from pixels?
  config.ckpt.every_steps = 400          # SFT saves at 400, 800 and its end (a SIGTERM saves too): a save cost ~0.8 s
                                         # (300 SFT steps: 125.6 / 129.7 s saving every 50, 120.8 / 124.3 s every 1,000)


def apply_quick(config: ml_collections.ConfigDict) -> None:
  """The miniature cut to a learning check of the whole policy in ~2 minutes on 2 cores (the CI test
  ``tests/test_quick_run.py`` runs ``--config=congrpo:sft_only,quick`` through the launcher): the same data, tower
  and SFT recipe, two tasks, fewer passes and steps, and the ``micro`` decoder (WORKSPACE.md "The embedded default
  run", the ``quick`` parts, has the measurements of each setting)."""
  config.model.preset = 'micro'          # mini's vision tower under a 2-layer decoder of width 128: SFT ~3x faster
  config.data.synth_images = 1000        # the data the check was measured on (850 train / 150 test images; the
  config.data.test_fraction = 0.15       # default's 1,500 would make SFT's 400 steps a smaller share of an epoch)
  config.data.tasks = 'anomaly_detection,lesion_localization'  # 2 of the 5 questions per image; the region labels
                                         # train the tower's warm-up on presence too (anomaly detection alone does not)
  config.vision_warmup.epochs = 10       # 10 + 5 passes over 850 images instead of 20 + 10 over 1,350
  config.vision_warmup.then_epochs = 5
  config.vision_warmup.then_position = False
  config.sft.max_steps = 400             # instead of the default's 1,181
  config.sft.epochs = 2                  # (not reached: an epoch is 425 steps)
  config.sft.task_repeats = 'anomaly_detection=3'  # 3 of every 4 examples ask for anomaly detection, the task the
                                         # check reads (the lesion questions are there for the warm-up's labels)
  config.rl.task_repeats = ''
  config.sft.optim.lr = 3e-3
  config.rl.max_steps = 10


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants = common.parse_variants(arg, VARIANTS)
  rewards = [v for v in variants if v in common.REWARD_WEIGHTS]
  if len(rewards) > 1:
    raise ValueError(f'config variants {rewards} all set the reward weights; pick one')
  config = common.run_config('congrpo')
  config.model = common.model_config('small')
  config.lora = common.lora_config()
  config.data = common.data_config('synth')
  config.sft = common.sft_config()
  config.vision_warmup = common.vision_warmup_config()
  config.rl = common.rl_config()
  config.sampling = common.sampling_config()
  config.reward = common.reward_config(rewards[0] if rewards else 'balanced')
  config.judge = common.judge_config('local')
  config.eval = common.eval_config()
  if 'paper' in variants:
    if 'quick' in variants:
      raise ValueError("config variant 'quick' is the miniature's learning check; it does not combine with 'paper'")
    common.apply_paper_scale(config)
  else:
    apply_miniature(config)
    if 'quick' in variants:
      apply_quick(config)
  if 'rl_only' in variants:
    config.sft.enabled = False
  if 'sft_only' in variants:
    config.rl.enabled = False
  if 'eq8' in variants:
    config.rl.ratio_to = 'sft'
  if 'gspo' in variants:
    config.rl.loss = 'gspo'
    config.rl.eps_low, config.rl.eps_high = 3e-4, 4e-4
  if 'dr_grpo' in variants:
    config.rl.loss = 'dr_grpo'
  if 'dapo' in variants:
    config.rl.eps_high = 0.28
    config.rl.aggregation = 'token_mean'
    config.rl.dynamic_sampling = True
    config.rl.overlong_penalty = 1.0
  if 'tis' in variants:
    config.rl.tis_cap = 2.0
  if 'evidence' in variants:
    config.judge.con_mode = 'evidence'
  config.name = '-'.join(['congrpo'] + variants)
  config.lock()
  return config
