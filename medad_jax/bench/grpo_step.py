"""One Con-GRPO optimizer step: our jitted update vs the same loss and AdamW step in PyTorch eager (transformers).

    python -m medad_jax.bench grpo_step                         # tiny + small presets, 4 prompts x G=4
    python -m medad_jax.bench grpo_step --configs small --prompts 4 --group 8 --completion-len 64 --json out.json

Both sides get the same Qwen2.5-VL weights (a random-weight transformers model, loaded into ours with the
checkpoint table), the same LoRA adapters (rank ``--lora-rank`` on the 7 decoder projections, ``lora_b`` drawn
non-zero so the policy differs from the reference), the same rollout batch (``--prompts`` prompts of
``--prompt-len`` tokens with one image each, ``--group`` completions of ``--completion-len`` tokens, old log-probs
= the policy's own plus noise so the ratio clips on both sides, random rewards) and the same step:

    A_i = R_i - mean_group(R);  ratio = exp(logp - old_logp);  pg = -min(ratio A, clip(ratio, 1-eps, 1+eps) A)
    kl = exp(ref - logp) - (ref - logp) - 1  (k3, reference = adapters off);  loss = mean_i mean_t (pg + beta kl)
    grads of the adapters -> global-norm clip (1.0) -> AdamW (lr, betas 0.9/0.999, eps 1e-8, no weight decay)

Ours is ``medad_jax.rl.update.make_congrpo_update`` (prompt encoded once per prompt into a KV cache shared by its
G completions; reference forward in the same program). PyTorch runs what TRL-style trainers do: every rollout as a
full sequence (its prompt and image repeated), the reference forward under ``no_grad``, ``loss.backward()``,
``clip_grad_norm_`` and ``torch.optim.AdamW``. The first step's loss and gradient norm of both are printed and
must agree (fp32 whole-model tolerance), so the timing compares the same computation.

Timing: wall seconds of one step, best of ``--repeats`` after a warm-up step (that also compiles ours). Achieved
FLOP/s use model FLOPs (``medad_jax.plan.step_flops``): ours of the update as we compute it, PyTorch's of the
full-sequence formulation it executes; both against the measured matmul peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time

import numpy as np

from medad_jax.bench import common

log = logging.getLogger(__name__)

LOSS_TOL = 1e-4   # fp32 whole-model tolerance (project rule)


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m medad_jax.bench grpo_step', description=__doc__.split('\n')[0])
  p.add_argument('--configs', default='tiny,small', help='comma-separated presets: tiny, small')
  p.add_argument('--prompts', type=int, default=4)
  p.add_argument('--group', type=int, default=4, help='G')
  p.add_argument('--prompt-len', type=int, default=48, help='T: image tokens + text tokens')
  p.add_argument('--completion-len', type=int, default=32, help='N')
  p.add_argument('--image-side', type=int, default=8, help='patches per image side')
  p.add_argument('--lora-rank', type=int, default=8)
  p.add_argument('--lora-b-std', type=float, default=0.002,
                 help='std of the initial lora_b (non-zero: the policy differs from the reference)')
  p.add_argument('--lr', type=float, default=1e-4)
  p.add_argument('--beta', type=float, default=0.04)
  p.add_argument('--eps', type=float, default=0.2)
  p.add_argument('--torch-threads', default='best',
                 help="PyTorch intra-op threads: a number, or 'best' (time with 1 and with all cores, keep the faster: "
                      "on a loaded machine OpenMP spinning can make all-core runs 10-40x slower)")
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--peak-size', type=int, default=1024, help='matrix side of the matmul-peak measurement')
  p.add_argument('--json', default=None)
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- PyTorch side


def _torch_lora_wrappers(tm, ours_model, scale: float):
  """Wraps every adapted projection of the transformers model with our adapters' values (a shared switch turns
  them off for the reference forward)."""
  import torch
  from flax import nnx

  class LoraLinear(torch.nn.Module):
    def __init__(self, base, a, b):
      super().__init__()
      self.base, self.enabled = base, True
      self.lora_a = torch.nn.Parameter(torch.from_numpy(np.array(a)))
      self.lora_b = torch.nn.Parameter(torch.from_numpy(np.array(b)))

    def forward(self, x):
      y = self.base(x)
      return y + (x @ self.lora_a) @ self.lora_b * scale if self.enabled else y

  for p in tm.parameters():
    p.requires_grad_(False)
  adapters = nnx.state(ours_model, nnx.LoRAParam)
  flat = {'/'.join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(adapters)}
  wrappers = []
  for path in sorted({k.rsplit('/', 1)[0] for k in flat}):
    parts = path.split('/')   # model/layers/i/self_attn/q_proj
    if parts[:2] != ['model', 'layers']:
      raise ValueError(f'LoRA target {path!r} is outside the decoder layers; this benchmark maps only those')
    parent = tm.model.language_model.layers[int(parts[2])]
    for name in parts[3:-1]:
      parent = getattr(parent, name)
    w = LoraLinear(getattr(parent, parts[-1]), flat[path + '/lora_a'], flat[path + '/lora_b'])
    setattr(parent, parts[-1], w)
    wrappers.append(w)
  return wrappers


@contextlib.contextmanager
def _adapters_off(wrappers):
  for w in wrappers:
    w.enabled = False
  try:
    yield
  finally:
    for w in wrappers:
      w.enabled = True


def torch_inputs(cfg, batch: dict, group: int) -> dict:
  """Every rollout as one full sequence (prompt + completion), each with its own copy of its prompt's image."""
  import torch
  P, T = batch['prompt_ids_PT'].shape
  ids = np.concatenate([np.repeat(batch['prompt_ids_PT'], group, 0), batch['completion_ids_BN']], 1)
  mask = np.concatenate([np.repeat(batch['prompt_mask_PT'], group, 0), batch['completion_mask_BN']], 1)
  L = batch['pixel_values_ILC'].shape[1]   # one image per prompt, its patch bucket = its patch count
  pix = np.repeat(batch['pixel_values_ILC'], group, 0).reshape(P * group * L, -1)
  side = int(round(np.sqrt(L)))
  return dict(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)),
              pixel_values=torch.from_numpy(pix), image_grid_thw=torch.tensor([[1, side, side]] * (P * group)),
              mm_token_type_ids=torch.from_numpy((ids == cfg.image_token_id).astype(np.int64)))


