"""What every stage builds before it trains or evaluates: mesh, data, tokenizer, model, processor and batches.

The trainers (``sft.py``, ``congrpo.py``, ``evaluate.py``) read top to bottom and call these functions; a notebook
can call them too. Everything is driven by the experiment config (``configs/common.py``).

Data (``config.data``)
  ``synth``: the medad-synth benchmark (``medad_jax.data.synth``) with ``data.synth_images`` images of
  ``data.image_size`` px, built once as a TFDS ``array_record`` dataset under ``data.cache_dir`` and reused by any
  later run with the same settings. ``medad38k``: the JSONL + images directory ``data.dir``, built the same way.
  Either way the splits are read through ``tfds_builders.RecordSource`` (random access by question).

Tokenizer (``config.model.tokenizer``)
  ``qwen2``: the Qwen2 BPE (rebuilt offline, or the checkpoint's own ``tokenizer.json``). ``small``: a byte-level
  BPE of ``model.vocab_size`` tokens learned from the training split's questions and targets (cached next to the
  dataset), for the miniature whose embedding table would otherwise dwarf the rest of the model.

Batches
  SFT: ``processor(image, question, target)`` per record, right-padded to a length bucket, each image padded to
  a patches-per-image bucket (:func:`patch_buckets`; so the step compiles once per bucket pair), M-RoPE positions
  and the target positions on the host (:func:`sft_batch`). RL / evaluation: prompt-only processor outputs, turned into the sampler's
  left-padded ``PromptBatch`` by :func:`prompt_batch`. Record metadata (formatted question, option texts, answer
  letter, task) rides along for the rewards.

Axis letters as in ``medad_jax/rl/update.py``: B rows, T tokens, L patches, C patch vector.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np

from medad_jax.data.schema import LETTERS, TASKS, MedADRecord, format_question, format_target, load_image
from medad_jax.model.config import Qwen25VLConfig

log = logging.getLogger(__name__)

DEFAULT_CACHE = os.path.join('~', '.cache', 'medad_jax')
SFT_LENGTH_BUCKETS = (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
PROMPT_LENGTH_BUCKETS = (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
# Few and coarse: the answer's length only sets how many positions go through the (chunked) LM head.
TARGET_LENGTH_BUCKETS = (32, 128, 512, 1024, 2048, 4096)


def cache_root(config) -> str:
  """``data.cache_dir``, with ``~`` expanded; a relative path is taken under ``$MEDAD_JAX_CACHE`` (default
  ``~/.cache/medad_jax``), so the synthetic benchmark and its tokenizer are built once per machine."""
  d = os.path.expanduser(config.data.cache_dir)
  if not os.path.isabs(d):
    d = os.path.join(os.path.expanduser(os.environ.get('MEDAD_JAX_CACHE', DEFAULT_CACHE)), d)
  os.makedirs(d, exist_ok=True)
  return d


# ------------------------------------------------------------------------------------------------------ mesh


def make_mesh(config):
  """The (data, fsdp, tensor) mesh of ``config.mesh`` over the local devices."""
  from medad_jax.sharding import make_mesh as _make
  m = config.mesh
  devices = jax.devices() if m.devices == -1 else jax.devices()[:m.devices]
  mesh = _make(m.data, m.fsdp, m.tensor, devices=devices)
  log.info('mesh %s over %d %s device(s)', dict(mesh.shape), mesh.size, jax.devices()[0].platform)
  return mesh


# ------------------------------------------------------------------------------------------------------ data


@dataclasses.dataclass(frozen=True)
class Data:
  """The built dataset: ``train`` / ``test`` are random-access sequences of ``MedADRecord``."""
  builder_dir: str
  train: Sequence[MedADRecord]
  test: Sequence[MedADRecord]
  report: dict = dataclasses.field(default_factory=dict)  # used / skipped-by-reason counts (data/lengths.py)
  lengths: dict = dataclasses.field(default_factory=dict)  # split -> prompt + target tokens per record (same order)


def build_data(config) -> Data:
  """Builds (first use) or reuses the dataset ``config.data`` names; see the module docstring."""
  import tensorflow_datasets as tfds

  from medad_jax.data import synth, tfds_builders
  tfds.disable_progress_bar()  # the build logs one line; tqdm bars would bury the progress line
  d = config.data
  tfds_dir = os.path.join(cache_root(config), 'tfds')
  if d.source == 'synth':
    scfg = synth.SynthConfig(num_images=d.synth_images, seed=d.synth_seed, image_size=d.image_size,
                             test_fraction=d.test_fraction, cot_letters=d.answer_format == 'letter',
                             lesion_scale=d.get('synth_lesion_scale', 1.0))
    log.info('data: medad-synth %s (built once under %s)', scfg, tfds_dir)
    builder_dir = tfds_builders.build_synth(scfg, tfds_dir)
  elif d.source == 'medad38k':
    if not d.dir or not os.path.isdir(d.dir):
      raise FileNotFoundError(f'config.data.dir = {d.dir!r}: expected the MedAD-38K directory (JSONL + images)')
    builder_dir = tfds_builders.build_medad38k(d.dir, tfds_dir, policy=d.policy,
                                               max_image_pixels=d.max_image_pixels)
  else:
    raise ValueError(f'config.data.source = {d.source!r}: expected synth or medad38k')
  train = tfds_builders.RecordSource(builder_dir, 'train')
  test = tfds_builders.RecordSource(builder_dir, 'test')
  tasks = data_tasks(config)
  if tasks:
    train, test = (_only_tasks(s, tasks) for s in (train, test))
    if not len(train) or not len(test):
      raise ValueError(f'config.data.tasks = {d.tasks!r}: {builder_dir} has {len(train)} train / {len(test)} test '
                       'questions of those tasks; expected some of each')
  log.info('data: %d train / %d test questions in %s%s', len(train), len(test), builder_dir,
           f' (tasks {", ".join(tasks)})' if tasks else '')
  return Data(builder_dir, train, test)


def data_tasks(config) -> tuple[str, ...]:
  """The tasks ``config.data.tasks`` keeps (sorted; empty: every task)."""
  return tuple(sorted({t.strip() for t in (config.data.get('tasks') or '').split(',') if t.strip()}))


def _record_field(source, field: str) -> list[str]:
  """``field`` (``task``, ``image_id``) of each question of ``source``, in order (each image's example read once
  where the source can)."""
  from medad_jax.data.lengths import Subset
  if isinstance(source, Subset):
    inner = _record_field(source.source, field)
    return [inner[i] for i in source.indices]
  records = source.iter_records() if hasattr(source, 'iter_records') else (source[i] for i in range(len(source)))
  return [getattr(r, field) for r in records]


def _record_tasks(source) -> list[str]:
  return _record_field(source, 'task')


def holdout_split(image_ids: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
  """Question indices ``(kept, held_out)``: the questions of ``round(fraction * images)`` of the distinct images
  held out, the images ranked by the SHA-1 of their id -- a draw that depends on the ids only (the same images
  for every training seed, process count and record order); ``fraction`` in [0, 1)."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'config.data.rl_holdout = {fraction!r}: expected a fraction in [0, 1)')
  images = sorted(set(image_ids), key=lambda i: (hashlib.sha1(i.encode()).hexdigest(), i))
  held = set(images[:round(fraction * len(images))])
  kept = [q for q, i in enumerate(image_ids) if i not in held]
  return kept, [q for q, i in enumerate(image_ids) if i in held]


