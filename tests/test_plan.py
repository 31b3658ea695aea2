"""The memory / FLOPs planner: its parameter enumeration against the real module tree, its formulas against the
sampler's and XLA's own numbers, and the CLI."""

import jax
import numpy as np
import pytest
from flax import nnx

from medad_jax import plan as PL
from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.lora import DEFAULT_PATTERN, LoraConfig, apply_lora
from medad_jax.model.qwen25vl import Qwen25VL
from medad_jax.testing.hf import tiny_configs

XLA_TOL = 0.10   # the bound for the planner vs XLA's compiled memory analysis
STATE_TOL = 0.01  # parameters, adapters, optimizer state and batch are counted exactly (scalars aside)


def _real_shapes(cfg, rank=0):
  def build():
    m = Qwen25VL(cfg, rngs=nnx.Rngs(0))
    if rank:
      apply_lora(m, LoraConfig(rank=rank))
    return m
  m = nnx.eval_shape(build)
  return {'/'.join(map(str, p)): (tuple(v.get_value().shape), isinstance(v, nnx.LoRAParam))
          for p, v in nnx.to_flat_state(nnx.state(m))}


@pytest.mark.parametrize('name,rank', [('untied_gqa2_win56', 4), ('tied_gqa4_win112', 0)])
def test_param_shapes_enumerate_the_real_module_tree(name, rank):
  cfg = tiny_configs()[name]
  got = {p: (s, lo) for p, s, lo in PL.param_shapes(cfg, rank, DEFAULT_PATTERN)}
  assert got == _real_shapes(cfg, rank)


def test_param_counts_of_the_3b_preset():
  cfg = Qwen25VLConfig.qwen2_5_vl_3b()
  w = PL.Workload(stage='congrpo', prompts=8, group_size=8, prompt_len=386, completion_len=1024,
                  image_patches=1024, lora_rank=16)
  pc = PL.count_params(cfg, w, PL.MeshShape())
  # Qwen2.5-VL-3B-Instruct: 3,754,622,976 parameters (tied head); LoRA r=16 on the 7 decoder projections:
  # per layer 16 * (2*(2048+2048) + 2*(2048+256) + 3*(2048+11008)) = 831,488, x 36 layers.
  assert pc.frozen == 3_754_622_976
  assert pc.trainable == 36 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 256) + 3 * (2048 + 11008))
  sharded = PL.count_params(cfg, w, PL.MeshShape(fsdp=8))
  # Every decoder / vision matrix divides by 8 except the vision patch embedding's replicated first axis, so the
  # per-device share is a bit above 1/8 (norms and biases are replicated).
  assert pc.frozen / 8 < sharded.frozen_device < pc.frozen / 8 * 1.01


def test_rollout_cache_formula_equals_the_samplers_group_cache():
  from medad_jax.model.text import init_cache
  cfg = Qwen25VLConfig.tiny()
  P, G, T, N = 3, 4, 20, 7
  # The sampler's caches: the prompt's (P rows, T slots, shared) and the samples' own (P*G rows, N slots).
  prefix, own = init_cache(cfg.text, P, T), init_cache(cfg.text, P * G, N)
  kv_bytes = sum(x.nbytes for c in (prefix, own) for k in ('k', 'v') for x in c[k])
  assert PL.rollout_cache_bytes(cfg.text, P, G, T, N, act_bytes=4) == kv_bytes
  naive = 2 * cfg.text.num_layers * P * G * (T + N) * cfg.text.num_kv_heads * cfg.text.head_dim * 4
  assert PL.rollout_cache_bytes(cfg.text, P, G, T, N, act_bytes=4, grouped=False) == naive


def test_flops_split_lora_vs_full_fine_tuning():
  cfg = Qwen25VLConfig.tiny()
  w = PL.Workload(stage='congrpo', prompts=2, group_size=4, prompt_len=32, completion_len=16, image_patches=16,
                  lora_rank=8)
  lora, full = PL.step_flops(cfg, w), PL.step_flops(cfg, PL.Workload(**{**w.__dict__, 'trainable': 'all'}))
  assert full.update_backward == pytest.approx(2 * full.update_forward)
  # A frozen base only needs input gradients: the LoRA backward is between 1x and 2x the forward.
  assert lora.update_forward < lora.update_backward < 2 * lora.update_forward
  assert lora.reference_forward > 0 and lora.rollout > 0
  sft = PL.step_flops(cfg, PL.Workload(**{**w.__dict__, 'stage': 'sft', 'group_size': 1, 'completion_len': 0}))
  assert sft.rollout == 0 and sft.reference_forward == 0


