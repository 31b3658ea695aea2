"""Against the JAX peer: our rollout and Con-GRPO update vs Tunix's (``google-tunix``) on the same weights.

    python -m medad_jax.bench peers                          # small preset, 8 prompts x G=8, 64 + 64 tokens
    python -m medad_jax.bench peers --configs small,base100m --json out.json

``google-tunix`` is a benchmark-only dependency (``requirements-bench.txt``; see the install note there and in
:data:`INSTALL_HINT`). Tunix's GRPO is text-only, so the comparison is the text decoder: our Qwen2.5-VL model
with text-only prompts (M-RoPE with three equal position rows is 1-D RoPE) against ``tunix.models.qwen2.Qwen2``.

Same weights: one random model of ours (LoRA adapters attached, ``lora_b`` drawn non-zero so the policy differs
from the reference) is exported with our checkpoint table (HF names) and mapped into Tunix's parameter tree
(:func:`hf_to_tunix`, :func:`lora_to_tunix`; adapters attached on Tunix's side with ``qwix``, its LoRA library).
Before anything is timed both directions are checked: Tunix's logits (adapters on and off) equal ours within
1e-4 (fp32), and a fresh model of ours loaded back from Tunix's tree (:func:`tunix_to_hf`,
:func:`lora_from_tunix`) gives Tunix's logits within 1e-4 too.

Measured, side by side in one process, each pair taking turns after a warm-up call of each (that compiles):

* rollout: ``P`` prompts x ``G`` samples x ``N`` new tokens, plain sampling (temperature 1), exactly ``N``
  tokens per sample. Ours: ``sampling.sampler.sample`` (prompt prefilled once, its cache shared by the G
  samples). Tunix: ``tunix.generate.sampler.Sampler`` called as its GRPO rollout calls it (the prompt list
  repeated G times, ``top_p`` 1, no eos reachable);
* the update alone, on one batch both sides get (same prompts, completions, old and reference log-probs,
  rewards): one Con-GRPO step with LoRA rank ``--lora-rank`` on the 7 decoder projections of both, ratio to the
  old policy, clip 0.2, k3 KL with beta 0.04, sequence-mean-token-mean aggregation, global-norm clip 1 and
  AdamW (the same optax chain on both sides). Ours: ``rl.update.make_congrpo_update``; Tunix: its RL actor
  trainer's jitted train step with its ``grpo`` policy loss. The first-step losses and gradient norms must agree
  within 1e-4 (relative) or the benchmark stops;
* the whole step: rollout + reference log-probs + update. Ours: ``sample`` then the update (reference forward
  inside it, adapters off). Tunix: its sampler, its ``compute_per_token_logps`` on the reference model, its
  train step: the pieces its ``GRPOLearner`` runs per step without its orchestration (metrics buffers,
  perf tracing, queues), so Tunix's figure is a lower bound on its real step time.

Reported: seconds, tokens/s, model FLOPs of the formulation each side executes (``plan.step_flops`` for ours;
full sequences for Tunix), achieved FLOP/s against the measured fp32 matmul peak, and the ratios. The last line
is ``peers: rollout <r>x tunix, update <u>x tunix`` (ours over Tunix's, > 1 = ours faster).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Mapping

import numpy as np

from medad_jax.bench import common
from medad_jax.model.config import Qwen25VLConfig, TextConfig

log = logging.getLogger(__name__)

LOGITS_TOL = 1e-4   # fp32 whole-model tolerance (project rule), absolute on the logits
LOSS_TOL = 1e-4     # relative, on the first-step loss and gradient norm
INSTALL_HINT = ('google-tunix is not installed. It cannot share requirements.txt (it declares safetensors<0.8, '
                'our pin is 0.8.0), so it is installed without its dependency resolver:\n'
                '    pip install --no-deps -r requirements-bench.txt\n'
                '(preferably in a virtual environment made with --system-site-packages on top of '
                'requirements.txt; see requirements-bench.txt)')

LORA_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
_ATTN = ('q_proj', 'k_proj', 'v_proj', 'o_proj')


def base100m() -> Qwen25VLConfig:
  """A ~100M-parameter text decoder (12 layers, width 768, vocabulary 16384) on the small vision tower."""
  s = Qwen25VLConfig.small(vocab_size=16384)
  text = TextConfig(**{**s.text.__dict__, 'hidden_size': 768, 'num_layers': 12, 'num_heads': 12, 'num_kv_heads': 2,
                       'intermediate_size': 2560, 'mrope_section': (8, 12, 12)})
  return s.replace(text=text, vision=s.vision.__class__(**{**s.vision.__dict__, 'out_hidden_size': 768}))


PRESETS = {'tiny': lambda: Qwen25VLConfig.tiny(tie_word_embeddings=True), 'small': Qwen25VLConfig.small,
           'mini': Qwen25VLConfig.mini, 'base100m': base100m}


def text_params(t: TextConfig) -> int:
  """Parameters of the text decoder alone (what both sides hold), a tied head counted once."""
  D, H = t.hidden_size, t.head_dim
  layer = (D * (t.num_heads + 2 * t.num_kv_heads) * H + (t.num_heads + 2 * t.num_kv_heads) * H
           + t.num_heads * H * D + 3 * D * t.intermediate_size + 2 * D)
  return t.num_layers * layer + t.vocab_size * D * (1 if t.tie_word_embeddings else 2) + D


# ----------------------------------------------------------------------------- weight mapping (numpy only)


def tunix_config_kwargs(t: TextConfig) -> dict:
  """Keyword arguments of ``tunix.models.qwen2.model.ModelConfig`` for our text config (fp32)."""
  if t.rope_theta != int(t.rope_theta):
    raise ValueError(f'rope_theta={t.rope_theta}: Tunix takes an integer theta')
  return dict(num_layers=t.num_layers, vocab_size=t.vocab_size, embed_dim=t.hidden_size,
              hidden_dim=t.intermediate_size, num_heads=t.num_heads, head_dim=t.head_dim,
              num_kv_heads=t.num_kv_heads, rope_theta=int(t.rope_theta), norm_eps=t.rms_norm_eps,
              use_tied_embedding=t.tie_word_embeddings)


def _heads(t: TextConfig, proj: str) -> int:
  return t.num_heads if proj in ('q_proj', 'o_proj') else t.num_kv_heads


def hf_to_tunix(tensors: Mapping[str, np.ndarray], t: TextConfig) -> dict[tuple, np.ndarray]:
  """HF-named text tensors (our checkpoint table's export) -> Tunix ``Qwen2`` parameter paths and layouts.

  HF linears are ``[out, in]``; Tunix's attention projections are einsum weights ``[D, heads, H]`` (q/k/v) and
  ``[heads, H, D]`` (o), its MLP ``nnx.Linear`` kernels ``[in, out]``. Vision and unknown keys are an error here:
  pass the text decoder's keys only (:func:`text_tensors`).
  """
  D, H = t.hidden_size, t.head_dim
  out: dict[tuple, np.ndarray] = {}
  used = set()

  def take(key):
    if key not in tensors:
      raise KeyError(f'hf_to_tunix: tensor {key!r} is missing (expected the text decoder of a '
                     f'{t.num_layers}-layer model)')
    used.add(key)
    return np.asarray(tensors[key])

  out[('embedder', 'input_embedding')] = take('model.embed_tokens.weight')
  out[('final_norm', 'w')] = take('model.norm.weight')
  if not t.tie_word_embeddings:
    out[('lm_head', 'w')] = take('lm_head.weight').T
  for i in range(t.num_layers):
    p = f'model.layers.{i}.'
    for proj in _ATTN:
      w = take(p + f'self_attn.{proj}.weight')
      n = _heads(t, proj)
      out[('layers', i, 'attn', proj, 'w')] = (w.T.reshape(n, H, D) if proj == 'o_proj'
                                               else w.T.reshape(D, n, H))
    for b in ('q', 'k', 'v'):
      out[('layers', i, 'attn', f'{b}_bias')] = take(p + f'self_attn.{b}_proj.bias')
    for proj in ('gate_proj', 'up_proj', 'down_proj'):
      out[('layers', i, 'mlp', proj, 'kernel')] = take(p + f'mlp.{proj}.weight').T
    out[('layers', i, 'input_layernorm', 'w')] = take(p + 'input_layernorm.weight')
    out[('layers', i, 'post_attention_layernorm', 'w')] = take(p + 'post_attention_layernorm.weight')
  extra = sorted(set(tensors) - used - ({'lm_head.weight'} if t.tie_word_embeddings else set()))
  if extra:
    raise KeyError(f'hf_to_tunix: {len(extra)} tensor(s) have no place in Tunix\'s Qwen2, e.g. {extra[:3]}')
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def tunix_to_hf(flat: Mapping[tuple, np.ndarray], t: TextConfig) -> dict[str, np.ndarray]:
  """The inverse of :func:`hf_to_tunix`: Tunix ``Qwen2`` parameters -> HF-named text tensors."""
  D, H = t.hidden_size, t.head_dim

  def take(path):
    if path not in flat:
      raise KeyError(f'tunix_to_hf: parameter {"/".join(map(str, path))} is missing from the Tunix model')
    return np.asarray(flat[path])

  out = {'model.embed_tokens.weight': take(('embedder', 'input_embedding')),
         'model.norm.weight': take(('final_norm', 'w'))}
  if not t.tie_word_embeddings:
    out['lm_head.weight'] = take(('lm_head', 'w')).T
  for i in range(t.num_layers):
    p = f'model.layers.{i}.'
    for proj in _ATTN:
      w = take(('layers', i, 'attn', proj, 'w'))
      n = _heads(t, proj)
      out[p + f'self_attn.{proj}.weight'] = (w.reshape(n * H, D).T if proj == 'o_proj' else w.reshape(D, n * H).T)
    for b in ('q', 'k', 'v'):
      out[p + f'self_attn.{b}_proj.bias'] = take(('layers', i, 'attn', f'{b}_bias'))
    for proj in ('gate_proj', 'up_proj', 'down_proj'):
      out[p + f'mlp.{proj}.weight'] = take(('layers', i, 'mlp', proj, 'kernel')).T
    out[p + 'input_layernorm.weight'] = take(('layers', i, 'input_layernorm', 'w'))
    out[p + 'post_attention_layernorm.weight'] = take(('layers', i, 'post_attention_layernorm', 'w'))
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def text_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The text decoder's tensors of a full Qwen2.5-VL export (the vision tower's dropped)."""
  return {k: v for k, v in tensors.items() if not k.startswith('visual.')}


def _our_lora_path(i: int, proj: str) -> tuple:
  return ('model', 'layers', i, 'self_attn' if proj in _ATTN else 'mlp', proj)


def _tunix_lora_path(i: int, proj: str) -> tuple:
  return ('layers', i, 'attn', proj, 'w') if proj in _ATTN else ('layers', i, 'mlp', proj, 'kernel')


def lora_to_tunix(adapters: Mapping[tuple, np.ndarray], t: TextConfig) -> dict[tuple, np.ndarray]:
  """Our adapters ``{(model, layers, i, self_attn|mlp, proj, lora_a|lora_b): array}`` (``lora_a [in, r]``,
  ``lora_b [r, out]``) -> qwix's LoRA parameters on Tunix's modules (``w_lora_a [D, r]``, ``w_lora_b [r, heads,
  H]`` for q/k/v; ``w_lora_a [heads, H, r]``, ``w_lora_b [r, D]`` for o; ``kernel_lora_a/b`` for the MLP)."""
  D, H = t.hidden_size, t.head_dim
  out = {}
  for i in range(t.num_layers):
    for proj in LORA_TARGETS:
      ours = _our_lora_path(i, proj)
      if ours + ('lora_a',) not in adapters:
        raise KeyError(f'lora_to_tunix: no adapter at {"/".join(map(str, ours))}; both sides adapt the 7 '
                       f'decoder projections {LORA_TARGETS}')
      a, b = np.asarray(adapters[ours + ('lora_a',)]), np.asarray(adapters[ours + ('lora_b',)])
      r = a.shape[1]
      base = _tunix_lora_path(i, proj)
      stem, name = base[:-1], base[-1]
      if proj == 'o_proj':
        a = a.reshape(t.num_heads, H, r)
      elif proj in _ATTN:
        b = b.reshape(r, _heads(t, proj), H)
      out[stem + (f'{name}_lora_a',)] = np.ascontiguousarray(a)
      out[stem + (f'{name}_lora_b',)] = np.ascontiguousarray(b)
  del D
  return out


def lora_from_tunix(flat: Mapping[tuple, np.ndarray], t: TextConfig) -> dict[tuple, np.ndarray]:
  """The inverse of :func:`lora_to_tunix`."""
  out = {}
  for i in range(t.num_layers):
    for proj in LORA_TARGETS:
      base = _tunix_lora_path(i, proj)
      stem, name = base[:-1], base[-1]
      key_a, key_b = stem + (f'{name}_lora_a',), stem + (f'{name}_lora_b',)
      if key_a not in flat or key_b not in flat:
        raise KeyError(f'lora_from_tunix: no qwix adapter at {"/".join(map(str, stem))}')
      a, b = np.asarray(flat[key_a]), np.asarray(flat[key_b])
      r = b.shape[0]
      a = a.reshape(-1, r)
      b = b.reshape(r, -1)
      ours = _our_lora_path(i, proj)
      out[ours + ('lora_a',)] = np.ascontiguousarray(a)
      out[ours + ('lora_b',)] = np.ascontiguousarray(b)
  return out


# ----------------------------------------------------------------------------- FLOPs and the summary line


def rollout_flops(t: TextConfig, P: int, G: int, T: int, N: int, *, shared_prompt: bool, lora_rank: int) -> float:
  """Model FLOPs of a rollout as each side executes it (LoRA adapters on the 7 projections included).

  Shared prompt (ours): P prompt prefills (logits of the last token only), B = P*G rows decoding ``N - 1``
  forwards. Not shared (Tunix): B prefills with logits at every prompt position, ``N`` decode forwards.
  """
  B = P * G
  # lora_tok: 2 FLOPs x rank x (in + out) per adapted projection, summed over the 7 projections, per token.
  lora_tok = 2 * lora_rank * t.num_layers * (
      (t.hidden_size + t.num_heads * t.head_dim) * 2            # q, o
      + (t.hidden_size + t.num_kv_heads * t.head_dim) * 2       # k, v
      + (t.hidden_size + t.intermediate_size) * 3)              # gate, up, down
  if shared_prompt:
    prefill = P * (common.text_flops(t, T, T, lm_head_tokens=1) + T * lora_tok)
    steps = N - 1
  else:
    prefill = B * (common.text_flops(t, T, T, lm_head_tokens=T) + T * lora_tok)
    steps = N
  decode = B * sum(common.text_flops(t, 1, T + s + 1) + lora_tok for s in range(steps))
  return prefill + decode


def summary_line(rollout_ratio: float, update_ratio: float) -> str:
  """The benchmark's last line (read by scripts)."""
  return f'peers: rollout {rollout_ratio:.2f}x tunix, update {update_ratio:.2f}x tunix'


# ----------------------------------------------------------------------------- the two stacks


class IdTokenizer:
  """A tokenizer for Tunix's sampler over token-id strings ``"12 7 99"`` (the benchmark's prompts are ids).

  ``eos_id`` is the vocabulary size, a token no model can sample, so every sample runs ``N`` tokens.
  """

  def __init__(self, vocab_size: int, pad_id: int):
    self.vocab_size, self._pad = vocab_size, pad_id

  def encode(self, text: str, **_) -> list[int]:
    return [int(x) for x in text.split()]

  def decode(self, ids, **_) -> str:
    return ' '.join(str(int(x)) for x in ids)

  def bos_id(self):
    return None

  def eos_id(self) -> int:
    return self.vocab_size

  def pad_id(self) -> int:
    return self._pad


def _import_tunix():
  try:
    import qwix  # noqa: F401
    from tunix.models.qwen2 import model as tunix_qwen2  # noqa: F401
  except ImportError as e:
    raise SystemExit(f'{INSTALL_HINT}\n(import failed: {e})') from None


def _flat(module_or_state) -> dict:
  from flax import nnx
  state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state)
  return {tuple(p): v for p, v in nnx.to_flat_state(state)}


