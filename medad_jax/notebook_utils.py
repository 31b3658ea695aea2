"""Helpers the notebooks in ``notebooks/`` call: budgets, markdown tables, class balance, the rollout table, run
directories (metrics curves, evaluation results) and the paper's ablation tables side by side with ours.

The logic lives here (and is tested in ``tests/test_notebooks.py``) so that a notebook cell is a call and a
display, never an algorithm. matplotlib is imported only by the plotting functions.

Run directory layout read here (written by ``python -m medad_jax.launch``): ``config.json``, ``metrics.jsonl``,
``eval/results.json`` (see ``medad_jax/train/evaluate.py``: ``policies[i].per_seed[j]`` holds per-task accuracy
fractions, ``policies[i].mean`` / ``.std`` their mean and std over evaluation seeds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

BUDGETS = ('ci', 'full')
BUDGET_ENV = 'MEDAD_NB_BUDGET'

# ---------------------------------------------------------------------------------------- the paper's numbers

# MedAD-R1, Table 2 ("Ablation study of different model components on the MedAD-38K testset. Results are mean
# Overall Accuracy (%) ± std."): (row, our config variant, mean, std).
PAPER_TABLE2: tuple[tuple[str, str, float, float], ...] = (
    ('RL-only (Con-GRPO)', 'rl_only', 73.22, 2.58),
    ('SFT-only', 'sft_only', 75.41, 1.19),
    ('SFT + GRPO (Acc-only)', 'acc_only', 78.85, 1.08),
    ('SFT + GRPO (Con-only)', 'con_only', 81.73, 1.12),
    ('MedAD-R1 (Full Model)', 'balanced', 85.15, 0.95),
)

# MedAD-R1, Table 3 ("Ablation of reward weights in the Con-GRPO algorithm."):
# (row, our config variant, (lambda_fmt, lambda_acc, lambda_con), mean accuracy %, std).
PAPER_TABLE3: tuple[tuple[str, str, tuple[float, float, float], float, float], ...] = (
    ('Format-focused', 'fmt_focused', (0.8, 0.1, 0.1), 77.13, 1.35),
    ('Accuracy-focused', 'acc_focused', (0.1, 0.8, 0.1), 82.54, 1.02),
    ('Consistency-focused', 'con_focused', (0.1, 0.1, 0.8), 84.21, 0.98),
    ('Balanced (Ours)', 'balanced', (1 / 3, 1 / 3, 1 / 3), 85.15, 0.95),
)

# The reward weights of the Table 2 reward ablations (the paper's text: accuracy reward only / consistency only).
_TABLE2_WEIGHTS = {'acc_only': (0.0, 1.0, 0.0), 'con_only': (0.0, 0.0, 1.0), 'balanced': (1 / 3, 1 / 3, 1 / 3)}


def budget() -> str:
  """``$MEDAD_NB_BUDGET`` (``ci``: shrink every size so a notebook runs in about a minute; ``full``: the default)."""
  b = os.environ.get(BUDGET_ENV, 'full').strip().lower()
  if b not in BUDGETS:
    raise ValueError(f'${BUDGET_ENV} = {b!r}: expected one of {BUDGETS}')
  return b


# ---------------------------------------------------------------------------------------------- tables


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return 'nan' if math.isnan(v) else f'{v:.3f}'
  return str(v).replace('|', '\\|').replace('\n', ' ')


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; floats with 3 decimals, ``|`` and newlines in cells escaped."""
  for i, r in enumerate(rows):
    if len(r) != len(headers):
      raise ValueError(f'row {i} has {len(r)} cells, expected {len(headers)} ({list(headers)})')
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + ' --- |' * len(headers)]
  lines += ['| ' + ' | '.join(_fmt(c) for c in r) + ' |' for r in rows]
  return '\n'.join(lines)


def mean_std_cell(values: Sequence[float], scale: float = 100.0) -> str:
  """``'85.15 ± 0.95 (n=3)'`` (population std, as ``evaluate.Result.mean_std``); ``'-'`` when there are none."""
  v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64) * scale
  if v.size == 0:
    return '-'
  return f'{v.mean():.2f} ± {v.std():.2f} (n={v.size})'


# ---------------------------------------------------------------------------------------------- data explorer


BALANCE_AXES = ('task', 'modality', 'answer', 'region')


def _vocab_order() -> dict[str, tuple[str, ...]]:
  from medad_jax.data.regions import REGIONS
  from medad_jax.data.schema import ANATOMIES, LETTERS, MODALITIES, TASKS
  return {'task': TASKS, 'modality': MODALITIES, 'anatomy': ANATOMIES, 'answer': LETTERS,
          'region': (*REGIONS, 'none')}