def torch_step(tm, wrappers, opt, inputs: dict, batch: dict, args, T: int) -> tuple[float, float]:
  """One PyTorch Con-GRPO step -> (loss, gradient norm before clipping)."""
  import torch
  comp = torch.from_numpy(batch['completion_ids_BN'].astype(np.int64))
  m = torch.from_numpy(batch['completion_mask_BN'].astype(np.float32))
  old = torch.from_numpy(batch['old_logp_BN'])
  r = torch.from_numpy(batch['rewards_B']).reshape(-1, args.group)
  adv = (r - r.mean(1, keepdim=True)).reshape(-1, 1)
  N = comp.shape[1]

  def logp_of(logits):
    lsm = torch.log_softmax(logits[:, T - 1:T + N - 1].float(), -1)
    return lsm.gather(-1, comp[..., None])[..., 0]

  with torch.no_grad(), _adapters_off(wrappers):
    ref = logp_of(tm(**inputs).logits)
  logp = logp_of(tm(**inputs).logits)
  ratio = torch.exp(logp - old)
  pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - args.eps, 1 + args.eps) * adv)
  kl = torch.exp(ref - logp) - (ref - logp) - 1
  n = m.sum(1)
  seq = ((pg + args.beta * kl) * m).sum(1) / n.clamp(min=1)
  loss = seq[n > 0].mean()
  opt.zero_grad(set_to_none=True)
  loss.backward()
  params = [p for w in wrappers for p in (w.lora_a, w.lora_b)]
  gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
  opt.step()
  return float(loss.detach()), float(gnorm)


# ------------------------------------------------------------------------------------------- one config