# (stage, mesh, microbatches, prompts, group, prompt_len, completion_len, dtype, remat): LoRA on the tiny preset,
# one image of 4x4 patches per prompt; dtype is the compute and frozen-base dtype (bf16: as the paper runs). The
# conftest gives 8 CPU devices.
XLA_CASES = [
    ('congrpo', 'data=1', 1, 4, 4, 32, 16, 'float32', 'none'),
    ('sft', 'data=1', 1, 4, 1, 48, 0, 'float32', 'none'),
    ('congrpo', 'data=1', 2, 4, 4, 32, 16, 'float32', 'none'),
    ('congrpo', 'data=2,tensor=2', 1, 4, 4, 32, 16, 'float32', 'none'),
    ('congrpo', 'data=1', 1, 4, 4, 32, 16, 'bfloat16', 'none'),
    ('sft', 'data=1', 2, 4, 1, 48, 0, 'float32', 'none'),
    ('sft', 'data=1', 1, 4, 1, 48, 0, 'bfloat16', 'none'),
]


@pytest.mark.parametrize('stage,mesh,k,P,G,T,N,dtype,remat', XLA_CASES)
def test_plan_matches_xla_memory_analysis(stage, mesh, k, P, G, T, N, dtype, remat):
  w = PL.Workload(stage=stage, prompts=P, group_size=G, prompt_len=T, completion_len=N, image_patches=16,
                  lora_rank=8, num_microbatches=k, dtype=dtype, param_dtype=dtype, remat=remat,
                  target_len=16 if stage == 'sft' else 0)
  rows = PL.check_against_xla(Qwen25VLConfig.tiny(), w, PL.parse_mesh(mesh))
  for key, tol in (('argument', STATE_TOL), ('output', STATE_TOL), ('temp', XLA_TOL)):
    planned, xla = rows[key]
    assert abs(planned - xla) <= tol * xla, f'{key}: planned {planned:.0f} B vs XLA {xla:.0f} B'


def test_parse_mesh_and_its_errors():
  assert PL.parse_mesh('data=1,fsdp=8,tensor=1') == PL.MeshShape(1, 8, 1)
  assert PL.parse_mesh('data=-1,tensor=2', devices=8) == PL.MeshShape(4, 1, 2)
  with pytest.raises(ValueError, match="got 'dp=2'"):
    PL.parse_mesh('dp=2')
  with pytest.raises(ValueError, match='give --devices'):
    PL.parse_mesh('data=-1')
  with pytest.raises(ValueError, match='not an integer'):
    PL.parse_mesh('fsdp=x')
  with pytest.raises(ValueError, match='8 devices'):
    PL.parse_mesh('fsdp=8', devices=4)


def test_workload_of_the_paper_config():
  from configs import common
  cfg, w = PL.workload_from_config(common.load('congrpo:paper'))
  assert cfg.text.num_layers == 36 and (w.prompts, w.group_size, w.rollouts) == (8, 8, 64)
  # 448 px -> 32 x 32 patches -> 256 image tokens, + 2 markers + 128 text tokens; completions up to 1024 tokens.
  assert (w.image_patches, w.prompt_len, w.completion_len) == (1024, 386, 1024)
  assert w.trainable == 'lora' and w.dtype == 'bfloat16' and w.needs_reference
  _, s = PL.workload_from_config(common.load('sft:paper'))
  assert s.stage == 'sft' and s.prompts == 64 and s.prompt_len == 386 + 1024


def test_cli_prints_the_plan_and_a_verdict(capsys):
  # The paper's config (remat=full: scanned layers) fits one 80 GB device; without remat it does not, and the
  # search names the config keys of the smallest change that fits.
  assert PL.main(['--config=congrpo:paper', '--mesh=data=1,fsdp=1,tensor=1', '--device', 'h100-80g']) == 0
  out = capsys.readouterr().out
  assert ': FITS' in out and 'rollout KV cache (group layout)' in out and 'FLOPs per optimizer step' in out
  assert PL.main(['--config=congrpo:paper', '--set=model.remat=none', '--device', 'h100-80g', '--fit']) == 0
  out = capsys.readouterr().out
  assert 'DOES NOT FIT' in out
  assert 'smallest change that fits' in out and '--config.model.remat=' in out
  assert PL.main(['--config=congrpo', '--mesh=data=-1', '--devices', '8', '--device', 'v5e']) == 0
  out = capsys.readouterr().out
  assert 'mesh data=8,fsdp=1,tensor=1' in out and ': FITS' in out


