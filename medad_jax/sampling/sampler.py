"""The compiled rollout sampler: one jitted prefill per prompt batch, one jitted ``lax.while_loop`` decode.

Axis letters: see ``ops.py`` (P prompts, G samples per prompt, B = P*G rows, T prompt bucket, N max new tokens).

Flow of :func:`sample` for ``P`` prompts and ``G`` samples each (Con-GRPO's group)::

    prefill  (jit)  P prompts -> vision tower (per image) + decoder, once -> cache_P [P, T], logits_PV (last token)
    decode   (jit)  B = P*G rows share their prompt's cache (the decoder's ``prefix``: prompt keys/values are
                    stored and read once per prompt, each sample adds its own completion slots); draw token 0 from the
                    prefill logits, then while step < N and not all rows done:
                      feed the last token (completion slot step - 1), draw token ``step`` from its logits

Each prompt's image and text are encoded once, whatever ``G`` is, and decode steps read each prompt's cache once
rather than G times. Row ``b = p*G + g`` is sample ``g`` of prompt
``p``; its PRNG stream is ``fold_in(fold_in(key, b), step)``, so a row's tokens depend only on ``key``, its row id
and its own logits, never on batch layout, padding rows or the mesh.

State (:class:`DecodeState`, gemma ``_sampler_loop.py`` style): a fixed token buffer ``[B, N]``, the KV cache (its
write index is ``step - 1``), a ``done`` mask, per-row keys, and the log-probs of every sampled token under the
unmodified policy (GRPO's old-policy log-probs) and under the sampling distribution.

Stopping: a row is done when it samples a ``stop_token_ids`` token, when its last tokens match a stop *token
pattern* (each step pushes the token into a window of the last ``M`` tokens per row and compares the window's
tail with every pattern, on device), when its text completes a stop *string* such as ``</answer>`` in any
tokenisation (a per-row automaton state advanced by one table gather per step, see ``stops.py``), or after ``N``
tokens. The token that stops a row is part of its completion (mask 1, log-probs kept); later slots hold the pad
token with mask 0 and log-prob 0. Rows can also start done (``done_P``: padding prompts): reason ``'masked'``.

Sampling itself (``ops.py``) is an inverse-CDF draw with one uniform per row, not a Gumbel-max over the
vocabulary: for 64 rows x 151,936 tokens that is ~5 ms instead of ~300 ms per step on a 2-core CPU.

Static: sampling settings (:class:`~medad_jax.sampling.ops.SamplingConfig`), ``G``, the model's graph and whether
LoRA adapters are applied. Arrays: parameters and the batch, so new weights and new batches in the same buckets
reuse the compiled programs (``trace_counts()`` counts traces, to check that).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medad_jax.model.layers import lora_disabled
from medad_jax.model.qwen25vl import continuation_positions
from medad_jax.sampling import ops, stops
from medad_jax.sampling.prompts import PromptBatch

_TRACES: collections.Counter = collections.Counter()


def trace_counts() -> dict[str, int]:
  """How many times ``prefill`` / ``decode`` have been traced (= compiled) in this process."""
  return dict(_TRACES)


def _adapters(on: bool):
  # LoRA is switched at trace time (layers.lora_disabled), hence a static argument of the jitted functions.
  return contextlib.nullcontext() if on else lora_disabled()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """The ``while_loop`` carry. ``step`` tokens have been sampled; the last one goes to completion slot ``step - 1``
  when it is fed."""

  step: jax.Array               # int32 scalar
  tokens_BN: jax.Array          # int32; pad after a row is done
  policy_logp_BN: jax.Array     # float32 log-prob under the unmodified policy (0 where masked)
  sample_logp_BN: jax.Array     # float32 log-prob under the sampling distribution (0 where masked)
  done_B: jax.Array             # bool
  length_B: jax.Array           # int32 completion length (stop token included)
  finish_B: jax.Array           # int32 code, see ops.FINISH_REASONS
  tail_BM: jax.Array            # int32 last M sampled tokens (-1 before the first), for stop sequences
  stop_state_BQ: jax.Array      # int32 state of each stop-string automaton (stops.py)
  cache: dict                   # the samples' own completion slots (text.py cache, B rows, N slots); the prompt
                                # cache is shared read-only by every step (the ``prefix`` of text.py)
  keys_B: jax.Array             # per-row PRNG keys


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
  """Sampler output for ``B = P*G`` rows (row ``p*G + g`` = sample ``g`` of prompt ``p``), device arrays."""

  tokens_BN: jax.Array              # int32 completion tokens, pad token after the end
  completion_mask_BN: jax.Array     # bool, True for the ``lengths_B`` completion tokens
  lengths_B: jax.Array              # int32
  finish_reason_B: jax.Array        # int32 code; ops.FINISH_REASONS[code] is the name
  policy_logprobs_BN: jax.Array     # float32 log pi(token) at temperature 1, no top-k/p (0 where masked)
  sampling_logprobs_BN: jax.Array   # float32 log q(token) of the distribution sampled from (0 where masked)
  prompt_index_B: jax.Array         # int32 ``b // G``
  num_steps: jax.Array              # int32 scalar: decode steps run (< N when every row stopped early)

  def finish_reasons(self) -> list[str]:
    return [ops.FINISH_REASONS[int(c)] for c in np.asarray(self.finish_reason_B)]


# ----------------------------------------------------------------------------- prefill


def embed_prompts(model, input_ids_PT: jax.Array, pixel_values_ILC: jax.Array | None, vision_meta_I,
                  image_src_PT: jax.Array) -> jax.Array:
  """Token embeddings with image features in place of ``<|image_pad|>`` tokens -> ``x_PTD`` (``Qwen25VL.embed_per_image``)."""
  return model.embed_per_image(input_ids_PT, pixel_values_ILC, vision_meta_I, image_src_PT)


def decode_step(model, tokens_B: jax.Array, slot: jax.Array, rope_deltas_B: jax.Array, prefix: dict,
                cache: dict) -> tuple[jax.Array, dict]:
  """Feeds one token per row (completion slot ``slot``, position ``T + slot + delta``) -> ``(logits_BV, cache)``.

  ``prefix``: the prompts' cache from :func:`prefill` (``P`` rows, shared by their ``G`` samples, never copied);
  ``cache``: the samples' own completion slots (``B`` rows, ``N`` slots). The decoder layer is the model's own.
  """
  text = model.model
  T = prefix['mask'].shape[1]
  B = tokens_B.shape[0]
  x_B1D = text.embed_tokens(tokens_B[:, None])
  h_B1D, cache = text(x_B1D, attention_mask_BT=jnp.ones((B, 1), jnp.int32),
                      positions_3BT=continuation_positions(T + slot, rope_deltas_B), cache=cache,
                      cache_index=slot, prefix=prefix)
  return model.logits(h_B1D)[:, 0], cache


@functools.partial(jax.jit, static_argnames=('graphdef', 'adapters'))
def prefill(graphdef: nnx.GraphDef, state: nnx.State, input_ids_PT: jax.Array, attention_mask_PT: jax.Array,
            positions_3PT: jax.Array, pixel_values_ILC: jax.Array | None, vision_meta_I, image_src_PT: jax.Array, *,
            adapters: bool = True) -> tuple[dict, jax.Array]:
  """Encodes ``P`` prompts once -> ``(cache_P of T slots (text.py layout), next-token logits_PV float32)``.

  Arguments are the fields of a :class:`~medad_jax.sampling.prompts.PromptBatch`. Only the last position goes
  through the LM head (left padding puts every prompt's last token there).
  """
  _TRACES['prefill'] += 1
  model = nnx.merge(graphdef, state)
  P, T = input_ids_PT.shape
  with _adapters(adapters):
    x_PTD = embed_prompts(model, input_ids_PT, pixel_values_ILC, vision_meta_I, image_src_PT)
    h_PTD, cache = model.model(x_PTD, attention_mask_BT=attention_mask_PT, positions_3BT=positions_3PT,
                               return_kv=True)
    logits_PV = model.logits(h_PTD[:, -1:])[:, 0]
  return cache, logits_PV


# ----------------------------------------------------------------------------- decode


def _record(s: DecodeState, logits_BV: jax.Array, cfg: ops.SamplingConfig, pad_id: int,
            stop_table_QAV: jax.Array | None) -> DecodeState:
  """Draws token ``s.step`` for every row from ``logits_BV`` and books it (tokens, log-probs, stops)."""
  tok_B, plp_B, slp_B = ops.draw(ops.step_keys(s.keys_B, s.step), logits_BV, cfg)
  active_B = ~s.done_B
  tok_B = jnp.where(active_B, tok_B, pad_id)
  plp_B = jnp.where(active_B, plp_B, 0.0)
  slp_B = jnp.where(active_B, slp_B, 0.0)
  put = lambda buf, col: jax.lax.dynamic_update_slice(buf, col[:, None].astype(buf.dtype), (0, s.step))  # noqa: E731
  tail_BM = ops.push_tail(s.tail_BM, tok_B)
  stop_state_BQ, string_hit_B = stops.advance(stop_table_QAV, s.stop_state_BQ, tok_B)
  stop_tok_B = active_B & ops.is_stop_token(tok_B, cfg.stop_token_ids)
  stop_seq_B = active_B & ~stop_tok_B & ops.stop_sequence_hit(tail_BM, cfg.stop_sequences)
  stop_str_B = active_B & ~stop_tok_B & ~stop_seq_B & string_hit_B
  finish_B = jnp.select([stop_tok_B, stop_seq_B, stop_str_B],
                        [ops.FINISH_STOP_TOKEN, ops.FINISH_STOP_SEQUENCE, ops.FINISH_STOP_STRING], s.finish_B)
  return dataclasses.replace(
      s, step=s.step + 1, tokens_BN=put(s.tokens_BN, tok_B), policy_logp_BN=put(s.policy_logp_BN, plp_B),
      sample_logp_BN=put(s.sample_logp_BN, slp_B), done_B=s.done_B | stop_tok_B | stop_seq_B | stop_str_B,
      length_B=s.length_B + active_B.astype(jnp.int32), finish_B=finish_B.astype(jnp.int32), tail_BM=tail_BM,
      stop_state_BQ=stop_state_BQ)


@functools.partial(jax.jit, static_argnames=('graphdef', 'config', 'num_samples', 'adapters'))
def decode(graphdef: nnx.GraphDef, state: nnx.State, cache_P: dict, logits_PV: jax.Array, rope_deltas_P: jax.Array,
           done_P: jax.Array, key: jax.Array, stop_table_QAV: jax.Array | None = None, *,
           config: ops.SamplingConfig, num_samples: int, adapters: bool = True) -> Rollout:
  """``G = num_samples`` completions per prefilled prompt, sharing the prompt's cache (see the module docstring).

  ``cache_P``: the prompts' cache from :func:`prefill` (``T`` slots).
  ``stop_table_QAV``: optional stop-string automata (``stops.py``); an array, so new strings do not recompile.
  """
  _TRACES['decode'] += 1
  model = nnx.merge(graphdef, state)
  cfg_model = model.cfg
  G, N = num_samples, config.max_new_tokens
  P = logits_PV.shape[0]
  B = P * G
  cache = model.init_cache(B, N)
  rep = lambda x: jnp.repeat(x, G, axis=0)  # noqa: E731
  deltas_B, done_B = rep(rope_deltas_P.astype(jnp.int32)), rep(done_P.astype(bool))
  s = DecodeState(
      step=jnp.int32(0), tokens_BN=jnp.full((B, N), cfg_model.pad_token_id, jnp.int32),
      policy_logp_BN=jnp.zeros((B, N), jnp.float32), sample_logp_BN=jnp.zeros((B, N), jnp.float32),
      done_B=done_B, length_B=jnp.zeros((B,), jnp.int32),
      finish_B=jnp.where(done_B, ops.FINISH_MASKED, ops.FINISH_LENGTH).astype(jnp.int32),
      tail_BM=jnp.full((B, config.stop_window), -1, jnp.int32), stop_state_BQ=stops.init_states(B, stop_table_QAV),
      cache=cache, keys_B=ops.row_keys(key, jnp.arange(B, dtype=jnp.int32)))
  s = _record(s, rep(logits_PV), config, cfg_model.pad_token_id, stop_table_QAV)

  def cond(s: DecodeState) -> jax.Array:
    return (s.step < N) & ~jnp.all(s.done_B)

  def body(s: DecodeState) -> DecodeState:
    last_B = jax.lax.dynamic_index_in_dim(s.tokens_BN, s.step - 1, axis=1, keepdims=False)
    last_B = jnp.where(s.done_B, 0, last_B)  # a done row only attends to itself; feed an id that is always in range
    with _adapters(adapters):
      logits_BV, cache = decode_step(model, last_B, s.step - 1, deltas_B, cache_P, s.cache)
    return _record(dataclasses.replace(s, cache=cache), logits_BV, config, cfg_model.pad_token_id, stop_table_QAV)

  s = jax.lax.while_loop(cond, body, s)
  return Rollout(tokens_BN=s.tokens_BN, completion_mask_BN=jnp.arange(N)[None, :] < s.length_B[:, None],
                 lengths_B=s.length_B, finish_reason_B=s.finish_B, policy_logprobs_BN=s.policy_logp_BN,
                 sampling_logprobs_BN=s.sample_logp_BN, prompt_index_B=jnp.arange(B, dtype=jnp.int32) // G,
                 num_steps=s.step)


# ----------------------------------------------------------------------------- entry point


def _place(batch: PromptBatch, mesh) -> PromptBatch:
  """Batch arrays -> device; with a mesh, prompts and images are split over (data, fsdp) (positions on dim 1)."""
  if mesh is None:
    return jax.device_put(batch)  # one transfer call for every leaf
  from medad_jax.sharding import shard_batch
  flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
  names = [jax.tree_util.keystr(p) for p, _ in flat]
  placed = shard_batch(dict(zip(names, (v for _, v in flat))), mesh,
                       {n: 1 for n in names if 'positions_3PT' in n})
  return jax.tree_util.tree_unflatten(treedef, [placed[n] for n in names])


def sample(model: nnx.Module, batch: PromptBatch, *, key: jax.Array, config: ops.SamplingConfig,
           num_samples: int = 8, adapters: bool = True, mesh=None, stop_table=None) -> Rollout:
  """``num_samples`` completions for each prompt of ``batch`` (see the module docstring).

  Args:
    model: a :class:`~medad_jax.model.qwen25vl.Qwen25VL` (LoRA adapters, sharded parameters: all fine).
    batch: from :func:`medad_jax.sampling.prompts.prepare_prompts`.
    key: a PRNG key; the same key, batch and settings give the same rollout.
    config: static sampling settings.
    num_samples: ``G``, completions per prompt.
    adapters: False runs the base model (LoRA adapters skipped), e.g. the reference policy.
    mesh: optional ``(data, fsdp, tensor)`` mesh; prompt rows are split over data x fsdp.
    stop_table: optional ``[Q, A, V]`` stop-string automata (``stops.tokenizer_stop_table``).
  """
  if num_samples < 1:
    raise ValueError(f'num_samples={num_samples}: expected >= 1')
  graphdef, state = nnx.split(model)
  b = _place(batch, mesh)
  cache_P, logits_PV = prefill(graphdef, state, b.input_ids_PT, b.attention_mask_PT, b.positions_3PT,
                               b.pixel_values_ILC, b.vision_meta_I, b.image_src_PT, adapters=adapters)
  table = None
  if stop_table is not None:
    V = model.cfg.text.vocab_size
    if np.ndim(stop_table) != 3 or np.shape(stop_table)[2] != V:
      raise ValueError(f'stop_table has shape {np.shape(stop_table)}; expected [strings, states, {V}] (the model '
                       'vocabulary: stops.tokenizer_stop_table(tokenizer, strings, cfg.text.vocab_size))')
    table = jnp.asarray(stop_table, jnp.int32)
  return decode(graphdef, state, cache_P, logits_PV, b.rope_deltas_P, b.done_P, key, table, config=config,
                num_samples=num_samples, adapters=adapters)
