r"""Ablation sweeps with training seeds: the paper's Tables 2 and 3 (and any other config variant) as mean ± std.

    python -m medad_jax.sweep --config=congrpo --variants=sft_only,rl_only,acc_only,con_only,balanced \
        --seeds=0,1,2 --out=runs/sweep-table2
    python -m medad_jax.sweep --config=congrpo --variants=fmt_focused,acc_focused,con_focused,balanced \
        --seeds=0,1,2 --out=runs/sweep-table2       # Table 3 in the same directory: shared runs are reused
    python -m medad_jax.sweep ... --config.rl.max_steps=10  # any --config.<key>=<value> applies to every run

What runs, per training seed ``s`` (``--config.seed=s``; the data set and the evaluation stay the same):

* ``<out>/seed<s>/sft_only``: SFT, then the evaluation of pi_SFT -- **once per seed**. It is the ``sft_only`` row
  and the starting point of every SFT + RL variant of that seed;
* ``<out>/seed<s>/<variant>`` for every other variant: ``rl_only`` trains Con-GRPO from the random base model; all
  others start from that seed's SFT run (``--config.sft.checkpoint=<out>/seed<s>/sft_only``, so SFT is not
  trained again) and evaluate only their final policy (``--config.eval.include_sft=False``: pi_SFT was already
  evaluated in its own run).

Each run is ``python -m medad_jax.launch`` in-process with ``--workdir`` fixed, so **re-running the same command
resumes**: finished runs (``summary.json`` without ``preempted``) are skipped, an interrupted one continues from its
checkpoints (the launcher's resume), the rest run. ``<out>/sweep.json`` records the plan, every run's status and
wall time, and the overrides (a rerun with other overrides into the same ``--out`` is refused).

Outputs (``<out>/tables/``), written after every run so a half-finished sweep already shows what it has:

* ``table2.{md,json}``, ``table3.{md,json}``: one row per paper row, the paper's overall accuracy beside ours --
  per-task accuracy, overall, format rate and consistency rate (%), **mean ± std over training seeds**
  (population std, ``ddof=0``, as Table 1's evaluation; a training seed evaluated with several evaluation seeds
  contributes their mean). A row without runs shows ``-``.
* ``variants.{md,json}``: requested variants that are in neither paper table (GRPO variants, the evidence-aware
  judge), without paper numbers;
* ``sweep.png``: overall accuracy per variant (bars with std error bars, the paper's beside ours) and the
  Con-GRPO reward and KL curves per variant (mean over seeds, shaded ± std).

``notebooks/03_results.ipynb`` shows these files (``MEDAD_NB_SWEEP_DIR``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger('medad_jax.sweep')

SFT_VARIANT = 'sft_only'
RL_ONLY = 'rl_only'
STATE_FILE = 'sweep.json'
COLUMNS = ('anatomy_identification', 'anomaly_detection', 'lesion_localization', 'modality_classification',
           'pathology_characterization', 'overall', 'format_rate', 'consistency_rate')  # = evaluate.COLUMNS
HEADERS = ('Anatomy ID.', 'Anomaly Det.', 'Lesion Loc.', 'Modality Class.', 'Pathology Char.', 'Overall', 'Format',
           'Consistency')
CURVE_KEYS = ('reward_mean', 'kl')


class SweepError(ValueError):
  """A bad sweep command line or an ``--out`` directory that holds another sweep."""


# ----------------------------------------------------------------------------------------------------- the plan


def run_dir(out: str, seed: int, variant: str) -> str:
  return os.path.join(out, f'seed{seed}', variant)


def policy_name(variant: str) -> str:
  """The evaluated policy (``eval/results.json``) that fills ``variant``'s row."""
  if variant == SFT_VARIANT:
    return 'SFT'
  if variant == RL_ONLY:
    return 'Con-GRPO (RL-only)'
  return 'SFT + Con-GRPO'


