"""Table 1 evaluation: per-task accuracy, overall accuracy, format rate and consistency rate on the test split.

    results = evaluate.run_eval(run, policy, judge, name='MedAD-R1 (ours)')      # one policy, every seed
    evaluate.write_report(run.workdir, [results, ...])                         # eval/results.json + table.md

Metrics (each over the questions of the split, per seed; reported as mean +- std over ``eval.seeds``):
  * accuracy per task (Table 1's five columns) and overall: the parsed ``<answer>`` letter equals the ground truth
    (``rewards.accuracy_reward``; no answer block = wrong);
  * format rate: ``R_fmt`` (the think-then-answer grammar of ``medad_jax.rewards``);
  * consistency rate: ``R_con``, the fraction of completions whose answer equals the judge's verdict ``F(T, Q)``
    read from the thought alone (completions without a thought or an answer count as inconsistent).

Policies (``eval.policy``): ``run`` (a trained policy in memory or restored from the run directory), ``hf`` (any
local Hugging Face Qwen2.5-VL directory, loaded into our Flax model) and ``endpoint`` (any model behind an SGLang
or OpenAI-compatible ``/v1/chat/completions`` server; the image goes as a base64 PNG data URL). Every policy sees
the same prompts (the question with its options, after the image) and is scored by the same code.

Seeds: with ``eval.greedy=False`` each seed samples at temperature ``sampling.temperature`` with its own key (the
paper's "mean +- std of 3 runs"); greedy decoding is deterministic and then one seed is enough. Sweep with
``--config.eval.seeds='(0,1,2)'``; a sweep across *training* seeds is a shell loop over ``--config.seed`` whose
run directories ``python -m medad_jax.train.evaluate aggregate runs/a runs/b ...`` folds into one table.
"""

from __future__ import annotations

import base64
import collections.abc
import dataclasses
import io
import json
import logging
import os
import re
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np

from medad_jax.data.schema import TASKS, load_image
from medad_jax.rewards import RewardWeights, score_batch
from medad_jax.train import pipeline as pl

log = logging.getLogger(__name__)

# Table 1's columns, in the paper's order.
TABLE1 = (('anatomy_identification', 'Anatomy ID.'), ('anomaly_detection', 'Anomaly Det.'),
          ('lesion_localization', 'Lesion Loc.'), ('modality_classification', 'Modality Class.'),
          ('pathology_characterization', 'Pathology Char.'))
COLUMNS = tuple(t for t, _ in TABLE1) + ('overall', 'format_rate', 'consistency_rate')
HEADERS = tuple(h for _, h in TABLE1) + ('Overall', 'Format', 'Consistency')

# A policy for evaluation: (batch of prompt examples with 'meta', seed, batch index) -> completion texts.
Generator = Callable[[Sequence[dict], int, int], list[str]]


# ----------------------------------------------------------------------------------------------- policies


def flax_generator(run: pl.Run, model, *, greedy: bool, batch_size: int, adapters: bool = True) -> Generator:
  """Our Flax policy: the sampler with one completion per prompt. Each process passes its rows of the global
  batch (``batch_size`` rows in all; the launcher pads the last batch) and gets its rows' completions back."""
  from medad_jax import distributed
  from medad_jax.sampling.sampler import sample
  from medad_jax.train import feed
  cfg = run.model_cfg
  scfg = pl.sampling_config(run.config.sampling, cfg, greedy=greedy, max_new_tokens=run.config.eval.max_new_tokens)
  table = pl.stop_table(run.tokenizer, cfg)
  mesh = run.mesh_or_none()
  per_process = eval_batch_size(run, batch_size) // feed.shard(run)[1]

  def gen(examples, seed, index):
    pb = feed.prompt_batch(run, examples, max(per_process, len(examples)))
    key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    roll = sample(model, pb, key=key, config=scfg, num_samples=1, adapters=adapters, mesh=mesh, stop_table=table)
    mine = distributed.local_rows({'tokens': roll.tokens_BN, 'lengths': roll.lengths_B}, mesh)
    texts = pl.decode_completions(run.tokenizer, np.asarray(mine['tokens']), np.asarray(mine['lengths']))
    return texts[:len(examples)]

  return gen