def build(cfg, args):
  """(transformers model with our adapters, our LoRA model, rollout batch) with identical weights."""
  import jax
  from flax import nnx
  from medad_jax import plan as PL
  from medad_jax.model.checkpoint import load_hf_tensors
  from medad_jax.model.lora import LoraConfig, apply_lora
  from medad_jax.model.qwen25vl import Qwen25VL
  from medad_jax.rl import update as U
  from medad_jax.testing.hf import build_hf_model

  tm = build_hf_model(cfg, args.seed)
  ours = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  load_hf_tensors(ours, {k: v.detach().numpy() for k, v in tm.state_dict().items()}, where='benchmark model')
  apply_lora(ours, LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank))
  key = jax.random.PRNGKey(args.seed + 1)
  for path, v in nnx.to_flat_state(nnx.state(ours, nnx.LoRAParam)):
    if path[-1] == 'lora_b':   # non-zero, so the policy differs from the reference and the KL term is live
      key, sub = jax.random.split(key)
      v.set_value(args.lora_b_std * jax.random.normal(sub, v.get_value().shape))
  batch = PL.rollout_batch(cfg, args.prompts, args.group, args.prompt_len, args.completion_len, args.image_side,
                           seed=args.seed)
  graphdef, params, frozen = nnx.split(ours, nnx.LoRAParam, ...)
  logp = np.asarray(U.rollout_logprobs(graphdef, params, frozen, U.put_batch(batch, None), group_size=args.group))
  noise = np.random.default_rng(args.seed).normal(scale=0.3, size=logp.shape).astype(np.float32)
  batch['old_logp_BN'] = logp + noise
  return tm, ours, batch


