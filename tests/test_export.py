"""The training steps lower for accelerators from this CPU host (``jax.export``): TPU, and CUDA with the XLA
attention; cuDNN attention needs a CUDA plugin to trace, so that one check runs only where one is installed."""

import dataclasses
import importlib.util

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from medad_jax.model.config import Qwen25VLConfig
from medad_jax.model.lora import LoraConfig, apply_lora
from medad_jax.model.qwen25vl import Qwen25VL
from medad_jax.plan import rollout_batch
from medad_jax.rl import update as U

HAS_CUDA_PLUGIN = any(importlib.util.find_spec(m) is not None for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin'))


def _exported(platform: str, attention: str = 'xla', dtype: str = 'float32'):
  base = Qwen25VLConfig.tiny()
  cfg = base.replace(attention=attention, dtype=dtype, remat='full',
                     text=dataclasses.replace(base.text, num_layers=2),
                     vision=dataclasses.replace(base.vision, depth=1, fullatt_block_indexes=(0,)))
  model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  apply_lora(model, LoraConfig(rank=4, alpha=8.0))
  graphdef, state = U.init_train_state(model, optax.adamw(1e-4))
  batch = rollout_batch(cfg, 2, 4, 24, 8, 4)
  step = U.make_congrpo_update(graphdef, optax.adamw(1e-4), U.GRPOConfig(group_size=4, logits_chunk=8,
                                                                         num_microbatches=2))
  abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), t)  # noqa: E731
  return step.export(abstract(state), abstract(U.put_batch(batch, None)), platforms=(platform,))


@pytest.mark.parametrize('platform', ['tpu', 'cuda'])
def test_update_exports_for_accelerators_with_xla_attention(platform):
  exp = _exported(platform)
  assert exp.platforms == (platform,)
  assert 'stablehlo' in exp.mlir_module() or 'func.func' in exp.mlir_module()


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason='tracing cuDNN attention needs a JAX CUDA plugin '
                    '(jax-cuda12-plugin / jax-cuda13-plugin); none is installed on this CPU machine')
def test_update_exports_for_cuda_with_cudnn_attention():
  exp = _exported('cuda', attention='cudnn', dtype='bfloat16')
  assert 'cudnn' in exp.mlir_module() or 'custom_call' in exp.mlir_module()
