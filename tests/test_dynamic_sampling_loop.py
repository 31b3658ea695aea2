"""DAPO dynamic sampling in the Con-GRPO loop (``rl.dynamic_sampling=True``) on the tiny model: zero-variance groups
are dropped and new prompt batches drawn until ``rl.prompts_per_step`` informative groups are kept (or the draw cap
is reached, then zero-variance filler), and ONE update runs on the batch assembled from the kept groups.

The rewards are scripted, so drops and refills happen deterministically: the decoded text of each rollout (the
tokens the update trains on are the sampler's, untouched) is made well formed or not per group, and only the format
reward counts (``reward.fmt=1``, accuracy and consistency weights 0). An informative group ``I`` gets one
well-formed and one malformed completion (rewards 1, 0), a zero-variance group ``Z`` two malformed ones (0, 0).
"""

import os

import numpy as np
import pytest

from configs import common
from medad_jax.metrics import read_jsonl
from medad_jax.rl import update as U
from medad_jax.train import congrpo, feed, pipeline as pl

P, G = 2, 2
TOL = 1e-4  # whole-model fp32 tolerance (project rule)
GOOD, BAD = '<think>look</think><answer>A</answer>', 'no tags'
# Per draw (one whole batch of P prompts), the groups' kinds; steps: [draws].
SCRIPT = [[['I', 'I']],                                  # step 1: one draw, nothing dropped
          [['Z', 'I'], ['I', 'I']],                      # step 2: one drop, refilled; one informative group spare
          [['Z', 'Z'], ['Z', 'Z'], ['Z', 'I']]]          # step 3: the cap (3 draws), one zero-variance filler
# The kept groups, (draw, prompt) within the step, in the order the update sees them.
KEPT = [[(0, 0), (0, 1)], [(0, 1), (1, 0)], [(2, 1), (0, 0)]]
# (drawn, dropped, filler, surplus, draws) per step
COUNTS = [(2, 0, 0, 0, 1), (4, 1, 0, 1, 2), (6, 4, 1, 0, 3)]
OVERRIDES = ['model.preset=tiny', 'data.synth_images=20', 'data.image_size=56', 'data.read_threads=1',
             f'rl.prompts_per_step={P}', f'rl.group_size={G}', 'rl.max_steps=3', 'sampling.max_new_tokens=8',
             'rl.dynamic_sampling=True', 'rl.dynamic_sampling_max_draws=3',
             # mu = 2 takes the reference pass out of the update (onto the assembled batch); with TIS the update
             # recomputes pi_old on the assembled batch, and its logged mismatch against the sampler's log-probs of
             # the same rows is exact: a prompt or a row out of place would show.
             'rl.inner_iterations=2', 'rl.tis_cap=2.0',
             'reward.fmt=1.0', 'reward.acc=0.0', 'reward.con=0.0', 'judge.backend=rule',
             'eval.enabled=False', 'ckpt.async_save=False', 'mesh.devices=1', 'log.tensorboard=False']


def test_dynamic_sampling_drops_refills_and_updates_on_the_kept_groups(tmp_path, monkeypatch):
  monkeypatch.setenv('MEDAD_JAX_CACHE', str(tmp_path / 'cache'))
  kinds = [g for step in SCRIPT for d in step for g in d]   # every drawn group's kind, in draw order
  decoded, prompt_calls, updates = [], [], []

  def decode(tokenizer, tokens_BN, lengths_B):
    decoded.append(np.array(tokens_BN))
    out = []
    for _ in range(tokens_BN.shape[0] // G):
      out += [GOOD, BAD] if kinds.pop(0) == 'I' else [BAD, BAD]
    return out

  real_prompts = feed.prompt_batch

  def prompt_batch(run, examples, num_prompts):
    prompt_calls.append([np.asarray(ex['input_ids']) for ex in examples])
    return real_prompts(run, examples, num_prompts)

  real_update = U.make_congrpo_update

  def make_update(*a, **k):
    upd = real_update(*a, **k)

    class Spy:
      @property
      def traces(self):
        return upd.traces

      def __call__(self, state, batch):
        updates.append({n: np.asarray(batch[n]) for n in ('prompt_ids_PT', 'completion_ids_BN', 'rewards_B')})
        return upd(state, batch)
    return Spy()

  monkeypatch.setattr(pl, 'decode_completions', decode)
  monkeypatch.setattr(feed, 'prompt_batch', prompt_batch)
  monkeypatch.setattr(U, 'make_congrpo_update', make_update)
  # One prompt-length bucket (the synthetic prompts need 96 or 128 tokens): one shape for every draw and assembly,
  # so that nothing compiles twice (the test's run time) and one compiled update is asserted below.
  monkeypatch.setattr(pl, 'PROMPT_LENGTH_BUCKETS', (128,))

  config = common.load('congrpo', OVERRIDES)
  run = pl.setup(config, str(tmp_path / 'run'))
  res = congrpo.train(run, pl.build_model(config, run.model_cfg, config.seed))
  run.logger.close()
  recs = [r for r in read_jsonl(os.path.join(run.workdir, 'metrics.jsonl')) if r['stage'] == 'congrpo']
  assert not kinds and len(recs) == 3 and int(res.state.step) == 3 * 2

  draw0 = 0
  for s, rec in enumerate(recs):
    n_draws = len(SCRIPT[s])
    drawn, dropped, filler, surplus, draws = COUNTS[s]
    assert [rec[f'dyn_{k}'] for k in ('drawn', 'dropped', 'filler', 'surplus', 'draws')] == list(COUNTS[s])
    # every drawn group is kept (informative or filler), dropped, or an informative surplus
    assert drawn == P + dropped + surplus and draws == n_draws
    assert filler == 0 or draws == 3   # filler only at the cap (rl.dynamic_sampling_max_draws)
    ups = updates[2 * s:2 * s + 2]   # mu = 2 updates on one assembled batch
    for u in ups:
      # the same static shapes as a step without dynamic sampling: P groups of G rows
      assert u['prompt_ids_PT'].shape[0] == P and u['completion_ids_BN'].shape[0] == P * G
    u = ups[0]
    # the assembled batch: the kept groups' questions, the sampler's tokens of their rows and their rewards
    calls = prompt_calls[draw0 + s:draw0 + s + n_draws + 1]   # this step's draws, then the assembly (1 a step)
    assert [ids.tolist() for ids in calls[-1]] == [calls[d][p].tolist() for d, p in KEPT[s]]
    want_tokens = np.concatenate([decoded[draw0 + d][p * G:(p + 1) * G] for d, p in KEPT[s]])
    np.testing.assert_array_equal(u['completion_ids_BN'], want_tokens)
    want_r = [r for d, p in KEPT[s] for r in ((1.0, 0.0) if SCRIPT[s][d][p] == 'I' else (0.0, 0.0))]
    np.testing.assert_array_equal(u['rewards_B'], want_r)
    assert rec['reward_fmt'] == pytest.approx(np.mean(want_r))
    drawn_r = [np.mean([0.5 if k == 'I' else 0.0 for k in d]) for d in SCRIPT[s]]
    assert rec['reward_drawn'] == pytest.approx(np.mean(drawn_r))
    # pi_old recomputed by the update on the assembled batch equals the sampler's log-probs of those rows
    assert rec['logp_mismatch'] < TOL, rec['logp_mismatch']
    # one compiled update: the assembled batch has the shapes of a step without dynamic sampling
    assert rec['compiled_programs'] == 1
    draw0 += n_draws