def _png_data_url(record_image) -> str:
  buf = io.BytesIO()
  record_image.save(buf, format='PNG')
  return 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode()


def endpoint_generator(run: pl.Run, *, url: str, model: str, greedy: bool, api_key_env: str = '',
                       timeout_s: float = 120.0, max_retries: int = 4, concurrency: int = 8) -> Generator:
  """A model behind an SGLang / OpenAI-compatible server (``/v1/chat/completions``, image as a data URL).

  Transport errors, 5xx, 408 and 429 are retried with backoff; any other 4xx fails at once with the server's
  message (the judge package's error reading, ``medad_jax.judge.remote.error_message``).
  """
  from concurrent.futures import ThreadPoolExecutor

  import httpx

  from medad_jax.judge.remote import error_message
  headers = {}
  if api_key_env:
    key = os.environ.get(api_key_env)
    if not key:
      raise ValueError(f'config.eval.endpoint_api_key_env: environment variable {api_key_env!r} is not set')
    headers['Authorization'] = f'Bearer {key}'
  client = httpx.Client(base_url=url.rstrip('/'), headers=headers, timeout=httpx.Timeout(timeout_s),
                        limits=httpx.Limits(max_connections=concurrency))
  pool = ThreadPoolExecutor(concurrency)
  temperature = 0.0 if greedy else run.config.sampling.temperature
  max_tokens = run.config.eval.max_new_tokens

  def one(ex, seed):
    messages = [{'role': 'user', 'content': [
        {'type': 'image_url', 'image_url': {'url': _png_data_url(ex['image'])}},
        {'type': 'text', 'text': ex['meta']['question']}]}]
    payload = {'model': model, 'messages': messages, 'temperature': temperature, 'max_tokens': max_tokens,
               'seed': seed}
    last = ''
    for attempt in range(max_retries + 1):
      try:
        r = client.post('/v1/chat/completions', json=payload)
      except httpx.TransportError as e:
        last = f'{type(e).__name__}: {e}'
      else:
        if r.status_code < 300:
          try:
            return r.json()['choices'][0]['message']['content'] or ''
          except (ValueError, KeyError, IndexError, TypeError):
            last = f'malformed body {r.text[:200]!r}'
        else:
          try:
            msg = error_message(r.json())
          except ValueError:
            msg = r.text[:300]
          if r.status_code < 500 and r.status_code not in (408, 429):
            raise RuntimeError(f'endpoint {url} rejected question {ex["meta"]["id"]!r}: HTTP {r.status_code} {msg}')
          last = f'HTTP {r.status_code}: {msg}'
      if attempt < max_retries:  # no backoff after the last attempt: fail now
        time.sleep(min(0.5 * 2 ** attempt, 8.0))
    raise RuntimeError(f'endpoint {url}: question {ex["meta"]["id"]!r} failed after {max_retries} retries: {last}')

  def gen(examples, seed, index):
    # padding rows of the last batch (dropped from the results) are not sent
    return list(pool.map(lambda ex: '' if ex.get('pad') else one(ex, seed), examples))

  return gen


def endpoint_preprocess(r) -> dict:
  """Records for the endpoint policy: the decoded image and the metadata (no tokenisation here)."""
  return {'image': load_image(r), 'meta': pl.record_meta(r)}


# ----------------------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class Result:
  """One evaluated policy: per-seed metric dicts (``COLUMNS`` keys, fractions in [0, 1]) and counts."""
  name: str
  per_seed: list[dict]
  num_questions: int
  seconds: float

  def mean_std(self) -> dict[str, tuple[float, float]]:
    return {k: (float(np.mean([s[k] for s in self.per_seed])), float(np.std([s[k] for s in self.per_seed])))
            for k in COLUMNS}