def plan(config: str, variants: Sequence[str], seeds: Sequence[int], out: str,
         overrides: Sequence[str] = ()) -> list[dict]:
  """The runs, in order: per seed the SFT run first (when anything needs it), then the other variants.

  Each entry: ``{'seed', 'variant', 'workdir', 'argv'}`` with ``argv`` the launcher's command line.
  """
  name, _, base = config.partition(':')
  base_variants = [v for v in base.split(',') if v]
  runs = []
  for s in seeds:
    needs_sft = any(v != RL_ONLY for v in variants)
    ordered = ([SFT_VARIANT] if needs_sft else []) + [v for v in variants if v != SFT_VARIANT]
    for v in ordered:
      spec = f'{name}:{",".join([*base_variants, v])}'
      wd = run_dir(out, s, v)
      argv = ['launch', f'--config={spec}', f'--workdir={wd}', f'--config.seed={s}',
              *[f'--config.{o}' for o in overrides]]
      if v not in (SFT_VARIANT, RL_ONLY):
        argv += [f'--config.sft.checkpoint={run_dir(out, s, SFT_VARIANT)}', '--config.eval.include_sft=False']
      runs.append({'seed': int(s), 'variant': v, 'workdir': wd, 'argv': argv,
                   'requested': v in variants})
  return runs


def run_finished(workdir: str) -> dict | None:
  """The run's ``summary.json`` when it finished (not preempted), else None."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  return None if summary.get('preempted') else summary


# ----------------------------------------------------------------------------------------------------- running


def _load_state(out: str, key: dict) -> dict:
  path = os.path.join(out, STATE_FILE)
  if not os.path.isfile(path):
    return {**key, 'runs': {}}
  with open(path) as f:
    state = json.load(f)
  for k in ('config', 'overrides'):
    if state.get(k) != key[k]:
      raise SweepError(f'{path}: this directory holds a sweep with {k} = {state.get(k)!r}, not {key[k]!r}; use '
                       'another --out (runs of different settings must not be averaged together)')
  state.setdefault('runs', {})
  return state


def _save_state(out: str, state: dict) -> None:
  tmp = os.path.join(out, STATE_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(state, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(out, STATE_FILE))


def run_sweep(config: str, variants: Sequence[str], seeds: Sequence[int], out: str,
              overrides: Sequence[str] = (), *, max_runs: int | None = None, launch_fn=None) -> dict:
  """Runs (or resumes) the sweep and writes the tables and the plot; returns ``sweep.json``'s content.

  ``max_runs``: start at most this many runs in this call (then stop; a rerun continues). ``launch_fn(argv)`` runs
  one launcher command line (default ``medad_jax.launch.main``).
  """
  if not variants or not seeds:
    raise SweepError(f'a sweep needs at least one variant and one seed, got variants={list(variants)}, '
                     f'seeds={list(seeds)}')
  if len(set(variants)) != len(variants) or len(set(seeds)) != len(seeds):
    raise SweepError(f'repeated variant or seed: variants={list(variants)}, seeds={list(seeds)}')
  _check_variants(config, variants, overrides)
  if launch_fn is None:
    from medad_jax import launch
    launch_fn = launch.main
  os.makedirs(out, exist_ok=True)
  state = _load_state(out, {'config': config, 'overrides': list(overrides)})
  state['variants'] = sorted(set(state.get('variants', [])) | set(variants))
  state['seeds'] = sorted(set(state.get('seeds', [])) | {int(s) for s in seeds})
  started = 0
  t0 = time.time()
  for r in plan(config, variants, seeds, out, overrides):
    key = f'seed{r["seed"]}/{r["variant"]}'
    rec = state['runs'].setdefault(key, {'seed': r['seed'], 'variant': r['variant'], 'workdir': r['workdir']})
    rec['command'] = 'python -m medad_jax.launch ' + ' '.join(r['argv'][1:])
    done = run_finished(r['workdir'])
    if done is not None:
      rec.update(status='done', seconds=done.get('seconds', {}).get('total'))
      log.info('sweep: %s finished before; skipped', key)
      continue
    if max_runs is not None and started >= max_runs:
      rec['status'] = 'pending'
      continue
    resumed = os.path.isfile(os.path.join(r['workdir'], 'config.json'))
    log.info('sweep: %s %s: %s', 'resuming' if resumed else 'starting', key, rec['command'])
    rec.update(status='running', resumed=resumed)
    _save_state(out, state)
    started += 1
    summary = launch_fn(r['argv'])
    if summary.get('preempted'):
      rec['status'] = 'preempted'
      _save_state(out, state)
      log.warning('sweep: %s stopped by a signal in stage %s; rerun the same command to resume', key,
                  summary['preempted'])
      break
    rec.update(status='done', seconds=summary.get('seconds', {}).get('total'))
    state['seconds_this_call'] = round(time.time() - t0, 1)
    _save_state(out, state)
    write_outputs(out, state['variants'], state['seeds'])
  state['seconds_this_call'] = round(time.time() - t0, 1)
  state['wall_seconds'] = round(sum(r.get('seconds') or 0 for r in state['runs'].values()), 1)
  _save_state(out, state)
  write_outputs(out, state['variants'], state['seeds'])
  return state


def _check_variants(config: str, variants: Sequence[str], overrides: Sequence[str]) -> None:
  """Every variant's config loads with the overrides (a typo fails here, before hours of runs)."""
  from configs import common
  name, _, base = config.partition(':')
  for v in variants:
    try:
      common.load(f'{name}:{",".join([*[b for b in base.split(",") if b], v])}', list(overrides))
    except (ValueError, FileNotFoundError) as e:
      raise SweepError(f'variant {v!r}: {e}') from None