def train_part(run: 'Run', stage: str):
  """-> ``(source, lengths)`` of the training split a stage reads: with ``data.rl_holdout`` > 0, the vision
  warm-up and SFT (``stage='sft'``) read the questions of the images not held out, Con-GRPO (``'rl'``) those of
  the held-out images; otherwise both read the whole split. ``lengths``: tokens per record (None where the run
  has none)."""
  from medad_jax.data.lengths import Subset
  if stage not in ('sft', 'rl'):
    raise ValueError(f'stage {stage!r}: expected sft or rl')
  train, lengths = run.data.train, run.data.lengths.get('train')
  fraction = float(run.config.data.get('rl_holdout') or 0.0)
  if not fraction:
    return train, lengths
  kept, held = holdout_split(_record_field(train, 'image_id'), fraction)
  index = kept if stage == 'sft' else held
  if not index:
    raise ValueError(f'config.data.rl_holdout = {fraction}: no {stage} questions left of {len(train)}')
  return Subset(train, index), None if lengths is None else [lengths[i] for i in index]


def _only_tasks(source, tasks: tuple[str, ...]):
  from medad_jax.data.lengths import Subset
  return Subset(source, [i for i, t in enumerate(_record_tasks(source)) if t in tasks])


def task_repeats(config, stage: str = 'sft') -> dict[str, float]:
  """``config.<stage>.task_repeats`` parsed (:func:`medad_jax.data.schema.parse_task_repeats`); ``stage`` is
  ``'sft'`` (the SFT epoch) or ``'rl'`` (Con-GRPO's prompts)."""
  from medad_jax.data.schema import parse_task_repeats
  text = (config[stage].get('task_repeats') or '') if stage in config else ''
  try:
    return parse_task_repeats(text)
  except ValueError as e:
    raise ValueError(f'config.{stage}.task_repeats = {text!r}: {e}') from None