def _assign(module, arrays: Mapping[tuple, np.ndarray], what: str, variable_type=None):
  """Sets ``arrays`` into ``module``'s variables (of ``variable_type``), checking that paths and shapes match."""
  import jax.numpy as jnp
  from flax import nnx
  flat = _flat(nnx.state(module, variable_type) if variable_type is not None else nnx.state(module))
  missing = sorted(set(flat) - set(arrays), key=str)
  extra = sorted(set(arrays) - set(flat), key=str)
  if missing or extra:
    raise KeyError(f'{what}: parameter trees differ: missing {missing[:3]}, unexpected {extra[:3]}')
  for path, v in flat.items():
    want = v.get_value().shape
    if tuple(arrays[path].shape) != tuple(want):
      raise ValueError(f'{what}: {"/".join(map(str, path))} has shape {arrays[path].shape}, expected {want}')
    v.set_value(jnp.asarray(arrays[path], v.get_value().dtype))


def build_ours(cfg: Qwen25VLConfig, args):
  """Our model with rank-``r`` adapters, ``lora_b`` drawn non-zero."""
  import jax
  from flax import nnx
  from medad_jax.model.lora import LoraConfig, apply_lora
  from medad_jax.model.qwen25vl import Qwen25VL

  model = Qwen25VL(cfg, rngs=nnx.Rngs(args.seed))
  apply_lora(model, LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank), rngs=nnx.Rngs(args.seed + 1))
  key = jax.random.PRNGKey(args.seed + 2)
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if path[-1] == 'lora_b':   # non-zero: the policy differs from the reference, the KL term is live
      key, sub = jax.random.split(key)
      v.set_value(args.lora_b_std * jax.random.normal(sub, v.get_value().shape))
  return model