# ----------------------------------------------------------------------------------------------------- results


def seed_values(out: str, variant: str, seeds: Sequence[int]) -> dict[str, list[float]]:
  """Per column, one value (%) per training seed whose run evaluated ``variant``'s policy (mean over evaluation
  seeds); seeds without a finished run are left out."""
  vals: dict[str, list[float]] = {c: [] for c in COLUMNS}
  vals['seed'] = []
  for s in seeds:
    path = os.path.join(run_dir(out, s, variant), 'eval', 'results.json')
    if not os.path.isfile(path) or run_finished(run_dir(out, s, variant)) is None:
      continue
    with open(path) as f:
      res = json.load(f)
    pol = next((p for p in res.get('policies', []) if p.get('name') == policy_name(variant)), None)
    if pol is None:
      raise KeyError(f'{path}: no evaluated policy {policy_name(variant)!r} (policies: '
                     f'{[p.get("name") for p in res.get("policies", [])]})')
    vals['seed'].append(float(s))
    for c in COLUMNS:
      xs = [float(x[c]) for x in pol['per_seed'] if x.get(c) is not None and not math.isnan(float(x[c]))]
      vals[c].append(100.0 * float(np.mean(xs)) if xs else math.nan)
  return vals


def _stat(xs: Sequence[float]) -> dict[str, Any]:
  v = np.asarray([x for x in xs if not math.isnan(x)], np.float64)
  if v.size == 0:
    return {'mean': None, 'std': None, 'n': 0, 'values': list(xs)}
  return {'mean': round(float(v.mean()), 4), 'std': round(float(v.std()), 4), 'n': int(v.size),
          'values': [round(float(x), 4) for x in xs]}


def _cell(st: dict) -> str:
  return '-' if not st['n'] else f'{st["mean"]:.2f} ± {st["std"]:.2f}'


def table(out: str, rows: Sequence[tuple], seeds: Sequence[int], *, weights: bool = False) -> dict:
  """One table: ``rows`` are ``(name, variant, paper_mean, paper_std[, weights])``; returns its JSON form."""
  out_rows = []
  for row in rows:
    name, variant, pm, ps = row[0], row[1], row[-2], row[-1]
    vals = seed_values(out, variant, seeds)
    rec = {'name': name, 'variant': variant, 'paper': None if pm is None else {'mean': pm, 'std': ps},
           'ours': {c: _stat(vals[c]) for c in COLUMNS}, 'seeds': [int(s) for s in vals['seed']],
           'command': f'--config=congrpo:{variant}'}
    if weights:
      rec['weights'] = list(row[2])
    out_rows.append(rec)
  return {'columns': list(COLUMNS), 'std': 'population (ddof=0) over training seeds', 'rows': out_rows}