def task_mixture(source, lengths, repeats: dict[str, float]):
  """-> ``(source, lengths)`` with each record of a task in ``repeats`` that many times (a data-mixture weight:
  a shuffled epoch spreads the copies), the others once; ``source`` itself when ``repeats`` is empty.

  A weight ``k + f`` (``0 <= f < 1``) gives each of the task's questions ``k`` copies and ``round(f * n)`` of its
  ``n`` questions one more: those first by the SHA-1 of their ids, so the same questions for every training seed,
  process count and record order (0.5: half the task's questions, once each)."""
  from medad_jax.data.lengths import Subset
  if not repeats:
    return source, lengths
  tasks, ids = _record_tasks(source), _record_field(source, 'id')
  extra = set()
  for task, weight in repeats.items():
    mine = sorted((q for q, t in enumerate(tasks) if t == task),
                  key=lambda q: (hashlib.sha1(ids[q].encode()).hexdigest(), q))
    extra.update(mine[:round((weight % 1) * len(mine))])
  index = [q for q, t in enumerate(tasks) for _ in range(int(repeats.get(t, 1)) + (q in extra))]
  return Subset(source, index), None if lengths is None else [lengths[i] for i in index]


def sft_records(run: 'Run'):
  """-> ``(source, lengths)`` an SFT epoch reads: the training split's SFT part (:func:`train_part`), each
  question of a task in ``sft.task_repeats`` repeated that many times (a data-mixture weight: the copies are
  spread over the epoch by its shuffle), and its tokens per record (None where the run has no lengths)."""
  return task_mixture(*train_part(run, 'sft'), task_repeats(run.config, 'sft'))


def rl_records(run: 'Run'):
  """The questions Con-GRPO draws its prompts from: the training split's RL part (:func:`train_part`), each
  question of a task in ``rl.task_repeats`` that many times (tasks the SFT policy has already learned give
  groups of equal rewards, which carry no advantage and which dynamic sampling draws again)."""
  return task_mixture(train_part(run, 'rl')[0], None, task_repeats(run.config, 'rl'))[0]


# ------------------------------------------------------------------------------------------------- tokenizer