def our_adapters(model) -> dict[tuple, np.ndarray]:
  from flax import nnx
  return {p: np.asarray(v.get_value()) for p, v in _flat(nnx.state(model, nnx.LoRAParam)).items()}


def build_tunix(cfg: Qwen25VLConfig, ours, args):
  """(Tunix reference model = base weights, Tunix actor = base + qwix LoRA) with our weights and adapters."""
  import qwix
  from flax import nnx
  from tunix.models.qwen2 import model as tq
  from medad_jax.model.checkpoint import hf_tensors_from_model

  t = cfg.text
  tcfg = tq.ModelConfig(**tunix_config_kwargs(t))
  tensors = hf_to_tunix(text_tensors(hf_tensors_from_model(ours, merge_lora=False)), t)
  ref = tq.Qwen2(tcfg, rngs=nnx.Rngs(0))
  _assign(ref, tensors, 'Tunix reference model')
  base = tq.Qwen2(tcfg, rngs=nnx.Rngs(0))
  _assign(base, tensors, 'Tunix actor base')
  provider = qwix.LoraProvider(module_path='.*(' + '|'.join(LORA_TARGETS) + ')$', rank=args.lora_rank,
                               alpha=2.0 * args.lora_rank)
  actor = qwix.apply_lora_to_model(base, provider, rngs=nnx.Rngs(0), **base.get_model_input())
  _assign(actor, lora_to_tunix(our_adapters(ours), t), 'Tunix actor adapters', nnx.LoRAParam)
  return tcfg, ref, actor