def table_markdown(tab: dict, title: str) -> str:
  from medad_jax.notebook_utils import markdown_table
  has_w = any('weights' in r for r in tab['rows'])
  weights = ['λ_fmt', 'λ_acc', 'λ_con'] if has_w else []
  headers = ['Configuration', *weights, 'paper overall', *HEADERS, 'training seeds']
  rows = []
  for r in tab['rows']:
    paper = '-' if r['paper'] is None else f'{r["paper"]["mean"]:.2f} ± {r["paper"]["std"]:.2f}'
    w = [f'{x:.2f}' for x in r['weights']] if has_w else []
    rows.append([r['name'], *w, paper, *(_cell(r['ours'][c]) for c in COLUMNS),
                 ','.join(map(str, r['seeds'])) or '-'])
  return (f'**{title}** -- ours: mean ± std (%) over training seeds; paper: Qwen2.5-VL-3B on MedAD-38K, overall '
          f'accuracy.\n\n' + markdown_table(headers, rows) + '\n')


def tables(out: str, variants: Sequence[str], seeds: Sequence[int]) -> dict[str, dict]:
  """``{'table2', 'table3'[, 'variants']}`` in JSON form (see :func:`table`)."""
  from medad_jax.notebook_utils import PAPER_TABLE2, PAPER_TABLE3
  t2 = [(n, v, m, s) for n, v, m, s in PAPER_TABLE2]
  t3 = [(n, v, w, m, s) for n, v, w, m, s in PAPER_TABLE3]
  known = {r[1] for r in t2} | {r[1] for r in t3}
  out_t = {'table2': table(out, t2, seeds), 'table3': table(out, t3, seeds, weights=True)}
  extra = [(v, v, None, None) for v in variants if v not in known]
  if extra:
    out_t['variants'] = table(out, extra, seeds)
  return out_t


TITLES = {'table2': 'Table 2 (components)', 'table3': 'Table 3 (reward weights)',
          'variants': 'Other variants (no paper numbers)'}


def write_outputs(out: str, variants: Sequence[str], seeds: Sequence[int]) -> dict[str, str]:
  """Writes ``tables/<name>.{md,json}`` and ``tables/sweep.png``; returns ``{name: markdown path}``."""
  d = os.path.join(out, 'tables')
  os.makedirs(d, exist_ok=True)
  paths = {}
  for name, tab in tables(out, variants, seeds).items():
    with open(os.path.join(d, f'{name}.json'), 'w') as f:
      json.dump(tab, f, indent=2)
    paths[name] = os.path.join(d, f'{name}.md')
    with open(paths[name], 'w') as f:
      f.write(table_markdown(tab, TITLES[name]))
  paths['plot'] = plot(out, variants, seeds, os.path.join(d, 'sweep.png'))
  return paths