def score(texts: Sequence[str], metas: Sequence[dict], judge) -> dict[str, np.ndarray]:
  """Per-question ``acc``, ``fmt``, ``con`` arrays (the rewards' definitions) for one batch, plus ``rule_agree``:
  for each judged completion whose thought the extractive ``rule`` judge can read, 1 when the configured judge's
  verdict equals the rule judge's (NaN elsewhere) -- how far the judge tracks what the thought plainly says."""
  from medad_jax.judge.local import extract_conclusion
  from medad_jax.rewards import parse_completion
  options = [m['options'] for m in metas]
  rb = score_batch(list(texts), answers=[m['answer'] for m in metas], questions=[m['question'] for m in metas],
                   options=options, judge=judge, weights=RewardWeights())
  agree = np.full(len(texts), np.nan, np.float32)
  parsed = [parse_completion(t, o) for t, o in zip(texts, options)]
  letters = [p.letter for p in parsed]
  for i in np.flatnonzero(rb.judged):
    rule = extract_conclusion(parsed[i].thought or '', options[i])
    if rule is not None and rb.verdicts[i] is not None:
      agree[i] = float(rule == rb.verdicts[i])
  return {'acc': rb.acc, 'fmt': rb.fmt, 'con': rb.con, 'rule_agree': agree, 'letters': letters,
          'verdicts': list(rb.verdicts)}


def _score_rows(texts: Sequence[str], metas: Sequence[dict], pads: Sequence[bool], judge) -> list[dict]:
  """One row per question (what the per-question dump holds, plus ``rule_agree`` and ``pad``), JSON-ready."""
  s = score(texts, metas, judge)
  return [{'id': m['id'], 'image_id': m.get('image_id'), 'task': m['task'], 'answer': m['answer'],
           'predicted': s['letters'][j],
           'judge': s['verdicts'][j], 'acc': float(s['acc'][j]), 'fmt': float(s['fmt'][j]),
           'con': float(s['con'][j]), 'completion': texts[j], 'rule_agree': float(s['rule_agree'][j]),
           'pad': bool(pads[j])} for j, m in enumerate(metas)]


def summarize(tasks: Sequence[str], acc: np.ndarray, fmt: np.ndarray, con: np.ndarray) -> dict[str, float]:
  tasks = np.asarray(tasks)
  out = {}
  for t, _ in TABLE1:
    sel = tasks == t
    out[t] = float(acc[sel].mean()) if sel.any() else float('nan')
  out.update(overall=float(acc.mean()), format_rate=float(fmt.mean()), consistency_rate=float(con.mean()))
  return out


