"""The benchmark plumbing: parameter and FLOP counts against the model itself / XLA's cost analysis, the result
table, the ``python -m medad_jax.bench`` dispatcher, and a miniature end-to-end run of the sampler benchmark."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medad_jax import bench
from medad_jax.bench import common
from medad_jax.bench import sampler as bench_sampler
from medad_jax.model.config import Qwen25VLConfig, TextConfig
from medad_jax.model.qwen25vl import Qwen25VL, continuation_positions
from medad_jax.model.text import init_cache


@pytest.mark.parametrize('name', ['tiny', 'small', 'medium', 'qwen2_5_vl_3b'])
def test_param_count_matches_the_model(name):
  cfg = bench_sampler.PRESETS[name]() if name in bench_sampler.PRESETS else Qwen25VLConfig.preset(name)
  abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  assert common.param_count(cfg) == n
  if name == 'medium':
    assert n >= 50e6  # the benchmark's "compute matters" model


def test_text_flops_hand_computed_and_against_xla():
  t = TextConfig(vocab_size=10, hidden_size=4, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=6,
                 mrope_section=(1, 0, 0))
  # per token and layer: q 2*4*4, k and v 2*4*2 each, o 2*4*4, mlp 2*3*4*6; 2 new tokens after 3 context tokens
  # see 4 and 5 keys: attention 2 * 2 * (heads * head_dim = 4) * 9; head 2*4*10 per token.
  per_token_layer = 2 * 4 * 4 + 2 * 2 * 4 * 2 + 2 * 4 * 4 + 2 * 3 * 4 * 6
  want = 2 * (2 * per_token_layer + 2 * 2 * 4 * 9) + 2 * 2 * 4 * 10
  assert common.text_flops(t, 2, 5) == want
  # One decode step of the ~31M model: XLA counts the same matmuls (plus a little elementwise work).
  cfg = Qwen25VLConfig.small()
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0))))
  B, S = 4, 64

  def step(state, tok_B1, cache):
    m = nnx.merge(graphdef, state)
    h, _ = m.hidden_states(tok_B1, attention_mask_BT=jnp.ones((B, 1), jnp.int32), cache=cache, cache_index=S - 1,
                           positions_3BT=continuation_positions(S - 1, jnp.zeros((B,), jnp.int32)))
    return m.logits(h)

  cache = jax.eval_shape(lambda: init_cache(cfg.text, B, S))
  xla = jax.jit(step).lower(state, jax.ShapeDtypeStruct((B, 1), jnp.int32), cache).compile().cost_analysis()
  ours = B * common.text_flops(cfg.text, 1, S)
  assert abs(xla['flops'] - ours) / ours < 0.01


def test_result_table_and_ratios():
  rows = [common.Row('tokens/s', 300.0, 100.0, 'tok/s'), common.Row('wall', 2.0, 8.0, 's', higher_is_better=False),
          common.Row('peak share', 0.25)]
  assert [r.ratio for r in rows] == [3.0, 4.0, None]
  table = common.format_table('title', rows, peer_name='transformers')
  lines = table.splitlines()
  assert lines[0] == 'title' and 'transformers' in lines[2] and lines[4].split()[-1] == '3.00x'
  assert lines[5].split()[-1] == '4.00x' and lines[6].split()[-1] == '-'


def test_dispatcher_lists_and_runs_benchmarks():
  assert 'sampler' in bench.available() and 'common' not in bench.available()
  with pytest.raises(SystemExit, match="unknown benchmark 'nope'; available: .*sampler"):
    bench.run('nope', [])


def test_sampler_benchmark_runs_end_to_end(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  argv = ['--configs', 'tiny', '--prompts', '2', '--group', '2', '--new-tokens', '3', '--image-size', '56',
          '--text-tokens', '5', '--repeats', '1', '--peak-size', '256', '--json', str(out)]
  assert bench.run('sampler', argv) == 0
  printed = capsys.readouterr().out
  assert 'rollout tokens/s' in printed and 'decode achieved FLOP/s' in printed
  res = json.loads(out.read_text())['results'][0]
  assert res['config'] == 'tiny' and res['prompt_tokens'] == 2 + 4 + 5 and res['new_tokens'] == 3
  assert res['ours_tokens_per_s'] > 0 and res['transformers_tokens_per_s'] > 0
  assert res['speedup'] == pytest.approx(res['transformers']['seconds'] / res['ours']['seconds'])
  with pytest.raises(SystemExit, match='unknown preset'):
    bench.run('sampler', ['--configs', 'huge'])