def balance_rows(summary: Mapping[str, Mapping], axis: str) -> tuple[list[str], list[list[Any]]]:
  """Headers and rows (one per value of ``axis``, one count column per split) of a ``data.report.summarize``
  result, in the summary's order (vocabulary order for task / modality / answer / region)."""
  splits = sorted(summary)
  keys: list[str] = []
  for s in splits:
    if axis not in summary[s]:
      raise KeyError(f'summary of split {s!r} has no axis {axis!r}; axes: {sorted(summary[s])}')
    keys += [k for k in summary[s][axis] if k not in keys]
  order = _vocab_order().get(axis)
  if order:  # the splits may hold different values: one vocabulary order across them
    keys.sort(key=lambda k: order.index(k) if k in order else len(order))
  rows = [[k, *(summary[s][axis].get(k, 0) for s in splits)] for k in keys]
  return [axis, *splits], rows


def plot_balance(summary: Mapping[str, Mapping], axes: Sequence[str] = BALANCE_AXES):
  """One bar chart per axis (bars per split); returns the matplotlib figure."""
  import matplotlib
  matplotlib.use('Agg')  # headless (CI); the notebook shows the returned figure inline
  import matplotlib.pyplot as plt
  fig, axs = plt.subplots(len(axes), 1, figsize=(10, 2.6 * len(axes)), squeeze=False)
  for ax, axis in zip(axs[:, 0], axes):
    headers, rows = balance_rows(summary, axis)
    x = np.arange(len(rows))
    width = 0.8 / (len(headers) - 1)
    for j, split in enumerate(headers[1:]):
      ax.bar(x + j * width, [r[j + 1] for r in rows], width, label=split)
    ax.set_xticks(x + 0.4 - width / 2, [str(r[0]) for r in rows], rotation=20, ha='right', fontsize=8)
    ax.set_ylabel('records')
    ax.set_title(f'records per {axis}')
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


# ---------------------------------------------------------------------------------------------- rollout explorer


def rollout_rows(texts: Sequence[str], *, question: str, options: Sequence[str], answer: str, judge,
                 weights, std_norm: bool = False) -> tuple[list[dict], Any]:
  """One row per sample of a group of ``G`` completions for one question: think, answer, R_fmt, R_acc, R_con,
  the judge's verdict, the total reward R (Eq. 3) and the group-relative advantage (Eq. 7).

  ``question`` is the formatted question with its options (what the judge reads). Returns ``(rows, breakdown)``
  with the ``rewards.RewardBreakdown`` the rows were read from.
  """
  import jax.numpy as jnp

  from medad_jax.rewards import parse_completions, score_batch
  from medad_jax.rl.algo import group_advantages
  G = len(texts)
  if G == 0:
    raise ValueError('rollout_rows needs at least one completion')
  rb = score_batch(list(texts), answers=[answer] * G, questions=[question] * G, options=[list(options)] * G,
                   judge=judge, weights=weights)
  adv_G = np.asarray(group_advantages(jnp.asarray(rb.total)[None], std_norm=std_norm))[0]
  parsed = parse_completions(list(texts), [list(options)] * G)
  rows = []
  for g, p in enumerate(parsed):
    rows.append({'sample': g, 'think': p.thought, 'answer': p.answer_text, 'letter': p.letter,
                 'R_fmt': float(rb.fmt[g]), 'R_acc': float(rb.acc[g]), 'R_con': float(rb.con[g]),
                 'verdict': rb.verdicts[g] if rb.judged[g] else '(not judged)', 'R': float(rb.total[g]),
                 'advantage': float(adv_G[g]), 'problem': p.problem or 'ok'})
  return rows, rb


def shorten(text: str | None, n: int = 80) -> str:
  """``text`` on one line, cut to ``n`` characters with an ellipsis (None -> '(none)')."""
  if text is None:
    return '(none)'
  t = ' '.join(text.split())
  return t if len(t) <= n else t[:n - 1] + '…'


# ---------------------------------------------------------------------------------------------- run directories


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """One run directory: its resolved config, metrics records and (when the evaluation ran) its results."""
  path: str
  config: dict
  metrics: list[dict]
  results: dict | None

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.path))

  @property
  def reward_weights(self) -> tuple[float, float, float]:
    r = self.config['reward']
    return float(r['fmt']), float(r['acc']), float(r['con'])