def tunix_logits(model, ids_BT: np.ndarray) -> np.ndarray:
  """Tunix's full-sequence forward (no cache, causal mask, positions 0..T-1) -> float32 logits."""
  import jax.numpy as jnp
  B, T = ids_BT.shape
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
  logits, _ = model(jnp.asarray(ids_BT, jnp.int32), pos, None, mask)
  return np.asarray(logits, np.float32)


def our_logits(model, ids_BT: np.ndarray, adapters: bool = True) -> np.ndarray:
  import contextlib
  import jax.numpy as jnp
  from medad_jax.model.layers import lora_disabled
  B, T = ids_BT.shape
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (3, B, T))
  with (contextlib.nullcontext() if adapters else lora_disabled()):
    logits, _ = model(jnp.asarray(ids_BT, jnp.int32), attention_mask_BT=jnp.ones((B, T), jnp.int32),
                      positions_3BT=pos)
  return np.asarray(logits, np.float32)


def check_mapping(cfg: Qwen25VLConfig, ours, ref, actor, args) -> dict:
  """Both directions of the weight mapping, by logits (see the module docstring); raises when they differ."""
  from flax import nnx
  from medad_jax.model.checkpoint import hf_tensors_from_model, load_hf_tensors

  t = cfg.text
  rng = np.random.default_rng(args.seed + 3)
  ids = rng.integers(0, t.vocab_size - 8, (2, min(args.prompt_len, 32))).astype(np.int32)
  diffs = {}
  want_on, want_off = our_logits(ours, ids), our_logits(ours, ids, adapters=False)
  diffs['ours->tunix, adapters on'] = float(np.max(np.abs(tunix_logits(actor, ids) - want_on)))
  diffs['ours->tunix, reference'] = float(np.max(np.abs(tunix_logits(ref, ids) - want_off)))
  # Tunix -> ours: a fresh model of ours (other random weights) takes Tunix's text weights and adapters.
  back = build_ours(cfg, argparse.Namespace(**{**vars(args), 'seed': args.seed + 100}))
  full = hf_tensors_from_model(back, merge_lora=False)
  base_flat = {p: np.asarray(v.get_value()) for p, v in _flat(nnx.state(actor, nnx.Param)).items()}
  full.update(tunix_to_hf(base_flat, t))
  load_hf_tensors(back, full, where='Tunix model')
  lora = lora_from_tunix({p: np.asarray(v.get_value()) for p, v in _flat(nnx.state(actor, nnx.LoRAParam)).items()}, t)
  _assign(back, lora, 'our adapters from Tunix', nnx.LoRAParam)
  got_t = tunix_logits(actor, ids)
  diffs['tunix->ours, adapters on'] = float(np.max(np.abs(our_logits(back, ids) - got_t)))
  got_ref = tunix_logits(ref, ids)
  diffs['tunix->ours, reference'] = float(np.max(np.abs(our_logits(back, ids, adapters=False) - got_ref)))
  bad = {k: v for k, v in diffs.items() if not v <= LOGITS_TOL}
  scale = float(np.max(np.abs(want_on)))
  if bad:
    raise RuntimeError(f'weight mapping check failed: max |logit difference| {bad} > {LOGITS_TOL} (logits up to '
                       f'{scale:.3g}); the two models do not compute the same function')
  if not np.max(np.abs(want_on - want_off)) > 10 * LOGITS_TOL:
    raise RuntimeError('the adapters do not change the logits: the adapter mapping would go unchecked')
  log.info('weight mapping: max |logit diff| %s (logits up to %.3g)', {k: f'{v:.1e}' for k, v in diffs.items()},
           scale)
  return diffs