def corpus_texts(records: Sequence[MedADRecord], answer_format: str = 'letter') -> list[str]:
  """The strings the small tokenizer learns from: every training conversation as the model reads it -- the chat
  template's prompt (system turn, roles, question with options) and the SFT target. Learning from the bare question
  and target left the template's words to single bytes (``assistant`` was 5 tokens, the system turn 17)."""
  from medad_jax.processor import render_prompt, render_target
  out = []
  for i in range(len(records)):
    r = records[i]
    out.append(render_prompt(format_question(r)))
    if r.cot is not None:
      out.append(render_target(format_target(r, answer_format)))
  return out


def build_tokenizer(config, data: Data | None):
  """The tokenizer ``config.model.tokenizer`` names (see the module docstring)."""
  kind = config.model.tokenizer
  if kind == 'qwen2' or checkpoint_dir(config) != config.model.checkpoint:
    from medad_jax.api import load_tokenizer
    return load_tokenizer(checkpoint_dir(config))
  if kind != 'small':
    raise ValueError(f"config.model.tokenizer = {kind!r}: expected 'qwen2' or 'small'")
  from transformers import Qwen2Tokenizer

  from medad_jax.tokenizer import train_small_tokenizer
  if data is None:
    raise ValueError("config.model.tokenizer = 'small' needs the training data to learn its vocabulary")
  fmt = config.data.answer_format
  # The vocabulary is learned from the training questions: what selects them (the build, the kept tasks) is in the key.
  tasks = ','.join(data_tasks(config))
  key = hashlib.sha1(f'{data.builder_dir}|{config.model.vocab_size}|{fmt}|v2{"|" + tasks if tasks else ""}'
                     .encode()).hexdigest()[:12]
  path = os.path.join(cache_root(config), 'tokenizers', f'small-{config.model.vocab_size}-{key}')
  if os.path.exists(os.path.join(path, 'tokenizer_config.json')):
    tok = Qwen2Tokenizer.from_pretrained(path)
    log.info('tokenizer: small BPE (%d tokens) from %s', len(tok), path)
    return tok
  tok = train_small_tokenizer(corpus_texts(data.train, fmt), config.model.vocab_size)
  tmp = f'{path}.tmp-{os.getpid()}'
  tok.save_pretrained(tmp)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  try:
    os.replace(tmp, path)
  except OSError:  # another process finished first: use theirs
    pass
  log.info('tokenizer: trained a small BPE (%d tokens) on the training split, cached at %s', len(tok), path)
  return Qwen2Tokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------------- model


def checkpoint_dir(config) -> str | None:
  """The HF directory the model comes from: ``eval.hf_dir`` when evaluating one, else ``model.checkpoint``."""
  if config.stage == 'eval' and config.eval.policy == 'hf':
    return config.eval.hf_dir
  return config.model.checkpoint


def model_config(config, tokenizer) -> Qwen25VLConfig:
  """The architecture: the checkpoint's ``config.json`` when ``model.checkpoint`` is set, else ``model.preset``
  with the tokenizer's vocabulary and special-token ids."""
  from medad_jax.model.config import from_hf_config
  from medad_jax.tokenizer import config_for_tokenizer
  m = config.model
  ckpt = checkpoint_dir(config)
  if ckpt:
    cfg = from_hf_config(ckpt)
  else:
    cfg = config_for_tokenizer(Qwen25VLConfig.preset(m.preset), tokenizer, vocab_multiple=64)
  return cfg.replace(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention=m.attention,
                     decode_scan=m.decode_scan)


def build_model(config, cfg: Qwen25VLConfig, seed: int):
  """The base policy: loaded from ``model.checkpoint`` or randomly initialised (the miniature)."""
  from flax import nnx

  from medad_jax.model.checkpoint import load_checkpoint
  from medad_jax.model.qwen25vl import Qwen25VL
  if config.model.checkpoint:
    model, _ = load_checkpoint(config.model.checkpoint, cfg=cfg)
    return model
  return Qwen25VL(cfg, rngs=nnx.Rngs(seed))