def test_peak_is_the_largest_phase():
  cfg = Qwen25VLConfig.qwen2_5_vl_3b()
  w = PL.Workload(stage='congrpo', prompts=8, group_size=8, prompt_len=386, completion_len=1024,
                  image_patches=1024, lora_rank=16, num_microbatches=8, remat='full')
  p = PL.plan(cfg, w, PL.MeshShape())
  assert p.peak == max(p.total('update'), p.total('rollout'), p.total('vision'))
  assert p.activations_remat < p.activations_no_remat
  # The LM head: one chunk of 1024 positions x V fp32 logits, LOGITS_CHUNK_BUFFERS alive (no [rows, V] array).
  head = [t.bytes for t in p.terms if t.name.startswith('LM head')][0]
  assert head == PL.LOGITS_CHUNK_BUFFERS * 1024 * 151936 * 4
  # The frozen base in bf16 (param_dtype), the LoRA adapters and their moments in fp32.
  pb = PL.plan(cfg, PL.Workload(**{**w.__dict__, 'param_dtype': 'bfloat16'}), PL.MeshShape())
  frozen, lora = ([t.bytes for t in pb.terms if t.name.startswith(n)][0] for n in ('parameters, frozen',
                                                                                   'parameters, trainable'))
  assert frozen == 2 * pb.params.frozen and lora == 4 * pb.params.trainable
  assert np.isfinite(p.flops.total) and jax.device_count() == 8


def test_fit_search_orders_by_the_smallest_change():
  assert PL.mesh_shapes(8, kv_heads=2) == [PL.MeshShape(8, 1, 1), PL.MeshShape(4, 2, 1), PL.MeshShape(2, 4, 1),
                                           PL.MeshShape(1, 8, 1), PL.MeshShape(4, 1, 2), PL.MeshShape(2, 2, 2),
                                           PL.MeshShape(1, 4, 2)]
  cfg = Qwen25VLConfig.qwen2_5_vl_3b()
  w = PL.Workload(stage='congrpo', prompts=8, group_size=8, prompt_len=386, completion_len=1024,
                  image_patches=1024, lora_rank=16)
  fits = PL.fit_search(cfg, w, [PL.MeshShape()])
  assert [(f.remat, f.num_microbatches) for f in fits] == [(r, k) for r in PL.FIT_REMAT_ORDER for k in (1, 2, 4, 8)]
  # More microbatches never need more memory; remat never needs more than no remat at the same split.
  peaks = {(f.remat, f.num_microbatches): f.peak for f in fits}
  assert all(peaks[(r, k)] >= peaks[(r, 2 * k)] for r in PL.REMAT for k in (1, 2, 4))
  assert all(peaks[('full', k)] <= peaks[('none', k)] for k in (1, 2, 4, 8))


def test_remat_scans_the_layers_so_a_layer_keeps_little():
  """With remat the decoder layers run as a ``lax.scan`` with a checkpointed body (``model/text.py``): what XLA keeps
  per extra decoder layer (compiled temp bytes with L+1 minus L layers) is a small fraction of what an extra layer
  costs without remat. (Unrolled, XLA:CPU kept 0.86-0.99 of it.)"""
  cfg = Qwen25VLConfig.tiny()
  per_layer = {}
  for remat in ('none', 'full'):
    w = PL.Workload(stage='congrpo', prompts=4, group_size=4, prompt_len=32, completion_len=16, image_patches=16,
                    lora_rank=8, dtype='bfloat16', param_dtype='bfloat16', remat=remat)
    per_layer[remat] = PL.measure_layer(cfg, w)['xla']
  assert per_layer['none'] > 0 and per_layer['full'] < 0.25 * per_layer['none'], per_layer


@pytest.mark.parametrize('k', [1, 2])
def test_lm_head_buffers_are_what_xla_adds_per_vocab(k):
  """``LOGITS_CHUNK_BUFFERS``: the temp bytes XLA adds to the tiny SFT step when the vocabulary doubles, in units
  of one ``[chunk, V]`` fp32 buffer, equal the planner's count (within 10 %)."""
  import dataclasses
  w = PL.Workload(stage='sft', prompts=4, group_size=1, prompt_len=48, completion_len=0, image_patches=16,
                  lora_rank=8, num_microbatches=k, dtype='float32', param_dtype='float32', remat='none', target_len=16)
  base = Qwen25VLConfig.tiny()
  temp, head = [], []
  for V in (512, 1024):
    cfg = base.replace(text=dataclasses.replace(base.text, vocab_size=V))
    temp.append(PL.compiled_memory(cfg, w)['temp'])
    head.append([t.bytes for t in PL.plan(cfg, w, PL.MeshShape()).terms if t.name.startswith('LM head')][0])
  per_buffer = (head[1] - head[0]) / PL.LOGITS_CHUNK_BUFFERS
  measured = (temp[1] - temp[0]) / per_buffer
  assert abs(measured - PL.LOGITS_CHUNK_BUFFERS) <= 0.1 * PL.LOGITS_CHUNK_BUFFERS, measured