# ----------------------------------------------------------------------------- rollouts


def make_prompts(cfg: Qwen25VLConfig, args) -> np.ndarray:
  """``[P, T]`` random text prompts (no special or pad tokens)."""
  rng = np.random.default_rng(args.seed + 4)
  return rng.integers(0, cfg.text.vocab_size - 8, (args.prompts, args.prompt_len)).astype(np.int32)


def our_rollout_fn(cfg, get_model, prompts_PT: np.ndarray, args):
  """``(rollout fn, prompt batch)``; ``get_model()`` gives the current policy (the update donates its state)."""
  import jax
  from medad_jax.sampling import SamplingConfig, prepare_prompts
  from medad_jax.sampling import sampler as sampler_lib

  batch = prepare_prompts(cfg, prompts_PT)
  if batch.prompt_len != args.prompt_len:
    raise SystemExit(f'--prompt-len {args.prompt_len} is not one of the sampler\'s length buckets (it would be '
                     f'padded to {batch.prompt_len}); pick a bucket such as 32, 64 or 128')
  config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
  calls = [0]

  def rollout():
    calls[0] += 1
    r = sampler_lib.sample(get_model(), batch, key=jax.random.key(args.seed + calls[0]), config=config,
                           num_samples=args.group)
    r = jax.block_until_ready(r)
    lengths = np.asarray(r.lengths_B)
    if not (lengths == args.new_tokens).all():
      raise RuntimeError(f'our rollout lengths {sorted(set(lengths.tolist()))} != --new-tokens {args.new_tokens}')
    return r

  return rollout, batch


def tunix_rollout_fn(cfg, tcfg, actor, prompts_PT: np.ndarray, args):
  from tunix.generate import sampler as tsampler

  t = cfg.text
  sampler = tsampler.Sampler(actor, IdTokenizer(t.vocab_size, cfg.pad_token_id),
                             tsampler.CacheConfig(cache_size=args.prompt_len + args.new_tokens,
                                                  num_layers=t.num_layers, num_kv_heads=t.num_kv_heads,
                                                  head_dim=t.head_dim))
  tok = IdTokenizer(t.vocab_size, cfg.pad_token_id)
  strings = [tok.decode(p) for p in np.repeat(prompts_PT, args.group, axis=0)]   # as its GRPO learner does
  calls = [0]

  def rollout():
    calls[0] += 1
    out = sampler(strings, max_generation_steps=args.new_tokens, max_prompt_length=args.prompt_len, echo=False,
                  temperature=1.0, top_p=1.0, top_k=None, seed=args.seed + calls[0], pad_output=False,
                  eos_tokens=[tok.eos_id()])
    lengths = sorted({len(x) for x in out.tokens})
    if lengths != [args.new_tokens]:
      raise RuntimeError(f'Tunix rollout lengths {lengths} != --new-tokens {args.new_tokens}')
    return out

  return rollout, sampler


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
  """Seconds of each call, the fns taking turns (a load burst on the shared CPU hits both)."""
  import jax
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t0)
  return times


# ----------------------------------------------------------------------------- updates


def update_batch(cfg, ours, prompt_batch, completions_BN: np.ndarray, args) -> dict:
  """The batch both updates get: our prompt layout + completions, old log-probs = the policy's own plus noise
  (so the ratio moves and clips), reference log-probs (adapters off), random rewards."""
  import jax
  from flax import nnx
  from medad_jax.rl import update as U

  B, N = completions_BN.shape
  rng = np.random.default_rng(args.seed + 5)
  batch = {'prompt_ids_PT': prompt_batch.input_ids_PT, 'prompt_mask_PT': prompt_batch.attention_mask_PT,
           'prompt_positions_3PT': prompt_batch.positions_3PT, 'rope_deltas_P': prompt_batch.rope_deltas_P,
           'completion_ids_BN': completions_BN.astype(np.int32), 'completion_mask_BN': np.ones((B, N), np.int32),
           'rewards_B': rng.normal(size=B).astype(np.float32)}
  graphdef, params, frozen = nnx.split(ours, nnx.LoRAParam, ...)
  dev = U.put_batch({**batch, 'old_logp_BN': np.zeros((B, N), np.float32)}, None)
  logp = np.asarray(U.rollout_logprobs(graphdef, params, frozen, dev, group_size=args.group))
  ref = np.asarray(U.rollout_logprobs(graphdef, params, frozen, dev, group_size=args.group, adapters=False))
  batch['old_logp_BN'] = (logp + rng.normal(scale=0.3, size=logp.shape)).astype(np.float32)
  batch['ref_logp_BN'] = ref.astype(np.float32)
  del jax
  return batch


def our_update_fn(ours, tx, args):
  from medad_jax.rl import update as U

  graphdef, state = U.init_train_state(ours, tx)
  step = U.make_congrpo_update(graphdef, tx, U.GRPOConfig(group_size=args.group, beta=args.beta, eps_low=args.eps,
                                                          eps_high=args.eps, ratio_to='old',
                                                          aggregation='seq_mean_token_mean'))
  holder = {'state': state}

  def update(batch):
    holder['state'], met = step(holder['state'], batch)
    return met

  def policy():
    return U.merge_model(graphdef, holder['state'])

  return update, policy