def lora_config(config):
  from medad_jax.model.lora import LoraConfig
  lc = config.lora
  return LoraConfig(rank=lc.rank, alpha=lc.alpha, pattern=lc.pattern, seed=config.seed)


def build_processor(config, tokenizer, cfg: Qwen25VLConfig):
  """The Qwen2.5-VL processor, resizing images to at most ``data.image_size`` squared pixels."""
  from medad_jax.processor import DEFAULT_MIN_PIXELS, Qwen25VLProcessor
  max_pixels = config.data.image_size ** 2
  return Qwen25VLProcessor(tokenizer, cfg.vision, min_pixels=min(DEFAULT_MIN_PIXELS, max_pixels),
                           max_pixels=max_pixels)


# --------------------------------------------------------------------------------------------------- batches


def record_meta(r: MedADRecord) -> dict[str, Any]:
  """Host-side metadata of one record for rewards and evaluation."""
  return {'id': r.id, 'image_id': r.image_id, 'question': format_question(r), 'options': list(r.options),
          'answer': r.answer, 'task': r.task}


def patch_buckets(config, cfg: Qwen25VLConfig, data: 'Data | None' = None, processor=None) -> tuple[int, ...]:
  """Patches-per-image buckets (each image is padded alone to the smallest bucket that holds it, so the number of
  compiled programs per sequence-length bucket is at most the number of buckets).

  A MedAD directory (``data`` and ``processor`` given): the ``data.patch_buckets`` sizes that waste the least
  padding on its own images, train and test (``medad_jax.data.buckets``). Otherwise (medad-synth: every image the
  same size): the largest count ``data.image_size`` allows (the processor never exceeds ``max_pixels =
  image_size**2``) plus the sampler's smaller defaults.
  """
  from medad_jax.sampling.prompts import DEFAULT_PATCH_BUCKETS
  unit = cfg.vision.spatial_merge_size ** 2
  if data is not None and processor is not None and config.data.source != 'synth':
    from medad_jax.data.buckets import choose_buckets, image_patch_counts
    counts = np.concatenate([image_patch_counts(data.train, processor), image_patch_counts(data.test, processor)])
    if len(counts):
      buckets = tuple(-(-int(b) // unit) * unit for b in choose_buckets(counts, config.data.patch_buckets))
      log.info('data: %d image sizes -> patch buckets %s', len(np.unique(counts)), buckets)
      return buckets
  side = cfg.vision.patch_size * cfg.vision.spatial_merge_size
  largest = (config.data.image_size // side) ** 2 * unit
  return tuple(sorted({b for b in DEFAULT_PATCH_BUCKETS if b < largest} | {largest}))


def sft_batch(examples: Sequence[dict], cfg: Qwen25VLConfig, buckets: Sequence[int] = SFT_LENGTH_BUCKETS,
              patch_buckets: Sequence[int] | None = None,
              target_buckets: Sequence[int] = TARGET_LENGTH_BUCKETS) -> dict:
  """Processor outputs (with ``loss_mask``) -> the SFT step's batch (``update.SFT_KEYS`` + images + targets).

  Images are laid out per row, each padded to its own patch bucket (``sampling/prompts.py``), so the vision tower
  runs per image and a microbatch of rows owns its images. ``target_pos_BM`` / ``target_ids_BM`` /
  ``target_mask_BM`` list, per row, the positions that predict an assistant token (``M`` = a bucket of the longest
  answer among ``target_buckets``), so the step computes LM-head logits only there.
  """
  from medad_jax.model.rope_index import rope_index
  from medad_jax.processor import pad_batch
  from medad_jax.sampling.prompts import DEFAULT_PATCH_BUCKETS, _per_image, pick_bucket
  b = pad_batch(examples, buckets, cfg.pad_token_id, padding_side='right')
  ids, attn = b['input_ids'], b['attention_mask']
  grid = b['image_grid_thw'] if b['image_grid_thw'] is not None and len(b['image_grid_thw']) else None
  positions, _ = rope_index(cfg, ids, attn, grid)
  loss = np.asarray(b['loss_mask']).astype(bool).copy()
  loss[:, 0] = False  # the first token has no prediction
  n_tgt = loss.sum(1)
  M = pick_bucket(max(1, int(n_tgt.max())), target_buckets, 'target tokens of one example')
  B = ids.shape[0]
  pos = np.zeros((B, M), np.int32)
  tids = np.full((B, M), cfg.pad_token_id, np.int32)
  tmask = np.zeros((B, M), np.int32)
  for r in range(B):
    t = np.nonzero(loss[r])[0]
    pos[r, :t.size], tids[r, :t.size], tmask[r, :t.size] = t - 1, ids[r, t], 1
  out = {'input_ids_BT': ids, 'attention_mask_BT': attn, 'positions_3BT': positions, 'loss_mask_BT': b['loss_mask'],
         'target_pos_BM': pos, 'target_ids_BM': tids, 'target_mask_BM': tmask}
  if grid is not None:
    pixels, meta, src = _per_image(cfg, np.asarray(b['pixel_values'], np.float32), np.asarray(grid, np.int64),
                                   np.asarray(ids), np.asarray(attn), B, patch_buckets or DEFAULT_PATCH_BUCKETS)
    out.update(pixel_values_ILC=pixels, vision_meta_I=meta, image_src_BT=src)
  return out


def sft_preprocess(processor, answer_format: str = 'letter'):
  """grain ``preprocess`` for SFT: one record -> processor output with its loss mask (``answer_format``: what the
  target's answer block holds, ``data.answer_format``)."""
  def fn(r: MedADRecord) -> dict:
    return dict(processor(load_image(r), format_question(r), format_target(r, answer_format)))
  return fn


def prompt_preprocess(processor):
  """grain ``preprocess`` for RL and evaluation: one record -> prompt-only processor output + metadata."""
  def fn(r: MedADRecord) -> dict:
    out = dict(processor(load_image(r), format_question(r), None))
    out['meta'] = record_meta(r)
    return out
  return fn


def list_batch(elements: Sequence[dict]) -> list[dict]:
  """grain ``batch_fn`` keeping the elements as a list (the trainer pads them itself)."""
  return list(elements)


def prompt_batch(examples: Sequence[dict], cfg: Qwen25VLConfig, num_prompts: int | None = None,
                 patch_buckets: Sequence[int] | None = None, length_buckets: Sequence[int] = PROMPT_LENGTH_BUCKETS):
  """Prompt-only processor outputs -> the sampler's ``PromptBatch`` (padded to ``num_prompts`` rows, and to the
  smallest of ``length_buckets`` that holds the longest prompt)."""
  from medad_jax.sampling.prompts import DEFAULT_PATCH_BUCKETS, prepare_prompts
  return prepare_prompts(cfg, [ex['input_ids'] for ex in examples],
                         pixel_values=np.concatenate([ex['pixel_values'] for ex in examples]),
                         image_grid_thw=np.concatenate([ex['image_grid_thw'] for ex in examples]),
                         length_buckets=length_buckets, num_prompts=num_prompts,
                         patch_buckets=patch_buckets or DEFAULT_PATCH_BUCKETS)


def decode_completions(tokenizer, tokens_BN: np.ndarray, lengths_B: np.ndarray) -> list[str]:
  """Sampled tokens -> text (control tokens dropped; the think / answer tags are ordinary tokens and stay)."""
  return [tokenizer.decode(tokens_BN[b, :lengths_B[b]].tolist(), skip_special_tokens=True)
          for b in range(tokens_BN.shape[0])]


def stop_table(tokenizer, cfg: Qwen25VLConfig):
  """Stop-string automata for ``</answer>`` (a completion ends when its text closes the answer)."""
  from medad_jax.sampling import stops
  return stops.tokenizer_stop_table(tokenizer, ('</answer>',), cfg.text.vocab_size)


def sampling_config(sampling, cfg: Qwen25VLConfig, *, greedy: bool = False, max_new_tokens: int | None = None):
  from medad_jax.sampling.ops import SamplingConfig
  return SamplingConfig(max_new_tokens=max_new_tokens or sampling.max_new_tokens,
                        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                        greedy=greedy, stop_token_ids=tuple(cfg.eos_token_ids))


def reward_weights(config):
  from medad_jax.rewards import RewardWeights
  evidence = dict(config.judge.evidence_weights) if 'judge' in config and 'evidence_weights' in config.judge else None
  return RewardWeights(fmt=config.reward.fmt, acc=config.reward.acc, con=config.reward.con, evidence=evidence)


def judge_config(config):
  """``config.judge`` -> ``medad_jax.judge.JudgeConfig``."""
  from medad_jax.judge import JudgeConfig
  j = config.judge
  return JudgeConfig(backend=j.backend, url=j.url, model=j.model, timeout_s=j.timeout_s, max_retries=j.max_retries,
                     concurrency=j.concurrency, deadline_s=j.deadline_s, on_failure=j.on_failure,
                     api_key_env=j.api_key_env, template=j.template, con_mode=j.get('con_mode', 'deduce'))


def write_json(path: str, obj) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def task_index(task: str) -> int:
  return TASKS.index(task)


def letter_index(letter: str) -> int:
  return LETTERS.index(letter)


# ------------------------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class Run:
  """What the stages of one run share (built once by :func:`setup`)."""
  config: Any
  workdir: str
  mesh: Any
  data: Data
  tokenizer: Any
  model_cfg: Qwen25VLConfig
  processor: Any
  logger: Any
  timings: dict = dataclasses.field(default_factory=dict)   # stage -> wall seconds
  patch_buckets: tuple = ()                                 # patches per image (:func:`patch_buckets`)

  def mesh_or_none(self):
    """The mesh when it spans several devices; None on one device (plain ``jax.jit``, no sharding)."""
    return self.mesh if self.mesh is not None and self.mesh.size > 1 else None


def setup(config, workdir: str, *, config_name: str = 'config.json') -> Run:
  """Mesh, data, tokenizer, model config, processor and the metrics logger of a run.

  ``config_name``: where the resolved config is written (an evaluation of a finished run writes
  ``eval_config.json`` and leaves the run's own ``config.json`` alone).
  """
  from medad_jax.metrics import MetricsLogger
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:   # one writer of the run directory (medad_jax/launch.py)
    with open(os.path.join(workdir, config_name), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  mesh = make_mesh(config)
  data = build_data(config)
  tok = build_tokenizer(config, data)
  cfg = model_config(config, tok)
  proc = build_processor(config, tok, cfg)
  from medad_jax.data.lengths import apply_limits
  data = dataclasses.replace(data, **apply_limits(config.data, data, proc))
  logger = MetricsLogger(workdir, tensorboard=config.log.tensorboard)
  return Run(config, workdir, mesh, data, tok, cfg, proc, logger, patch_buckets=patch_buckets(config, cfg, data, proc))


@dataclasses.dataclass
class StageResult:
  """What a training stage returns: the model's static graph, its final ``TrainState``, and whether it stopped
  early on SIGTERM (a checkpoint was saved)."""

  graphdef: Any
  state: Any
  preempted: bool = False


def num_steps(epochs: int, num_examples: int, per_step: int, max_steps: int) -> int:
  """Optimizer steps of a stage: ``epochs`` passes over ``num_examples`` at ``per_step`` examples a step, capped
  at ``max_steps`` when it is positive."""
  n = max(1, epochs * num_examples // per_step)
  return min(n, max_steps) if max_steps > 0 else n
