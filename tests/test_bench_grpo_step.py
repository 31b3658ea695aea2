"""The grpo_step benchmark on the tiny preset: PyTorch eager and our jitted update compute the same first-step
loss and gradient norm from the same weights, adapters and batch (otherwise the benchmark refuses to report)."""

import json

from medad_jax.bench import grpo_step

WHOLE_MODEL_TOL = 1e-4


def test_grpo_step_benchmark_compares_the_same_step(tmp_path, capsys):
  out = tmp_path / 'grpo.json'
  argv = ['--configs', 'tiny', '--prompts', '2', '--group', '2', '--prompt-len', '24', '--completion-len', '8',
          '--image-side', '4', '--repeats', '1', '--torch-threads', '1', '--peak-size', '256', '--json', str(out)]
  assert grpo_step.main(argv) == 0
  text = capsys.readouterr().out
  assert 'first-step loss ours' in text and 'PyTorch eager' in text
  r = json.loads(out.read_text())['results'][0]
  assert abs(r['ours_first_loss'] - r['torch_first_loss']) <= WHOLE_MODEL_TOL * max(1.0, abs(r['torch_first_loss']))
  assert abs(r['ours_first_grad_norm'] - r['torch_first_grad_norm']) <= WHOLE_MODEL_TOL * r['torch_first_grad_norm']
  assert r['torch_first_grad_norm'] > 0 and r['ours_s'] > 0 and r['torch_s'] > 0 and r['torch_threads'] == 1
  assert r['ours_model_flops'] < r['torch_model_flops']   # the prompt is encoded once per group on our side
