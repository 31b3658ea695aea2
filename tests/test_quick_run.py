"""A learning test of the whole policy: the ``quick`` miniature, trained from random weights by the command a user
runs (``python -m medad_jax.launch --config=configs/congrpo.py:sft_only,quick``, in its own process on one CPU
device as a user's run has: the vision warm-up, 400 SFT steps of the decoder, the evaluation with the blind prior
and the image-shuffled control rows), answers the anomaly-detection questions of the test split by generating its
thought and answer, and must beat the blind answer prior there -- by reading the images, not the question."""

import json
import os

import pytest

from medad_jax.metrics import read_jsonl
from medad_jax.testing import multiprocess

pytestmark = pytest.mark.slow

MARGIN = 0.08   # accuracy points over the prior: ~2 binomial standard errors on 150 questions (SE ~0.04)
CONTROL = 0.03  # the image-shuffled control may exceed the prior by at most this


def test_a_quick_run_reads_anomaly_detection_from_the_pixels(tmp_path):
  """Fixed seed 0; the ``quick`` variant's data (1,000 medad-synth images, lesions x 1.5, 84 px; 850 train / 150
  test), its anomaly-detection and lesion-localisation questions only. The 150 anomaly test questions, answered
  greedily: the blind prior ("Yes", the training split's most frequent answer) is right for 86 of them (57.3 %); the
  policy must reach the prior + 8 points, and the same policy shown other test images (``evaluate.ImageShuffled``) at
  most the prior + 3: the answers come from the pixels. This command on a 2-core AMD EPYC (AVX-512; WORKSPACE.md "The
  embedded default run", the ``quick`` parts), seeds 0 / 1 / 2: 66.7 / 70.0 / 72.0 %, shuffled images 56.7 / 49.3 /
  48.0 %, 130-138 s each (the ``micro`` decoder; with ``mini`` it took 215-234 s); this test 131 s under pytest."""
  from medad_jax.train.evaluate import PRIOR_NAME, control_name

  run = tmp_path / 'run'
  argv = ['-m', 'medad_jax.launch', '--config=configs/congrpo.py:sft_only,quick', f'--workdir={run}',
          f'--config.data.cache_dir={tmp_path / "cache"}',
          '--config.judge.backend=rule']   # accuracy only: the consistency judge is not what this test reads
  procs = multiprocess.start(argv, processes=1, devices=1, log_dir=str(tmp_path), tag='quick')
  multiprocess.wait(procs, timeout_s=1200)
  log = multiprocess.log_tail(procs[0][1], 15)

  with open(run / 'eval' / 'results.json') as f:
    policies = {p['name']: p for p in json.load(f)['policies']}
  prior, sft, control = (policies[n]['mean']['anomaly_detection'] for n in (PRIOR_NAME, 'SFT', control_name('SFT')))
  answered = read_jsonl(os.path.join(run, 'eval', 'completions', 'sft-seed0.jsonl'))
  assert sum(r['task'] == 'anomaly_detection' for r in answered) == 150 and len(answered) == 300
  assert prior == pytest.approx(86 / 150)
  with open(run / 'summary.json') as f:
    assert set(json.load(f)['seconds']) >= {'vision_warmup', 'sft', 'eval'}
  steps = [r['step'] for r in read_jsonl(os.path.join(run, 'metrics.jsonl')) if r.get('stage') == 'sft']
  assert max(steps) == 400

  assert sft >= prior + MARGIN, (sft, prior, log)
  assert control <= prior + CONTROL, (control, sft, prior, log)