def tunix_example(cfg, batch: dict, args):
  """Tunix's ``TrainExample`` for ``batch`` (prompts repeated G times, advantages R - mean_group(R))."""
  import jax.numpy as jnp
  from tunix.rl.grpo import grpo_learner

  G = args.group
  prompt_ids = np.repeat(np.asarray(batch['prompt_ids_PT']), G, axis=0)
  r = np.asarray(batch['rewards_B'], np.float32).reshape(-1, G)
  adv = (r - r.mean(1, keepdims=True)).reshape(-1)
  comp = np.asarray(batch['completion_ids_BN'])
  return grpo_learner.TrainExample(
      prompt_ids=jnp.asarray(prompt_ids), prompt_mask=jnp.asarray(prompt_ids != cfg.pad_token_id),
      completion_ids=jnp.asarray(comp), completion_mask=jnp.asarray(comp != cfg.pad_token_id),
      ref_per_token_logps=jnp.asarray(batch['ref_logp_BN']),
      advantages=jnp.asarray(adv),
      old_per_token_logps=None if batch.get('old_logp_BN') is None else jnp.asarray(batch['old_logp_BN']))


def tunix_update_fn(cfg, actor, tx, args):
  """Tunix's RL actor trainer with its ``grpo`` policy loss, configured as its ``GRPOLearner`` configures it."""
  from tunix.rl import function_registry
  from tunix.rl import trainer as rl_trainer
  from tunix.rl.grpo import grpo_learner
  from tunix.sft import peft_trainer

  algo = grpo_learner.GRPOConfig(num_generations=args.group, num_iterations=1, beta=args.beta, epsilon=args.eps,
                                 kl_loss_mode='low_var_kl', loss_agg_mode='sequence-mean-token-mean')
  algo.temperature = 1.0
  policy_loss = function_registry.get_policy_loss_fn(algo.policy_loss_fn)
  trainer = rl_trainer.Trainer(actor, tx, peft_trainer.TrainingConfig(eval_every_n_steps=10**9),
                               custom_checkpoint_metadata_fn=lambda: {})
  pad, eos = cfg.pad_token_id, cfg.text.vocab_size
  trainer.with_loss_fn(lambda model, train_example, algo_config: policy_loss(
      model, train_example, algo_config=algo_config, pad_id=pad, eos_id=eos), has_aux=True)
  trainer.with_gen_model_input_fn(lambda x: {'train_example': x, 'algo_config': algo})
  train_step, _ = trainer.jit_train_and_eval_step()

  def update(example):
    loss, aux, gnorm = train_step(example)
    return {'loss': loss, 'grad_norm': gnorm, 'aux': aux}

  return update, trainer


def tunix_ref_logps_fn(cfg, ref):
  """Tunix's reference log-probs, as its inference worker computes them (``rl.common.compute_per_token_logps``)."""
  from flax import nnx
  from tunix.rl import common as tcommon
  graphdef, state = nnx.split(ref)

  def ref_logps(prompt_ids, completion_ids):
    return tcommon.compute_per_token_logps(graphdef, state, prompt_tokens=prompt_ids,
                                           completion_tokens=completion_ids, pad_id=cfg.pad_token_id,
                                           eos_id=cfg.text.vocab_size, stop_gradient=True)

  return ref_logps


# ----------------------------------------------------------------------------- one config


def _best(ts):
  return min(ts)