def bench_config(name: str, args, peak: float) -> dict:
  import jax
  import torch
  from medad_jax import plan as PL
  from medad_jax.model.config import Qwen25VLConfig
  from medad_jax.rl import update as U

  cfg = Qwen25VLConfig.preset(name)
  log.info('%s: building both models and the batch', name)
  tm, ours, batch = build(cfg, args)
  wrappers = _torch_lora_wrappers(tm, ours, scale=2.0)   # alpha / rank, with alpha = 2 * rank as in build()
  tx, _ = U.make_optimizer(args.lr, max_grad_norm=1.0)
  graphdef, state = U.init_train_state(ours, tx)
  step = U.make_congrpo_update(graphdef, tx, U.GRPOConfig(group_size=args.group, beta=args.beta, eps_low=args.eps,
                                                          eps_high=args.eps))
  dev_batch = U.put_batch(batch, None)
  log.info('%s: our update (compiles first)', name)
  t0 = time.perf_counter()
  state, met = step(state, dev_batch)
  jax.block_until_ready(met)
  first_s = time.perf_counter() - t0
  ours_loss, ours_gnorm = float(met['loss']), float(met['grad_norm'])
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    state, met = step(state, dev_batch)
    jax.block_until_ready((state, met))
    times.append(time.perf_counter() - t0)
  ours_s = min(times)

  log.info('%s: PyTorch eager step', name)
  params = [p for w in wrappers for p in (w.lora_a, w.lora_b)]
  opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  inputs = torch_inputs(cfg, batch, args.group)
  T = args.prompt_len
  torch_loss, torch_gnorm = torch_step(tm, wrappers, opt, inputs, batch, args, T)   # first step = the warm-up
  import os
  choices = ([1, os.cpu_count() or 1] if args.torch_threads == 'best' else [int(args.torch_threads)])
  by_threads = {}
  for n_threads in dict.fromkeys(choices):
    torch.set_num_threads(n_threads)
    ts = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      torch_step(tm, wrappers, opt, inputs, batch, args, T)
      ts.append(time.perf_counter() - t0)
    by_threads[n_threads] = ts
  torch_threads = min(by_threads, key=lambda k: min(by_threads[k]))
  ttimes = by_threads[torch_threads]
  torch_s = min(ttimes)
  if abs(ours_loss - torch_loss) > LOSS_TOL * max(1.0, abs(torch_loss)):
    raise RuntimeError(f'{name}: first-step losses differ: ours {ours_loss:.7f}, PyTorch {torch_loss:.7f}; the '
                       'two steps do not compute the same thing')

  w = PL.Workload(stage='congrpo', prompts=args.prompts, group_size=args.group, prompt_len=args.prompt_len,
                  completion_len=args.completion_len, image_patches=args.image_side**2, lora_rank=args.lora_rank,
                  dtype='float32', param_dtype='float32')
  ours_flops = PL.step_flops(cfg, w).update
  # PyTorch's formulation: B full sequences of T + N tokens (prompt and image repeated), logits at every position,
  # a reference forward: the SFT-shaped step over those sequences plus one more forward.
  B = args.prompts * args.group
  full = PL.Workload(stage='sft', prompts=B, group_size=1, prompt_len=args.prompt_len + args.completion_len,
                     completion_len=0, image_patches=args.image_side**2, lora_rank=args.lora_rank)
  f = PL.step_flops(cfg, full)
  torch_flops = f.update_forward + f.update_backward + f.update_forward
  res = dict(config=name, params=common.param_count(cfg), prompts=args.prompts, group=args.group,
             prompt_len=args.prompt_len, completion_len=args.completion_len, ours_s=ours_s, ours_times=times,
             ours_compile_and_first_s=first_s, torch_s=torch_s, torch_times=by_threads, torch_threads=torch_threads,
             speedup=torch_s / ours_s,
             ours_first_loss=ours_loss, torch_first_loss=torch_loss, ours_first_grad_norm=ours_gnorm,
             torch_first_grad_norm=torch_gnorm, ours_model_flops=ours_flops, torch_model_flops=torch_flops,
             ours_flops_per_s=ours_flops / ours_s, torch_flops_per_s=torch_flops / torch_s,
             matmul_peak_flops_per_s=peak)
  rows = [
      common.Row(f'step wall time (PyTorch: {torch_threads} thread(s))', ours_s, torch_s, 's', higher_is_better=False),
      common.Row('  our compile + first step', first_s, None, 's'),
      common.Row('first-step loss', ours_loss, torch_loss, ''),
      common.Row('first-step grad norm', ours_gnorm, torch_gnorm, ''),
      common.Row('model FLOPs per step (fewer is better)', ours_flops, torch_flops, 'FLOP', higher_is_better=False),
      common.Row('achieved FLOP/s', ours_flops / ours_s, torch_flops / torch_s, 'FLOP/s'),
      common.Row('  fraction of matmul peak', ours_flops / ours_s / peak, torch_flops / torch_s / peak, ''),
  ]
  title = (f'grpo_step [{name}: {res["params"] / 1e6:.1f}M params, LoRA rank {args.lora_rank}] {args.prompts} '
           f'prompts x G={args.group}, T={args.prompt_len} (image {args.image_side}x{args.image_side} patches), '
           f'N={args.completion_len}; first-step loss ours {ours_loss:.7f} vs PyTorch {torch_loss:.7f}')
  common.emit(common.format_table(title, rows, peer_name='PyTorch eager'))
  return res


def main(argv: list[str]) -> int:
  common.setup_logging()
  args = parse_args(argv)
  names = [n.strip() for n in args.configs.split(',') if n.strip()]
  unknown = [n for n in names if n not in ('tiny', 'small')]
  if unknown:
    raise SystemExit(f'--configs: unknown preset(s) {unknown}; choose from tiny, small')
  import torch  # noqa: F401  (loaded before the summary so its thread count is shown)
  log.info('measuring the matmul peak')
  peak = common.matmul_peak_flops(args.peak_size)
  common.emit(f'machine: {common.machine_summary()}\nmeasured fp32 matmul peak (jax, {args.peak_size}^3): '
              f'{peak / 1e9:.1f} GFLOP/s')
  results = [bench_config(n, args, peak) for n in names]
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(common.to_jsonable(dict(argv=argv, machine=common.machine_summary(), results=results)), f, indent=2)
  return 0