def run_eval(run: pl.Run, generator: Generator, judge, *, name: str, preprocess=None,
             progress_stage: str = 'eval', completions_dir: str | None = 'default',
             records: Sequence | None = None) -> Result:
  """Evaluates one policy on ``eval.split`` for every seed in ``eval.seeds``; logs per seed.

  Every question's completion, parsed answer, judge verdict and scores go to
  ``<completions_dir>/<policy>-seed<k>.jsonl`` (default: ``<workdir>/eval/completions``; None: not written).
  ``records``: the questions to score instead of :func:`eval_records` (e.g. :class:`ImageShuffled` of them); each
  completion row names the image it was shown (``image_id``).
  """
  from medad_jax import distributed
  from medad_jax.metrics import format_duration
  from medad_jax.train import feed
  if completions_dir == 'default':
    completions_dir = os.path.join(run.workdir, 'eval', 'completions')
  config = run.config
  source = eval_records(run) if records is None else records
  if config.eval.get('group_by_task', False):
    source = by_task(source)
  n = len(source)
  bs = eval_batch_size(run)
  mesh = run.mesh_or_none()
  # The local judge is a jitted forward on the global mesh: every process scores every row (see congrpo.Scoring).
  all_rows = config.judge.backend == 'local' and distributed.process_count() > 1
  t0 = time.time()
  per_seed = []
  for seed in config.eval.seeds:
    # Each process reads its rows of every global batch; the last batch is padded (copies of the last question,
    # dropped from the results) so every process runs the same number of batches.
    ds = feed.dataset(run, source, name=progress_stage, global_batch=bs, shuffle=False, num_epochs=1,
                      pad_last=True, seed=0, preprocess=preprocess or pl.prompt_preprocess(run.processor))
    rows, samples = [], []
    n_batches = -(-n // bs)
    t_seed = time.time()
    for i, examples in enumerate(ds):
      metas = [ex['meta'] for ex in examples]
      pads = [bool(ex['pad']) for ex in examples]
      texts = generator(examples, int(seed), i)
      if all_rows:
        got = distributed.gather_shards([texts, metas, pads], mesh)
        texts, metas, pads = ([x for g in got for x in g[j]] for j in range(3))
        batch_rows = _score_rows(texts, metas, pads, judge)
      else:
        batch_rows = [r for part in distributed.gather_shards(_score_rows(texts, metas, pads, judge), mesh)
                      for r in part]
      batch_rows = [r for r in batch_rows if not r.pop('pad')]
      rows += batch_rows
      if len(samples) < 5 and batch_rows:
        samples.append({k: batch_rows[0][k] for k in ('id', 'completion', 'answer')})
      left = (time.time() - t_seed) / (i + 1) * (n_batches - i - 1)
      log.info('[%s] %s seed %d: batch %d/%d, accuracy so far %.3f | ETA %s', progress_stage, name, seed, i + 1,
               n_batches, float(np.mean([r['acc'] for r in rows])) if rows else float('nan'), format_duration(left))
    if len(rows) != n:
      raise RuntimeError(f'[{progress_stage}] {name}: scored {len(rows)} questions, expected {n}')
    res = summarize([r['task'] for r in rows], *(np.array([r[k] for r in rows], np.float64)
                                                 for k in ('acc', 'fmt', 'con')))
    agree = np.array([r.pop('rule_agree') for r in rows], np.float64)
    res['judge_rule_agreement'] = float(np.nanmean(agree)) if np.isfinite(agree).any() else None
    res['judge_rule_compared'] = int(np.isfinite(agree).sum())
    res['seed'] = int(seed)
    res['samples'] = samples
    per_seed.append(res)
    # A task absent from a truncated split has no accuracy (NaN); it is left out of the log, not invented.
    slug = re.sub(r'[^0-9A-Za-z_.-]+', '_', name).strip('_').lower()
    if completions_dir and distributed.is_main():
      os.makedirs(completions_dir, exist_ok=True)
      path = os.path.join(completions_dir, f'{slug}-seed{int(seed)}.jsonl')
      with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
      log.info('[%s] %s seed %d: %d completions with their scores in %s', progress_stage, name, seed, len(rows),
               path)
    run.logger.write_now(f'{progress_stage}/{slug}', int(seed),
                         {'accuracy': res['overall'], **{k: res[k] for k in COLUMNS if np.isfinite(res[k])}})
  return Result(name, per_seed, n, time.time() - t0)


def batch_size_for(requested: int, questions: int, row_multiple: int) -> int:
  """The evaluation's global batch: ``requested`` (``eval.batch_size``), but no larger than ``questions`` rounded
  up to ``row_multiple`` (the mesh's batch blocks and the processes): a 4-question evaluation at
  ``eval.batch_size=32`` decodes 4 rows, not 4 questions and 28 copies padding them."""
  if requested < 1 or row_multiple < 1:
    raise ValueError(f'eval batch size {requested}, row multiple {row_multiple}: expected both >= 1')
  return min(requested, max(1, -(-questions // row_multiple)) * row_multiple)


def eval_batch_size(run: pl.Run, requested: int | None = None) -> int:
  """:func:`batch_size_for` this run's questions, mesh and processes (``requested``: ``eval.batch_size``)."""
  import math

  from medad_jax import distributed
  from medad_jax.train import feed
  mesh = run.mesh_or_none()
  multiple = feed.shard(run)[1] if mesh is None else math.lcm(feed.shard(run)[1], distributed.batch_blocks(mesh)[2])
  return batch_size_for(run.config.eval.batch_size if requested is None else requested, len(eval_records(run)),
                        multiple)


def eval_records(run: pl.Run) -> Sequence:
  """The questions ``run_eval`` scores: ``eval.split``, cut to ``eval.max_examples`` when that is positive."""
  config = run.config
  records = run.data.test if config.eval.split == 'test' else run.data.train
  n = len(records) if config.eval.max_examples <= 0 else min(len(records), config.eval.max_examples)
  return records if n == len(records) else [records[i] for i in range(n)]


class Reordered(collections.abc.Sequence):
  """``records`` read in the order ``order`` (a view: nothing is loaded twice)."""

  def __init__(self, records: Sequence, order: Sequence[int]):
    self.records, self.order = records, [int(i) for i in order]

  def __len__(self) -> int:
    return len(self.order)

  def __getitem__(self, i):
    return self.records[self.order[i]]


def by_task(records: Sequence) -> Reordered:
  """``records`` grouped by task in Table 1's order, each task's questions in their split order.

  A batch then holds one task's questions (the last of a task shares its batch with the next), whose answers are
  of similar length, and the sampler decodes until the batch's longest answer ends (on the miniature's test split
  the batches' longest answers are 26 % shorter grouped, counted in words). Each question's prompt and image are its
  own, so greedy answers do not depend on the order (WORKSPACE.md, "The embedded default run")."""
  rank = {t: k for k, (t, _) in enumerate(TABLE1)}
  tasks = [records[i].task for i in range(len(records))]
  return Reordered(records, sorted(range(len(records)), key=lambda i: (rank.get(tasks[i], len(rank)), i)))


class ImageShuffled(collections.abc.Sequence):
  """The image-shuffled control: ``records`` with every question's image replaced by the image of another image
  id of the same split (question, options and answer unchanged).

  The image ids are put in a random cycle (``seed``) and each question gets the image of the next id in it, so no
  question keeps its own image, every image is shown as often as before, and the questions of one image all move
  to one other image. A policy that reads its answers from the pixels falls to what agreement between two random
  images gives (for a 60 % abnormal benchmark, 0.6^2 + 0.4^2 = 52 % on anomaly detection: at or below the blind
  prior); a policy that scores as well with the wrong image is not reading it. Needs two image ids at least.
  """

  def __init__(self, records: Sequence, seed: int = 0):
    self.records = records
    ids = [records[i].image_id for i in range(len(records))]
    first: dict[str, int] = {}
    for i, k in enumerate(ids):
      first.setdefault(k, i)
    order = sorted(first)
    if len(order) < 2:
      raise ValueError(f'image-shuffled control: {len(records)} questions over {len(order)} image id(s); '
                       'at least 2 distinct images are needed to pair a question with another image')
    perm = [order[j] for j in np.random.default_rng(seed).permutation(len(order))]
    nxt = {k: perm[(j + 1) % len(perm)] for j, k in enumerate(perm)}
    self.donor = [first[nxt[k]] for k in ids]   # question i shows the image of record donor[i]

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i):
    r = self.records[i]
    d = self.records[self.donor[i]]
    return dataclasses.replace(r, image=d.image, image_id=d.image_id)


CONTROL_SUFFIX = ' · images shuffled (control)'


def control_name(policy: str) -> str:
  """The table row of ``policy``'s image-shuffled control (``eval.image_control``)."""
  return policy + CONTROL_SUFFIX


PRIOR_NAME = 'Answer prior (no image)'


def prior_baseline(train: Sequence, test: Sequence, name: str = PRIOR_NAME) -> Result:
  """What a policy that never looks at the image gets from the answer statistics alone.

  For each test question: the option whose text was most often the *correct* answer to its task in ``train``
  (ties and unseen texts: the earlier letter). Chance is 25 % for four options, but the correct texts are not
  uniform (e.g. 60 % of medad-synth images are abnormal, so "Yes, an abnormality is present" is right 60 % of the
  time), and a model can learn that prior without reading a pixel; a trained policy must beat this row, not only
  chance. Format and consistency do not apply (NaN, shown as '-').
  """
  t0 = time.time()
  counts: dict[tuple[str, str], int] = {}
  for i in range(len(train)):
    r = train[i]
    key = (r.task, r.answer_text.strip().lower())
    counts[key] = counts.get(key, 0) + 1
  tasks, acc = [], []
  for i in range(len(test)):
    r = test[i]
    freq = [counts.get((r.task, o.strip().lower()), 0) for o in r.options]
    acc.append(float(int(np.argmax(freq)) == r.answer_index))
    tasks.append(r.task)
  nan = np.full(len(acc), np.nan)
  res = summarize(tasks, np.asarray(acc), nan, nan)
  res['seed'] = 0
  return Result(name, [res], len(test), time.time() - t0)


# ------------------------------------------------------------------------------------------------- reporting


def _cell(mean: float, std: float, n_seeds: int) -> str:
  if not np.isfinite(mean):
    return '-'
  return f'{100 * mean:.2f}' + (f' ± {100 * std:.2f}' if n_seeds > 1 else '')


def markdown_table(results: Sequence[Result], params: dict[str, str] | None = None) -> str:
  """Table 1's layout (accuracy in %, mean ± std over seeds) plus the format and consistency rates."""
  params = params or {}
  lines = ['| Model | Params | ' + ' | '.join(HEADERS) + ' |', '|' + ' --- |' * (len(HEADERS) + 2)]
  for r in results:
    ms = r.mean_std()
    cells = [_cell(*ms[k], len(r.per_seed)) for k in COLUMNS]
    lines.append(f'| {r.name} | {params.get(r.name, "-")} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write_report(workdir: str, results: Sequence[Result], params: dict[str, str] | None = None,
                 extra: dict | None = None) -> tuple[str, str]:
  """``<workdir>/eval/results.json`` and ``<workdir>/eval/table.md``; returns their paths."""
  d = os.path.join(workdir, 'eval')
  os.makedirs(d, exist_ok=True)
  payload = {'columns': list(COLUMNS), 'tasks': list(TASKS), 'policies': [
      {'name': r.name, 'params': (params or {}).get(r.name), 'num_questions': r.num_questions,
       'seconds': round(r.seconds, 2), 'per_seed': r.per_seed,
       'mean': {k: v[0] for k, v in r.mean_std().items()}, 'std': {k: v[1] for k, v in r.mean_std().items()}}
      for r in results], **(extra or {})}
  jpath, mpath = os.path.join(d, 'results.json'), os.path.join(d, 'table.md')
  pl.write_json(jpath, payload)
  with open(mpath, 'w') as f:
    f.write(report_text(results, params))
  log.info('evaluation table (%s):\n%s', mpath, markdown_table(results, params))
  return jpath, mpath


def report_text(results: Sequence[Result], params: dict[str, str] | None = None) -> str:
  """What ``eval/table.md`` holds: a caption line and :func:`markdown_table`."""
  n_seeds = max(len(r.per_seed) for r in results)
  return (f'Accuracy (%) on the test split, {results[0].num_questions} questions'
          + (f', mean ± std over {n_seeds} seeds' if n_seeds > 1 else '') + '.\n\n'
          + markdown_table(results, params) + '\n')


def aggregate(run_dirs: Sequence[str]) -> str:
  """Folds the ``eval/results.json`` of several runs (e.g. a sweep over ``--config.seed``) into one table: every
  policy name's per-seed entries are pooled, so the table shows mean ± std across the runs."""
  pooled: dict[str, Result] = {}
  for d in run_dirs:
    path = os.path.join(d, 'eval', 'results.json')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{d}: no eval/results.json (did the run finish its evaluation?)')
    with open(path) as f:
      payload = json.load(f)
    for p in payload['policies']:
      r = pooled.setdefault(p['name'], Result(p['name'], [], p['num_questions'], 0.0))
      if p['num_questions'] != r.num_questions:
        raise ValueError(f'{path}: {p["name"]!r} was evaluated on {p["num_questions"]} questions, other runs on '
                         f'{r.num_questions}; aggregate only runs over the same split')
      r.per_seed.extend(p['per_seed'])
      r.seconds += p['seconds']
  return markdown_table(list(pooled.values()))


if __name__ == '__main__':
  if len(sys.argv) < 3 or sys.argv[1] != 'aggregate':
    sys.exit('usage: python -m medad_jax.train.evaluate aggregate RUN_DIR [RUN_DIR ...]')
  sys.stdout.write(aggregate(sys.argv[2:]) + '\n')