def bench_config(name: str, cfg: Qwen25VLConfig, args, peak: float) -> dict:
  import jax
  import jax.numpy as jnp
  from medad_jax import plan as PL
  from medad_jax.rl import update as U

  t = cfg.text
  P, G, T, N = args.prompts, args.group, args.prompt_len, args.new_tokens
  B = P * G
  log.info('%s: %.1fM text parameters; building both models', name, text_params(t) / 1e6)
  ours = build_ours(cfg, args)
  tcfg, ref, actor = build_tunix(cfg, ours, args)
  diffs = check_mapping(cfg, ours, ref, actor, args)

  # ---- rollout
  prompts = make_prompts(cfg, args)
  policy = {'model': ours}   # after the first update: the model merged from the update's (donated) state
  ours_roll, prompt_batch = our_rollout_fn(cfg, lambda: policy['model'], prompts, args)
  tunix_roll, _ = tunix_rollout_fn(cfg, tcfg, actor, prompts, args)
  log.info('%s: rollout warm-up (compiles both)', name)
  t0 = time.perf_counter()
  first = ours_roll()
  ours_roll_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  tunix_roll()
  tunix_roll_compile = time.perf_counter() - t0
  log.info('%s: %d timed rollouts each, interleaved', name, args.repeats)
  roll = interleaved({'ours': ours_roll, 'tunix': tunix_roll}, args.repeats)

  # ---- the update alone, on one batch both get
  comp = np.asarray(first.tokens_BN).astype(np.int32)
  comp = np.where(comp == cfg.pad_token_id, 0, comp)   # Tunix masks pad-id tokens out of its completions
  batch = update_batch(cfg, ours, prompt_batch, comp, args)
  tx, _ = U.make_optimizer(args.lr, max_grad_norm=1.0)
  ours_upd, ours_policy = our_update_fn(ours, tx, args)
  tunix_upd, _ = tunix_update_fn(cfg, actor, tx, args)
  dev_batch = U.put_batch(batch, None)
  example = tunix_example(cfg, batch, args)
  log.info('%s: update warm-up (compiles both; first steps compared)', name)
  t0 = time.perf_counter()
  m_o = jax.block_until_ready(ours_upd(dev_batch))
  ours_upd_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  m_t = jax.block_until_ready(tunix_upd(example))
  tunix_upd_compile = time.perf_counter() - t0
  first_loss = (float(m_o['loss']), float(m_t['loss']))
  first_gnorm = (float(m_o['grad_norm']), float(m_t['grad_norm']))
  if (abs(first_loss[0] - first_loss[1]) > LOSS_TOL * max(1.0, abs(first_loss[1]))
      or abs(first_gnorm[0] - first_gnorm[1]) > LOSS_TOL * max(first_gnorm[1], 1e-12) or not first_gnorm[1] > 0):
    raise RuntimeError(f'{name}: first update steps differ: loss ours {first_loss[0]:.7f} vs Tunix '
                       f'{first_loss[1]:.7f}, grad norm ours {first_gnorm[0]:.7g} vs Tunix {first_gnorm[1]:.7g}; '
                       'the two updates do not compute the same step')
  log.info('%s: %d timed updates each, interleaved', name, args.repeats)
  upd = interleaved({'ours': lambda: ours_upd(dev_batch), 'tunix': lambda: tunix_upd(example)}, args.repeats)

  # ---- FLOPs and the table of the two headline measurements (printed before the long whole-step phase)
  f_roll_o = rollout_flops(t, P, G, T, N, shared_prompt=True, lora_rank=args.lora_rank)
  f_roll_t = rollout_flops(t, P, G, T, N, shared_prompt=False, lora_rank=args.lora_rank)
  w = PL.Workload(stage='congrpo', prompts=P, group_size=G, prompt_len=T, completion_len=N, image_patches=0,
                  lora_rank=args.lora_rank, needs_reference=False, dtype='float32', param_dtype='float32')
  f_upd_o = PL.step_flops(cfg, w).update
  full = PL.Workload(stage='sft', prompts=B, group_size=1, prompt_len=T + N, completion_len=0, image_patches=0,
                     lora_rank=args.lora_rank, dtype='float32', param_dtype='float32')
  # Tunix computes logits at every position (T + N per sequence; the sft workload counts T + N - 1): one more
  # head matmul per sequence, forward and (input gradient) backward.
  f_upd_t = PL.step_flops(cfg, full).update + B * 2 * (2 * t.hidden_size * t.vocab_size)
  rb, ub = {k: _best(v) for k, v in roll.items()}, {k: _best(v) for k, v in upd.items()}
  n_tok = B * N
  res = dict(config=name, text_params=text_params(t), prompts=P, group=G, prompt_len=T, new_tokens=N,
             lora_rank=args.lora_rank, repeats=args.repeats, mapping_max_logit_diff=diffs, rollout_s=roll,
             update_s=upd, compile_and_first_s=dict(ours_rollout=ours_roll_compile, tunix_rollout=tunix_roll_compile,
                                                    ours_update=ours_upd_compile, tunix_update=tunix_upd_compile),
             first_loss=dict(ours=first_loss[0], tunix=first_loss[1]),
             first_grad_norm=dict(ours=first_gnorm[0], tunix=first_gnorm[1]),
             model_flops=dict(ours_rollout=f_roll_o, tunix_rollout=f_roll_t, ours_update=f_upd_o,
                              tunix_update=f_upd_t),
             rollout_ratio=rb['tunix'] / rb['ours'], update_ratio=ub['tunix'] / ub['ours'],
             matmul_peak_flops_per_s=peak)
  rows = [
      common.Row('rollout tokens/s', n_tok / rb['ours'], n_tok / rb['tunix'], 'tok/s'),
      common.Row('rollout wall time', rb['ours'], rb['tunix'], 's', higher_is_better=False),
      common.Row('  model FLOPs (fewer is better)', f_roll_o, f_roll_t, 'FLOP', higher_is_better=False),
      common.Row('  achieved FLOP/s', f_roll_o / rb['ours'], f_roll_t / rb['tunix'], 'FLOP/s'),
      common.Row('  fraction of matmul peak', f_roll_o / rb['ours'] / peak, f_roll_t / rb['tunix'] / peak, ''),
      common.Row('  compile + first rollout', ours_roll_compile, tunix_roll_compile, 's', higher_is_better=False),
      common.Row('update alone (s/step)', ub['ours'], ub['tunix'], 's', higher_is_better=False),
      common.Row('  first-step loss', first_loss[0], first_loss[1], ''),
      common.Row('  first-step grad norm', first_gnorm[0], first_gnorm[1], ''),
      common.Row('  model FLOPs (fewer is better)', f_upd_o, f_upd_t, 'FLOP', higher_is_better=False),
      common.Row('  achieved FLOP/s', f_upd_o / ub['ours'], f_upd_t / ub['tunix'], 'FLOP/s'),
      common.Row('  fraction of matmul peak', f_upd_o / ub['ours'] / peak, f_upd_t / ub['tunix'] / peak, ''),
      common.Row('  compile + first update', ours_upd_compile, tunix_upd_compile, 's', higher_is_better=False),
  ]
  title = (f'peers [{name}: {text_params(t) / 1e6:.1f}M text params, LoRA rank {args.lora_rank} on both, fp32] '
           f'{P} prompts x G={G}, prompt {T} tokens, {N} new tokens; best of {args.repeats}, interleaved; '
           f'mapping max |logit diff| {max(diffs.values()):.1e}')
  common.emit(common.format_table(title, rows, peer_name='tunix'))
  if args.whole_step_repeats == 0:
    return res

  # ---- the whole step: rollout + reference log-probs + update
  tunix_ref = tunix_ref_logps_fn(cfg, ref)
  rng = np.random.default_rng(args.seed + 6)
  policy['model'] = None   # ``ours`` shares the buffers the update donated

  def ours_step():
    policy['model'] = ours_policy()   # the sampler runs the current policy, as the trainer does
    r = ours_roll()
    b = U.rollout_batch(prompt_batch, r, rng.normal(size=B).astype(np.float32))
    return ours_upd(U.put_batch(b, None))   # the reference forward runs inside (adapters off)

  def tunix_step():
    out = tunix_roll()
    comp_BN = jnp.asarray(np.stack([np.asarray(x, np.int32) for x in out.tokens]))
    prompt_ids = jnp.asarray(out.padded_prompt_tokens)
    ref_lp = tunix_ref(prompt_ids, comp_BN)
    rw = rng.normal(size=B).astype(np.float32).reshape(P, G)
    ex = tunix_example(cfg, {'prompt_ids_PT': prompts, 'rewards_B': rw.reshape(-1), 'completion_ids_BN': comp_BN,
                             'ref_logp_BN': ref_lp, 'old_logp_BN': None}, args)
    return tunix_upd(ex)   # mu = 1: no old log-probs, Tunix's ratio is to the detached policy (exactly 1)

  log.info('%s: whole-step warm-up', name)
  jax.block_until_ready(ours_step())
  jax.block_until_ready(tunix_step())
  log.info('%s: %d timed whole steps each, interleaved', name, args.whole_step_repeats)
  whole = interleaved({'ours': ours_step, 'tunix': tunix_step}, args.whole_step_repeats)
  f_ref_o = PL.step_flops(cfg, PL.Workload(**{**w.__dict__, 'needs_reference': True})).reference_forward
  f_ref_t = B * common.text_flops(t, T + N, T + N)   # base model, logits at every position
  f_whole_o, f_whole_t = f_roll_o + f_upd_o + f_ref_o, f_roll_t + f_upd_t + f_ref_t
  wb = {k: _best(v) for k, v in whole.items()}
  res.update(whole_step_s=whole, whole_step_ratio=wb['tunix'] / wb['ours'])
  res['model_flops'].update(ours_whole=f_whole_o, tunix_whole=f_whole_t)
  rows = [
      common.Row('whole step (s/step)', wb['ours'], wb['tunix'], 's', higher_is_better=False),
      common.Row('  tokens/s (sampled tokens / step time)', n_tok / wb['ours'], n_tok / wb['tunix'], 'tok/s'),
      common.Row('  model FLOPs (fewer is better)', f_whole_o, f_whole_t, 'FLOP', higher_is_better=False),
      common.Row('  achieved FLOP/s', f_whole_o / wb['ours'], f_whole_t / wb['tunix'], 'FLOP/s'),
      common.Row('  fraction of matmul peak', f_whole_o / wb['ours'] / peak, f_whole_t / wb['tunix'] / peak, ''),
  ]
  common.emit(common.format_table(f'peers [{name}] whole step: rollout + reference log-probs + update, best of '
                                  f'{args.whole_step_repeats}, interleaved', rows, peer_name='tunix'))
  return res


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m medad_jax.bench peers', description=__doc__.split('\n')[0])
  p.add_argument('--configs', default='small', help=f'comma-separated presets from {sorted(PRESETS)} '
                 '(base100m: ~100M text parameters, minutes per config on 2 cores)')
  p.add_argument('--prompts', type=int, default=8, help='P')
  p.add_argument('--group', type=int, default=8, help='G, samples per prompt')
  p.add_argument('--prompt-len', type=int, default=64, help='T, tokens per prompt (one of the sampler buckets)')
  p.add_argument('--new-tokens', type=int, default=64, help='N, tokens sampled per completion')
  p.add_argument('--lora-rank', type=int, default=16)
  p.add_argument('--lora-b-std', type=float, default=0.002,
                 help='std of the initial lora_b (non-zero: the policy differs from the reference)')
  p.add_argument('--lr', type=float, default=1e-4)
  p.add_argument('--beta', type=float, default=0.04)
  p.add_argument('--eps', type=float, default=0.2)
  p.add_argument('--repeats', type=int, default=2,
                 help='timed rollouts and updates per side (best reported)')
  p.add_argument('--whole-step-repeats', type=int, default=1,
                 help='timed whole steps (rollout + reference + update) per side; 0 skips that phase')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--peak-size', type=int, default=2048, help='matrix side of the matmul-peak measurement')
  p.add_argument('--json', default=None, help='also write the results to this JSON file')
  args = p.parse_args(argv)
  if args.whole_step_repeats < 0:
    p.error('--whole-step-repeats must be >= 0')
  for k in ('prompts', 'group', 'prompt_len', 'new_tokens', 'lora_rank', 'repeats'):
    if getattr(args, k) < 1:
      p.error(f'--{k.replace("_", "-")} must be >= 1')
  if args.group < 2:
    p.error('--group must be >= 2 (Tunix\'s GRPO needs at least two generations per prompt)')
  return args


def main(argv: list[str]) -> int:
  common.setup_logging()
  args = parse_args(argv)
  names = [n.strip() for n in args.configs.split(',') if n.strip()]
  unknown = [n for n in names if n not in PRESETS]
  if unknown:
    raise SystemExit(f'--configs: unknown preset(s) {unknown}; choose from {sorted(PRESETS)}')
  _import_tunix()
  import tunix  # noqa: F401
  import importlib.metadata as md
  log.info('measuring the matmul peak')
  peak = common.matmul_peak_flops(args.peak_size)
  common.emit(common.machine_header(peak, args.peak_size) + f'\npeer: google-tunix {md.version("google-tunix")}, '
              f'qwix {md.version("qwix")}')
  results = [bench_config(n, PRESETS[n](), args, peak) for n in names]
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(common.to_jsonable(dict(argv=argv, machine=common.machine_summary(), cpu=common.cpu_flags(),
                                        results=results)), f, indent=2)
  # The summary line: the first config's ratios (the default run has one config; with several, each table has its
  # own and the line reports the first, named in the table above it).
  common.emit(summary_line(results[0]['rollout_ratio'], results[0]['update_ratio']))
  return 0