def curves(out: str, variant: str, seeds: Sequence[int], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(steps, mean, std)`` of a Con-GRPO metric over the seeds' runs (on the steps every run logged)."""
  from medad_jax.metrics import read_jsonl
  from medad_jax.notebook_utils import curve
  per = []
  for s in seeds:
    path = os.path.join(run_dir(out, s, variant), 'metrics.jsonl')
    if os.path.isfile(path):
      steps, vals = curve(read_jsonl(path), 'congrpo', key)
      if len(steps):
        per.append(dict(zip(steps.tolist(), vals.tolist())))
  if not per:
    return np.zeros(0), np.zeros(0), np.zeros(0)
  common = sorted(set.intersection(*(set(p) for p in per)))
  m = np.asarray([[p[t] for t in common] for p in per], np.float64)
  return np.asarray(common), m.mean(0), m.std(0)


def plot(out: str, variants: Sequence[str], seeds: Sequence[int], path: str) -> str:
  """Bars (overall accuracy, ± std over seeds; the paper's beside where it has the row) and reward / KL curves."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  from medad_jax.notebook_utils import PAPER_TABLE2, PAPER_TABLE3
  paper = {v: (m, s) for _, v, m, s in PAPER_TABLE2} | {v: (m, s) for _, v, _, m, s in PAPER_TABLE3}
  fig, axs = plt.subplots(1, 1 + len(CURVE_KEYS), figsize=(5 + 4 * len(CURVE_KEYS), 3.6))
  ax = axs[0]
  x = np.arange(len(variants))
  ours = [_stat(seed_values(out, v, seeds)['overall']) for v in variants]
  ax.bar(x - 0.2, [o['mean'] or 0 for o in ours], 0.4, yerr=[o['std'] or 0 for o in ours], capsize=3,
         label='ours (miniature)')
  ax.bar(x + 0.2, [paper.get(v, (0, 0))[0] for v in variants], 0.4,
         yerr=[paper.get(v, (0, 0))[1] for v in variants], capsize=3, label='paper (MedAD-38K)')
  ax.set_xticks(x, variants, rotation=25, ha='right', fontsize=8)
  ax.set_ylabel('overall accuracy (%)')
  ax.set_title(f'overall accuracy, mean ± std over {len(seeds)} seeds')
  ax.legend(fontsize=7)
  for ax, key in zip(axs[1:], CURVE_KEYS):
    for v in variants:
      steps, m, s = curves(out, v, seeds, key)
      if len(steps):
        ax.plot(steps, m, label=v)
        ax.fill_between(steps, m - s, m + s, alpha=0.2)
    ax.set_title(f'congrpo/{key} (mean ± std over seeds)')
    ax.set_xlabel('step')
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """``argv`` (program name first) -> ``(args, overrides)``; overrides are the ``--config.<key>=<value>`` flags."""
  p = argparse.ArgumentParser(prog='python -m medad_jax.sweep', description=__doc__.split('\n\n')[0])
  p.add_argument('--config', required=True, help='config name with optional base variants, e.g. congrpo')
  p.add_argument('--variants', required=True, help='comma-separated config variants, e.g. sft_only,balanced')
  p.add_argument('--seeds', default='0,1,2', help='comma-separated training seeds (--config.seed)')
  p.add_argument('--out', default=None, help='sweep directory (default runs/sweep-<config>); rerun to resume')
  p.add_argument('--max_runs', type=int, default=None, help='start at most this many runs, then stop')
  overrides = [a[len('--config.'):] for a in argv[1:] if a.startswith('--config.')]
  rest = [a for a in argv[1:] if not a.startswith('--config.')]
  args = p.parse_args(rest)
  try:
    args.seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  except ValueError:
    raise SweepError(f'--seeds={args.seeds!r}: expected comma-separated integers') from None
  args.variants = [v.strip() for v in args.variants.split(',') if v.strip()]
  if args.out is None:
    args.out = os.path.join('runs', 'sweep-' + args.config.replace(':', '-').replace(',', '-'))
  return args, overrides


def main(argv: Sequence[str]) -> dict:
  args, overrides = parse_args(argv)
  state = run_sweep(args.config, args.variants, args.seeds, args.out, overrides, max_runs=args.max_runs)
  for name in ('table2', 'table3', 'variants'):
    path = os.path.join(args.out, 'tables', f'{name}.md')
    if os.path.isfile(path):
      with open(path) as f:
        sys.stdout.write(f.read() + '\n')
  return state


def cli():
  from medad_jax import launch
  launch.reexec_with_huge_pages()   # the runs are in-process: the malloc tunable must be set for this one
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname).1s %(name)s] %(message)s')
  launch.log_malloc_tunables()
  for noisy in ('absl', 'jax', 'orbax', 'tensorflow_datasets', 'etils', 'grain', 'httpx'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    main(sys.argv)
  except SweepError as e:
    log.error('%s', e)
    sys.exit(2)


if __name__ == '__main__':
  cli()
