"""The README's main-job command (parity demo) runs end to end with the real tokenizer and processor."""

from medad_jax import demo


def test_parity_demo_passes(tmp_path, caplog):
  caplog.set_level('INFO')
  assert demo.main(['--workdir', str(tmp_path), '--max-new-tokens', '8']) == 0
  assert 'PARITY OK' in caplog.text
