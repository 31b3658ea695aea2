"""Small run configs for tests: the embedded miniature (``configs/congrpo.py``) shrunk to seconds."""

from __future__ import annotations


def tiny_miniature(cache_dir: str, *, images: int = 20, variant: str | None = None, **data):
  """The miniature's config with the ``tiny`` architecture, ``images`` synthetic images of 56 px built under
  ``cache_dir``, one read thread, and any other ``config.data`` field given as a keyword; unlocked for more edits."""
  from configs import congrpo
  config = congrpo.get_config(variant)
  config.unlock()
  config.model.preset = 'tiny'
  config.data.synth_images = images
  config.data.image_size = 56
  config.data.read_threads = 1
  config.data.cache_dir = cache_dir
  # The miniature's settings of 2026-12-03, night, which the tests on this config were written against (the default
  # since has 1,500 images at a 0.1 test fraction, 20 + 10 warm-up passes and the lesion tasks twice).
  config.data.test_fraction = 0.15
  config.vision_warmup.epochs, config.vision_warmup.then_epochs = 30, 15
  repeats = 'anomaly_detection=3,lesion_localization=3,pathology_characterization=3'
  config.sft.task_repeats, config.rl.task_repeats = repeats, repeats
  for k, v in data.items():
    config.data[k] = v
  return config
