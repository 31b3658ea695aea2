"""Checkpointing: round trip, keep-last-N, kill -9 and SIGTERM mid-run then resume == uninterrupted (bitwise), and
HF export of the merged policy.

The kill / preemption tests run a small but complete training loop in a subprocess (this file run as a script):
a LoRA-adapted module in a TrainState, AdamW, a grain iterator with shuffling, per-step RNG keys, asynchronous
checkpoints every 2 steps keeping the last 3.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

STEPS = 12


# ------------------------------------------------------------------------------- the loop (also the subprocess)


def build(seed=0):
  from medad_jax.model.layers import Linear
  from medad_jax.rl import update as U

  class Net(nnx.Module):
    def __init__(self):
      self.up = Linear(8, 16, use_bias=True, rngs=nnx.Rngs(seed))
      self.down = Linear(16, 1, use_bias=False, rngs=nnx.Rngs(seed + 1))
      self.up.add_lora(4, 8.0, nnx.Rngs(seed + 2))
      self.down.add_lora(4, 8.0, nnx.Rngs(seed + 3))

    def __call__(self, x):
      return self.down(jax.nn.gelu(self.up(x)))[..., 0]

  tx, _ = U.make_optimizer(3e-2, weight_decay=0.01, max_grad_norm=1.0)
  graphdef, state = U.init_train_state(Net(), tx, seed=seed)

  @jax.jit
  def step_fn(state, x, y):
    key = jax.random.fold_in(state.rng, state.step)  # per-step key: resumed runs draw the same noise

    def loss(params):
      pred = nnx.merge(graphdef, params, state.frozen)(x + 0.1 * jax.random.normal(key, x.shape))
      return jnp.mean((pred - y) ** 2)

    l, g = jax.value_and_grad(loss)(state.params)
    updates, opt = tx.update(g, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt, step=state.step + 1), l

  return graphdef, state, step_fn


def dataset(seed=0):
  import grain
  w = np.random.default_rng(123).normal(size=8).astype(np.float32)

  def example(i):
    x = np.random.default_rng(int(i)).normal(size=8).astype(np.float32)
    return {'id': np.int32(i), 'x': x, 'y': np.float32(np.sin(x @ w))}

  return grain.MapDataset.range(40).shuffle(seed=seed).repeat(None).map(example).to_iter_dataset().batch(4)


def run_loop(workdir, die_at=None, sleep=0.0):
  """Trains to STEPS, resuming from the latest checkpoint; logs consumed example ids to ``ids.jsonl``."""
  from medad_jax.checkpointing import Checkpointer, PreemptionGuard

  graphdef, state, step_fn = build()
  it = iter(dataset())
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=3, every_steps=2)
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, data_state, _ = restored
    it.set_state(data_state)
  with PreemptionGuard() as guard, open(os.path.join(workdir, 'ids.jsonl'), 'a', buffering=1) as log_f:
    while int(state.step) < STEPS:
      batch = next(it)
      state, _ = step_fn(state, jnp.asarray(batch['x']), jnp.asarray(batch['y']))
      step = int(state.step)
      log_f.write(json.dumps({'step': step, 'ids': batch['id'].tolist()}) + '\n')
      if die_at is not None and step == die_at:
        os.kill(os.getpid(), signal.SIGKILL)   # a crash: no cleanup, an async save may be in flight
      if guard.should_stop:
        ckpt.save(step, state, data_state=it.get_state(), force=True)
        ckpt.wait()
        log_f.write(json.dumps({'preempted_at': step}) + '\n')
        break
      ckpt.maybe_save(step, state, data_state=it.get_state())
      time.sleep(sleep)
  ckpt.close()
  np.savez(os.path.join(workdir, 'final.npz'), *[np.asarray(x) for x in jax.tree.leaves((state.params,
                                                                                          state.opt_state))])
  return state


def _run_script(workdir, *args, wait=True):
  cmd = [sys.executable, os.path.abspath(__file__), str(workdir), *map(str, args)]
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
             XLA_FLAGS='', JAX_PLATFORMS='cpu')
  if not wait:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _final(workdir):
  with np.load(os.path.join(workdir, 'final.npz')) as f:
    return [f[k] for k in sorted(f.files, key=lambda s: int(s.split('_')[1]))]


def _ids(workdir):
  """Example ids per step of the run's effective history (later lines for a step replace earlier ones)."""
  out = {}
  with open(os.path.join(workdir, 'ids.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      if 'step' in r:
        out[r['step']] = r['ids']
  return [out[s] for s in sorted(out)]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  d = tmp_path_factory.mktemp('uninterrupted')
  r = _run_script(d)
  assert r.returncode == 0, r.stdout + r.stderr
  return d


# ------------------------------------------------------------------------------------------------------ tests


def test_kill_9_then_resume_equals_uninterrupted_bitwise(tmp_path, uninterrupted):
  r = _run_script(tmp_path, 'die_at', 7)
  assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
  assert not os.path.exists(tmp_path / 'final.npz')
  from medad_jax.checkpointing import Checkpointer
  steps = Checkpointer(str(tmp_path / 'checkpoints')).all_steps()
  assert steps and max(steps) <= 6, steps   # what survived the crash
  r = _run_script(tmp_path)
  assert r.returncode == 0, r.stdout + r.stderr
  a, b = _final(tmp_path), _final(uninterrupted)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert _ids(tmp_path) == _ids(uninterrupted)   # the data order continued where it stopped
  assert Checkpointer(str(tmp_path / 'checkpoints')).all_steps() == [8, 10, 12]   # keep the last 3


def test_sigterm_saves_exits_cleanly_and_resumes(tmp_path, uninterrupted):
  p = _run_script(tmp_path, 'sleep', 0.3, wait=False)
  ids = tmp_path / 'ids.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and not (ids.exists() and len(ids.read_text().splitlines()) >= 3):
    time.sleep(0.1)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 0, out.decode()
  stopped = [json.loads(l)['preempted_at'] for l in ids.read_text().splitlines() if 'preempted_at' in l]
  assert len(stopped) == 1 and 3 <= stopped[0] < STEPS
  from medad_jax.checkpointing import Checkpointer
  assert Checkpointer(str(tmp_path / 'checkpoints')).latest_step() == stopped[0]
  r = _run_script(tmp_path)
  assert r.returncode == 0, r.stdout + r.stderr
  for x, y in zip(_final(tmp_path), _final(uninterrupted)):
    np.testing.assert_array_equal(x, y)
  assert _ids(tmp_path) == _ids(uninterrupted)


def test_round_trip_keep_last_n_and_mismatches(tmp_path):
  from medad_jax.checkpointing import Checkpointer
  graphdef, state, step_fn = build()
  x, y = jnp.ones((4, 8)), jnp.zeros((4,))
  ck = Checkpointer(str(tmp_path / 'ck'), keep=2, async_save=False)
  assert ck.restore_latest(state) is None
  states = {}
  for _ in range(4):
    state, _ = step_fn(state, x, y)
    states[int(state.step)] = state
    ck.save(int(state.step), state, data_state={'next_index': int(state.step) * 4}, meta={'stage': 'sft'})
  assert ck.all_steps() == [3, 4]
  _, fresh, _ = build()
  got, data_state, meta = ck.restore(3, fresh)
  assert data_state == {'next_index': 12} and meta['stage'] == 'sft'
  want = states[3]
  for a, b in zip(jax.tree.leaves((got.params, got.opt_state, got.step, got.rng)),
                  jax.tree.leaves((want.params, want.opt_state, want.step, want.rng))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  with pytest.raises(FileNotFoundError, match=r'no checkpoint for step 1; available: \[3, 4\]'):
    ck.restore(1, fresh)
  # A different frozen base (e.g. the wrong SFT adapters merged) is refused.
  other = fresh.replace(frozen=jax.tree.map(lambda v: v + 1.0, fresh.frozen))
  with pytest.raises(ValueError, match='frozen base weights differ'):
    ck.restore(4, other)
  ck.close()


def test_export_merged_policy_as_hf_directory(tmp_path):
  import dataclasses
  from medad_jax.checkpointing import export_hf
  from medad_jax.model.checkpoint import load_checkpoint
  from medad_jax.model.config import Qwen25VLConfig
  from medad_jax.model.lora import LoraConfig, apply_lora
  from medad_jax.model.qwen25vl import Qwen25VL
  from medad_jax.rl import update as U

  base = Qwen25VLConfig.tiny()
  cfg = base.replace(text=dataclasses.replace(base.text, num_layers=1),
                     vision=dataclasses.replace(base.vision, depth=1, fullatt_block_indexes=(0,)))
  model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  apply_lora(model, LoraConfig(rank=4, alpha=8.0))
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if path[-1] == 'lora_b':
      v.set_value(0.05 * jnp.ones(v.get_value().shape))
  graphdef, state = U.init_train_state(model, optax.sgd(0.1))
  out = export_hf(graphdef, state, str(tmp_path / 'hf'))
  assert os.path.exists(os.path.join(out, 'config.json'))
  loaded, _ = load_checkpoint(out)
  ids = jnp.arange(10, dtype=jnp.int32)[None] % 200
  pos = jnp.broadcast_to(jnp.arange(10)[None, None], (3, 1, 10))
  kw = dict(attention_mask_BT=jnp.ones((1, 10), jnp.int32), positions_3BT=pos)
  want = U.merge_model(graphdef, state)(ids, **kw)[0]
  got = loaded(ids, **kw)[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)
  # The adapters really were merged (the exported base differs from the original base).
  from medad_jax.model.layers import lora_disabled
  with lora_disabled():
    base_logits = U.merge_model(graphdef, state)(ids, **kw)[0]
  assert float(jnp.max(jnp.abs(base_logits - want))) > 1e-3


if __name__ == '__main__':
  logging_dir = sys.argv[1]
  opts = dict(zip(sys.argv[2::2], sys.argv[3::2]))
  run_loop(logging_dir, die_at=int(opts['die_at']) if 'die_at' in opts else None,
           sleep=float(opts.get('sleep', 0.0)))