def load_run(path: str) -> RunInfo:
  """Reads ``config.json``, ``metrics.jsonl`` and ``eval/results.json`` (optional) of a launcher run directory."""
  from medad_jax.metrics import read_jsonl
  cpath, mpath = os.path.join(path, 'config.json'), os.path.join(path, 'metrics.jsonl')
  for p in (cpath, mpath):
    if not os.path.isfile(p):
      raise FileNotFoundError(f'{path}: no {os.path.basename(p)} (not a run directory of medad_jax.launch)')
  with open(cpath) as f:
    config = json.load(f)
  for key in ('reward', 'sft', 'rl', 'stage', 'seed'):
    if key not in config:
      raise KeyError(f'{cpath}: missing key {key!r} (expected a medad_jax.launch config)')
  rpath = os.path.join(path, 'eval', 'results.json')
  results = None
  if os.path.isfile(rpath):
    with open(rpath) as f:
      results = json.load(f)
    if 'policies' not in results:
      raise KeyError(f'{rpath}: missing key "policies" (expected medad_jax.train.evaluate.write_report output)')
  return RunInfo(path, config, read_jsonl(mpath), results)


def curve(records: Sequence[Mapping], stage: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  """``(steps, values)`` of ``key`` over the records of ``stage`` (records without the key are left out)."""
  rs = [r for r in records if r.get('stage') == stage and key in r]
  return np.asarray([r['step'] for r in rs], np.int64), np.asarray([r[key] for r in rs], np.float64)


def smooth(values: Sequence[float], window: int) -> np.ndarray:
  """Trailing moving average over up to ``window`` points (the first points average what exists so far), so the
  smoothed curve has one value per step and never looks ahead; ``window <= 1`` returns the values."""
  v = np.asarray(values, np.float64)
  if window <= 1 or v.size == 0:
    return v
  c = np.cumsum(np.insert(v, 0, 0.0))
  idx = np.arange(1, v.size + 1)
  lo = np.maximum(idx - window, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def plot_curves(runs: Sequence[RunInfo], stage: str, keys: Sequence[str], smooth_window: int = 5):
  """One panel per metric key, one line per run: the raw points faint and their trailing moving average over
  ``smooth_window`` steps (:func:`smooth`) as the line (noisy 30-step RL curves read better); returns the figure."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axs = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
  for ax, key in zip(axs[0], keys):
    for run in runs:
      steps, vals = curve(run.metrics, stage, key)
      if len(steps):
        pts = ax.plot(steps, vals, '.', alpha=0.35)[0]
        ax.plot(steps, smooth(vals, smooth_window), color=pts.get_color(),
                label=f'{run.name} (mean of {smooth_window})' if smooth_window > 1 else run.name)
    ax.set_title(f'{stage}/{key}')
    ax.set_xlabel('step')
  axs[0][0].legend(fontsize=7)
  fig.tight_layout()
  return fig


def accuracy_rows(runs: Sequence[RunInfo]) -> tuple[list[str], list[list[Any]]]:
  """Per-task accuracy (%) mean ± std over evaluation seeds, one row per (run, evaluated policy)."""
  from medad_jax.train.evaluate import COLUMNS, HEADERS
  rows = []
  for run in runs:
    if run.results is None:
      continue
    for p in run.results['policies']:
      rows.append([run.name, p['name'], p['num_questions'],
                   *(mean_std_cell([s[c] for s in p['per_seed']]) for c in COLUMNS)])
  return ['run', 'policy', 'questions', *HEADERS], rows


def image_control_rows(runs: Sequence[RunInfo], margin: float = 0.03) -> tuple[list[str], list[list[Any]]]:
  """Per run with an image-shuffled control (``eval.image_control``) and per task: the blind prior, the policy,
  the same policy with every question shown another test image, and whether the control stays at most ``margin``
  above the prior (the answers then come from the pixels, not the question) -- the check the embedded default
  run is held to on anomaly detection and lesion localisation. Accuracies in %, means over evaluation seeds."""
  from medad_jax.train.evaluate import CONTROL_SUFFIX, PRIOR_NAME, TABLE1
  rows = []
  for run in runs:
    if run.results is None:
      continue
    pols = {p['name']: p for p in run.results['policies']}
    prior = pols.get(PRIOR_NAME)
    for name, ctrl in pols.items():
      if not name.endswith(CONTROL_SUFFIX) or prior is None:
        continue
      pol = pols.get(name[:-len(CONTROL_SUFFIX)])
      if pol is None:
        raise KeyError(f'{run.path}: control row {name!r} without its policy row')
      for task, header in (*TABLE1, ('overall', 'Overall')):
        p0, p1, p2 = (float(np.mean([x[task] for x in r['per_seed']])) for r in (prior, pol, ctrl))
        rows.append([run.name, pol['name'], header, *(f'{100 * v:.2f}' for v in (p0, p1, p2)),
                     'yes' if p2 <= p0 + margin else 'no'])
  return ['run', 'policy', 'task', 'prior (no image)', 'policy', 'images shuffled',
          f'shuffled <= prior + {100 * margin:g}'], rows


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
  return all(abs(x - y) < 1e-6 for x, y in zip(a, b))


def ablation_variants(run: RunInfo) -> dict[str, str]:
  """``{variant: evaluated policy name}``: which rows of Tables 2 and 3 the run's evaluation fills.

  Read from the run's config, not its name: RL without SFT is ``rl_only``; any evaluated ``SFT`` policy is
  ``sft_only``; SFT + RL is placed by its reward weights (``acc_only``, ``con_only`` or one of Table 3's rows).
  """
  c = run.config
  sft_on, rl_on = bool(c['sft'].get('enabled')), c['stage'] == 'congrpo' and bool(c['rl'].get('enabled'))
  out = {}
  if rl_on and not sft_on:
    out['rl_only'] = 'Con-GRPO (RL-only)'
  if sft_on:
    out['sft_only'] = 'SFT'
  if sft_on and rl_on:
    w = run.reward_weights
    for variant, ws in [*_TABLE2_WEIGHTS.items(), *((v, ws) for _, v, ws, _, _ in PAPER_TABLE3)]:
      if _close(w, ws):
        out[variant] = 'SFT + Con-GRPO'
  return out


def ablation_samples(runs: Sequence[RunInfo]) -> dict[str, list[float]]:
  """Overall-accuracy fractions per ablation variant, one per (training seed, evaluation seed).

  Runs that share a training seed share their SFT policy, so a repeated ``(variant, training seed, eval seed)``
  is counted once (the first run in ``runs`` order) rather than inflating ``n`` with a copy.
  """
  seen, out = set(), {}
  for run in runs:
    if run.results is None:
      continue
    policies = {p['name']: p for p in run.results['policies']}
    for variant, policy in ablation_variants(run).items():
      if policy not in policies:
        continue
      for s in policies[policy]['per_seed']:
        key = (variant, run.config['seed'], s['seed'])
        if key in seen:
          log.info('%s: %s seed %s already counted from another run; skipped', run.name, variant, key[1:])
          continue
        seen.add(key)
        out.setdefault(variant, []).append(float(s['overall']))
  return out


def table2_rows(runs: Sequence[RunInfo]) -> tuple[list[str], list[list[Any]]]:
  """Table 2 side by side: the paper's overall accuracy and ours (``-`` where no run covers the row)."""
  ours = ablation_samples(runs)
  rows = [[name, f'{m:.2f} ± {s:.2f}', mean_std_cell(ours.get(v, [])), f'--config=congrpo:{v}']
          for name, v, m, s in PAPER_TABLE2]
  return ['Model configuration', 'paper (MedAD-38K, Qwen2.5-VL-3B)', 'ours', 'our config'], rows


def table3_rows(runs: Sequence[RunInfo]) -> tuple[list[str], list[list[Any]]]:
  """Table 3 side by side: reward weights, the paper's accuracy and ours."""
  ours = ablation_samples(runs)
  rows = [[name, *(f'{x:.2f}' for x in ws), f'{m:.2f} ± {s:.2f}', mean_std_cell(ours.get(v, [])),
           f'--config=congrpo:{v}'] for name, v, ws, m, s in PAPER_TABLE3]
  return ['Configuration', 'λ_fmt', 'λ_acc', 'λ_con', 'paper', 'ours', 'our config'], rows


# ---------------------------------------------------------------------------------------------- seed sweeps


def sweep_outputs(sweep_dir: str) -> dict[str, str]:
  """The files ``python -m medad_jax.sweep`` wrote under ``<sweep_dir>/tables``: ``{'table2': md path, 'table3',
  'variants' (when present), 'plot': png path}``; a missing directory or table 2 raises naming it."""
  d = os.path.join(sweep_dir, 'tables')
  if not os.path.isfile(os.path.join(d, 'table2.md')):
    raise FileNotFoundError(f'{sweep_dir}: no tables/table2.md (not a directory of python -m medad_jax.sweep, or '
                            'no run of it has finished)')
  out = {n: os.path.join(d, f'{n}.md') for n in ('table2', 'table3', 'variants')
         if os.path.isfile(os.path.join(d, f'{n}.md'))}
  if os.path.isfile(os.path.join(d, 'sweep.png')):
    out['plot'] = os.path.join(d, 'sweep.png')
  return out


# ---------------------------------------------------------------------------------------------- policies


def answer_confusion(records: Sequence, rows: Sequence[Mapping], task: str) -> tuple[list[str], np.ndarray]:
  """How a policy's answers to one task's questions fall against the right ones, by option *text*: ``records`` the
  test records, ``rows`` an evaluation dump (``eval/completions/<policy>-seed<k>.jsonl``: ``id``, ``answer``,
  ``predicted`` letters). Returns the texts (sorted; ``'(none)'`` where no answer was parsed, which includes
  an answer naming a text that is not among that question's options) and ``counts[right, said]``. A policy that
  uses only a few of a task's answers shows as empty columns (WORKSPACE.md "pixel ceilings": the lesion regions)."""
  by_id = {r.id: r for r in records}
  pairs = []
  for row in rows:
    if row.get('task') != task:
      continue
    if row['id'] not in by_id:
      raise KeyError(f'completion {row["id"]!r} is not among the {len(by_id)} records given (another split or run?)')
    rec = by_id[row['id']]

    def text(letter):
      k = ord(letter) - ord('A') if isinstance(letter, str) and len(letter) == 1 else -1
      return rec.options[k] if 0 <= k < len(rec.options) else '(none)'
    pairs.append((text(row['answer']), text(row.get('predicted'))))
  labels = sorted({t for p in pairs for t in p})
  index = {t: i for i, t in enumerate(labels)}
  counts = np.zeros((len(labels), len(labels)), np.int64)
  for right, said in pairs:
    counts[index[right], index[said]] += 1
  return labels, counts


def run_answer_confusion(run_dir: str, task: str, policy: str = 'sft_con-grpo', seed: int = 0):
  """:func:`answer_confusion` of a finished run directory's dump ``eval/completions/<policy>-seed<seed>.jsonl``
  against its own test split (rebuilt from its config, as :func:`run_context`)."""
  from medad_jax.metrics import read_jsonl
  run = run_context(run_dir)
  records = [run.data.test[i] for i in range(len(run.data.test))]
  return answer_confusion(records, read_jsonl(os.path.join(run_dir, 'eval', 'completions',
                                                           f'{policy}-seed{seed}.jsonl')), task)


def run_context(run_dir: str):
  """A ``train.pipeline.Run`` for a finished run directory, built without writing into it (no config copy, no
  metrics logger): its config, data, tokenizer, model config and processor, on one device."""
  import ml_collections

  from medad_jax.train import pipeline as pl
  info = load_run(run_dir)
  config = ml_collections.ConfigDict(info.config)
  data = pl.build_data(config)
  tok = pl.build_tokenizer(config, data)
  cfg = pl.model_config(config, tok)
  return pl.Run(config, run_dir, None, data, tok, cfg, pl.build_processor(config, tok, cfg), logger=None)


def policy_from_run_dir(run_dir: str):
  """``(Policy, run, judge)``: the run's final policy (restored from its checkpoints exactly as the launcher's
  evaluation does) and the consistency judge its config names."""
  from medad_jax.api import Policy
  from medad_jax.train import congrpo, restore
  run = run_context(run_dir)
  model, graphdef, weights, judge_adapters, name = restore.policy_from_run(run)
  log.info('%s: restored policy %r', run_dir, name)
  judge = congrpo.make_judge(run, graphdef, weights, adapters=judge_adapters)
  return Policy(model, run.processor, run.model_cfg), run, judge


def random_policy(records: Sequence, *, preset: str = 'tiny', vocab_size: int = 512, image_size: int = 56,
                  seed: int = 0):
  """A randomly initialised ``preset`` Qwen2.5-VL with a small BPE tokenizer learned from ``records``' questions
  and SFT targets (so ``<think>``/``<answer>`` are single tokens). Random weights: its text is noise."""
  from flax import nnx

  from medad_jax.api import Policy
  from medad_jax.model.config import Qwen25VLConfig
  from medad_jax.model.qwen25vl import Qwen25VL
  from medad_jax.processor import Qwen25VLProcessor
  from medad_jax.tokenizer import config_for_tokenizer, train_small_tokenizer
  from medad_jax.train.pipeline import corpus_texts
  tok = train_small_tokenizer(corpus_texts(records), vocab_size)
  cfg = config_for_tokenizer(Qwen25VLConfig.preset(preset), tok, vocab_multiple=64)
  proc = Qwen25VLProcessor(tok, cfg.vision, min_pixels=image_size * image_size, max_pixels=image_size * image_size)
  return Policy(Qwen25VL(cfg, rngs=nnx.Rngs(seed)), proc, cfg)
