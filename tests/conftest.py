import os

# Tests see 8 fake CPU devices so sharding tests can build a (data, fsdp, tensor) mesh. Set before jax import.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
# Under pytest-xdist (the README's `-n 2`) each worker builds medad-synth and its tokenizers in a cache of its own:
# two workers never write one TFDS build or tokenizer file at the same time.
if os.environ.get('PYTEST_XDIST_WORKER'):
  import tempfile
  os.environ.setdefault('MEDAD_JAX_CACHE', os.path.join(tempfile.gettempdir(),
                                                        f'medad_jax_test_cache_{os.environ["PYTEST_XDIST_WORKER"]}'))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(scope='session')
def tiny_hf_checkpoints(tmp_path_factory):
  """{name: (cfg, checkpoint_dir, torch_model)} for the two parity configs, written once per session."""
  from medad_jax.testing.hf import save_hf_checkpoint, tiny_configs
  out = {}
  root = tmp_path_factory.mktemp('hf_ckpts')
  for i, (name, cfg) in enumerate(tiny_configs().items()):
    path = str(root / name)
    model = save_hf_checkpoint(cfg, path, seed=i)
    out[name] = (cfg, path, model)
  return out
