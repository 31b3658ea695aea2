"""Qwen25VLProcessor against transformers' own Qwen2_5_VLProcessor, loss masks and bucketed batching."""

import numpy as np
import pytest
from PIL import Image

from medad_jax import processor as P
from medad_jax import tokenizer as T
from medad_jax.model.config import Qwen25VLConfig

QUESTION = 'Is there an anomaly in this image? 请说明。'
TARGET = ('<think>The left lower lobe shows a wedge-shaped opacity, 3 cm wide.</think>'
          '<answer>pneumonia</answer>')

# (height, width, PIL mode): upscaled tiny, odd sizes, extreme aspect ratios, a larger image and non-RGB modes.
IMAGES = [(100, 150, 'RGB'), (28, 28, 'RGB'), (37, 301, 'RGB'), (480, 640, 'RGB'), (13, 2000, 'RGB'),
          (300, 200, 'L'), (64, 96, 'RGBA'), (90, 90, 'P'), (57, 1, 'RGB')]


def make_image(h, w, mode='RGB', seed=0):
  rng = np.random.RandomState(seed + h * 7 + w)
  if mode == 'L':
    return Image.fromarray(rng.randint(0, 256, (h, w), dtype=np.uint8), mode='L')
  if mode == 'RGBA':
    return Image.fromarray(rng.randint(0, 256, (h, w, 4), dtype=np.uint8), mode='RGBA')
  img = Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))
  return img.convert('P') if mode == 'P' else img


def user_turn(question):
  return [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': question}]}]


@pytest.fixture(scope='module')
def qwen_tok():
  return T.qwen2_tokenizer()


@pytest.fixture(scope='module')
def vision_cfg():
  return Qwen25VLConfig.qwen2_5_vl_3b().vision


@pytest.fixture(scope='module')
def proc(qwen_tok, vision_cfg):
  return P.Qwen25VLProcessor(qwen_tok, vision_cfg)


def hf_reference(tok, min_pixels=P.DEFAULT_MIN_PIXELS, max_pixels=P.DEFAULT_MAX_PIXELS):
  """transformers' Qwen2_5_VLProcessor, built offline from our tokenizer and its PIL image processor.

  Its video processor needs torchvision (not installed): the class check for that one slot is skipped, so the
  processor runs image + text exactly as in transformers.
  """
  from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

  class ImageOnlyQwen25VLProcessor(Qwen2_5_VLProcessor):

    def check_argument_for_proper_class(self, argument_name, argument):
      if argument_name == 'video_processor' and argument is None:
        return None
      return super().check_argument_for_proper_class(argument_name, argument)

  image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
  return ImageOnlyQwen25VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None,
                                    chat_template=T.QWEN2_VL_CHAT_TEMPLATE)


@pytest.fixture(scope='module')
def ref(qwen_tok):
  return hf_reference(qwen_tok)


def run_reference(ref, image, messages, generation):
  text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
  out = ref(images=[image], text=[text], return_tensors='np')
  return {k: np.asarray(v) for k, v in out.items()}


def assert_same_as_reference(ours, theirs):
  np.testing.assert_array_equal(ours['input_ids'], theirs['input_ids'][0])
  np.testing.assert_array_equal(ours['attention_mask'], theirs['attention_mask'][0])
  np.testing.assert_array_equal(ours['mm_token_type_ids'], theirs['mm_token_type_ids'][0])
  np.testing.assert_array_equal(ours['image_grid_thw'], theirs['image_grid_thw'])
  assert ours['pixel_values'].dtype == np.float32
  np.testing.assert_allclose(ours['pixel_values'], theirs['pixel_values'], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ parity with HF


@pytest.mark.parametrize('h,w,mode', IMAGES)
def test_prompt_matches_transformers(proc, ref, h, w, mode, vision_cfg):
  image = make_image(h, w, mode)
  ours = proc(image, QUESTION)
  assert_same_as_reference(ours, run_reference(ref, image, user_turn(QUESTION), generation=True))

  L = ours['pixel_values'].shape[0]
  t, gh, gw = ours['image_grid_thw'][0]
  assert (t, L, ours['pixel_values'].shape[1]) == (1, gh * gw, vision_cfg.patch_dim)
  # Resized sides are multiples of patch*merge = 28 and within the pixel budget.
  assert gh % 2 == 0 and gw % 2 == 0 and P.DEFAULT_MIN_PIXELS <= gh * gw * 14 * 14 <= P.DEFAULT_MAX_PIXELS
  ids = ours['input_ids']
  pads = np.flatnonzero(ids == proc.image_token_id)
  assert len(pads) == L // 4 and np.all(np.diff(pads) == 1)
  assert ids[pads[0] - 1] == proc.vision_start_token_id and ids[pads[-1] + 1] == proc.vision_end_token_id
  np.testing.assert_array_equal(ours['mm_token_type_ids'], (ids == proc.image_token_id).astype(np.int32))
  assert proc.tokenizer.decode(ids[-3:]) == '<|im_start|>assistant\n'


@pytest.mark.parametrize('h,w,mode', IMAGES[:4])
def test_training_example_matches_transformers_and_masks_only_the_target(proc, ref, qwen_tok, h, w, mode):
  image = make_image(h, w, mode)
  ours = proc(image, QUESTION, TARGET)
  full = user_turn(QUESTION) + [{'role': 'assistant', 'content': [{'type': 'text', 'text': TARGET}]}]
  assert_same_as_reference({k: v for k, v in ours.items() if k != 'loss_mask'},
                           run_reference(ref, image, full, generation=False))

  ids, mask = ours['input_ids'], ours['loss_mask']
  prompt_len = len(proc(image, QUESTION)['input_ids'])
  n_target = len(qwen_tok.encode(TARGET, add_special_tokens=False))
  want = np.zeros_like(mask)
  want[prompt_len:prompt_len + n_target + 1] = 1  # the target, then <|im_end|>; the final "\n" is not trained
  np.testing.assert_array_equal(mask, want)
  assert len(ids) == prompt_len + n_target + 2
  assert qwen_tok.decode(ids[mask == 1]) == TARGET + '<|im_end|>'
  assert not np.any(mask[ours['mm_token_type_ids'] == 1])


def test_target_whose_first_token_merges_with_the_template_newline(proc, ref, qwen_tok):
  """A target starting with a newline fuses with the template's "\\n" into one token: that token is trained."""
  image, target = make_image(56, 84), '\n' + TARGET
  ours = proc(image, QUESTION, target)
  full = user_turn(QUESTION) + [{'role': 'assistant', 'content': [{'type': 'text', 'text': target}]}]
  np.testing.assert_array_equal(ours['input_ids'], run_reference(ref, image, full, generation=False)['input_ids'][0])
  assert qwen_tok.decode(ours['input_ids'][ours['loss_mask'] == 1]) == '\n' + target + '<|im_end|>'


def test_system_prompt_and_pixel_bounds_match_transformers(qwen_tok, vision_cfg):
  system = 'You are a radiologist. Think in <think></think>, answer in <answer></answer>.'
  min_px, max_px = 128 * 28 * 28, 256 * 28 * 28
  proc = P.Qwen25VLProcessor(qwen_tok, vision_cfg, min_pixels=min_px, max_pixels=max_px, system_prompt=system)
  ref = hf_reference(qwen_tok, min_pixels=min_px, max_pixels=max_px)
  msgs = [{'role': 'system', 'content': system}] + user_turn(QUESTION)
  for h, w in [(50, 60), (1000, 700), (224, 224)]:
    image = make_image(h, w)
    ours = proc(image, QUESTION)
    assert_same_as_reference(ours, run_reference(ref, image, msgs, generation=True))
    assert min_px <= ours['pixel_values'].shape[0] * 14 * 14 <= max_px


def test_render_prompt_is_the_chat_template(qwen_tok):
  for system in (None, 'Be brief.'):
    msgs = ([] if system is None else [{'role': 'system', 'content': system}]) + [
        {'role': 'user', 'content': [{'type': 'image'}, {'type': 'image'}, {'type': 'text', 'text': QUESTION}]}]
    assert P.render_prompt(QUESTION, system, num_images=2) == qwen_tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)
    full = msgs + [{'role': 'assistant', 'content': TARGET}]
    assert (P.render_prompt(QUESTION, system, num_images=2) + P.render_target(TARGET) ==
            qwen_tok.apply_chat_template(full, tokenize=False))


def test_expand_image_pads():
  text = P.render_prompt('q', num_images=2)
  out = P.expand_image_pads(text, [3, 1])
  assert out.count(P.IMAGE_PAD) == 4
  assert '<|vision_start|>' + P.IMAGE_PAD * 3 + '<|vision_end|><|vision_start|>' + P.IMAGE_PAD + '<|vision_end|>q' in out
  with pytest.raises(ValueError, match='2 <\\|image_pad\\|> placeholders but 1 images'):
    P.expand_image_pads(text, [3])


# ------------------------------------------------------------------------------------------ images


def test_high_bit_depth_images_are_scaled_to_8_bit(proc):
  a16 = (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 17 + 1000)
  img16 = Image.fromarray(a16)
  assert img16.mode.startswith('I;16')
  scaled = np.round((a16 - a16.min()) * (255.0 / (a16.max() - a16.min()))).astype(np.uint8)
  np.testing.assert_array_equal(proc(img16, 'q')['pixel_values'], proc(Image.fromarray(scaled), 'q')['pixel_values'])
  flat = Image.fromarray(np.full((40, 50), 5000, np.uint16))
  np.testing.assert_array_equal(proc(flat, 'q')['pixel_values'],
                                proc(Image.fromarray(np.zeros((40, 50), np.uint8)), 'q')['pixel_values'])


def test_numpy_images_equal_pil(proc):
  a = np.random.RandomState(1).randint(0, 256, (60, 80, 3), dtype=np.uint8)
  np.testing.assert_array_equal(proc(a, 'q')['pixel_values'], proc(Image.fromarray(a), 'q')['pixel_values'])
  g = a[..., :1]
  np.testing.assert_array_equal(proc(g, 'q')['pixel_values'], proc(Image.fromarray(g[..., 0]), 'q')['pixel_values'])


def test_bad_inputs_raise_clear_errors(proc, qwen_tok, vision_cfg):
  with pytest.raises(ValueError, match=r'zero-size image \(0x5 pixels\)'):
    proc(Image.new('RGB', (0, 5)), 'q')
  with pytest.raises(ValueError, match=r'aspect ratio 250.0 of a 2500x10 image exceeds the Qwen2-VL limit of 200'):
    proc(Image.new('RGB', (2500, 10)), 'q')
  with pytest.raises(TypeError, match='expected a PIL.Image.Image or a uint8 numpy array, got str'):
    proc('scan.png', 'q')
  with pytest.raises(ValueError, match=r'uint8 \[H, W\] or \[H, W, 1\|3\|4\], got float32'):
    proc(np.zeros((10, 10, 3), np.float32), 'q')
  with pytest.raises(ValueError, match=r"question contains the control token '<\|im_end\|>'"):
    proc(make_image(30, 30), 'q<|im_end|>')
  with pytest.raises(ValueError, match=r"target contains the control token '<\|im_start\|>'"):
    proc(make_image(30, 30), 'q', '<|im_start|>assistant')
  with pytest.raises(TypeError, match='question must be a str, got NoneType'):
    proc(make_image(30, 30), None)
  with pytest.raises(ValueError, match=r"system_prompt contains the control token '<\|im_start\|>'"):
    P.Qwen25VLProcessor(qwen_tok, vision_cfg, system_prompt='x<|im_start|>')
  with pytest.raises(ValueError, match='min_pixels <= max_pixels'):
    P.Qwen25VLProcessor(qwen_tok, vision_cfg, min_pixels=5000, max_pixels=4000)
  from tokenizers import Tokenizer, models
  from transformers import PreTrainedTokenizerFast
  bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={'a': 0}, merges=[])))
  with pytest.raises(KeyError, match=r"no token '<\|image_pad\|>'"):
    P.Qwen25VLProcessor(bare, vision_cfg)


# ------------------------------------------------------------------------------------------ batching


def test_training_batch_right_pads_to_the_smallest_bucket(proc):
  images = [make_image(56, 56), make_image(100, 150), make_image(30, 90)]
  targets = [TARGET, '<think>ok</think><answer>normal</answer>', TARGET + ' more']
  exs = [proc(im, QUESTION, t) for im, t in zip(images, targets)]
  lengths = [len(e['input_ids']) for e in exs]
  buckets = (16, max(lengths) - 1, max(lengths) + 5, 4096)
  batch = proc.batch(exs, buckets)
  B, T = batch['input_ids'].shape
  assert (B, T) == (3, max(lengths) + 5)
  for k in ('input_ids', 'attention_mask', 'mm_token_type_ids', 'loss_mask'):
    assert batch[k].shape == (B, T) and batch[k].dtype == np.int32
  for b, e in enumerate(exs):
    n = lengths[b]
    for k in ('input_ids', 'attention_mask', 'mm_token_type_ids', 'loss_mask'):
      np.testing.assert_array_equal(batch[k][b, :n], e[k])
    assert np.all(batch['input_ids'][b, n:] == proc.pad_token_id)
    assert not batch['attention_mask'][b, n:].any() and not batch['loss_mask'][b, n:].any()
  np.testing.assert_array_equal(batch['pixel_values'], np.concatenate([e['pixel_values'] for e in exs]))
  np.testing.assert_array_equal(batch['image_grid_thw'], np.concatenate([e['image_grid_thw'] for e in exs]))
  assert batch['image_grid_thw'].dtype == np.int32
  assert int(batch['mm_token_type_ids'].sum()) == batch['pixel_values'].shape[0] // 4


def test_generation_batch_left_pads(proc):
  exs = [proc(make_image(56, 56), 'short?'), proc(make_image(200, 120), QUESTION + ' and a longer question')]
  batch = proc.batch(exs, (64, 128, 256))
  T = batch['input_ids'].shape[1]
  assert T == P.pick_bucket(max(len(e['input_ids']) for e in exs), (64, 128, 256))
  assert 'loss_mask' not in batch
  for b, e in enumerate(exs):
    n = len(e['input_ids'])
    np.testing.assert_array_equal(batch['input_ids'][b, T - n:], e['input_ids'])
    assert np.all(batch['input_ids'][b, :T - n] == proc.pad_token_id) and not batch['attention_mask'][b, :T - n].any()
  # Every prompt ends at the last column with the generation prompt.
  assert all(proc.tokenizer.decode(row[-3:]) == '<|im_start|>assistant\n' for row in batch['input_ids'])
  right = proc.batch(exs, (64, 128, 256), padding_side='right')
  np.testing.assert_array_equal(right['input_ids'][0, :len(exs[0]['input_ids'])], exs[0]['input_ids'])


def test_batch_errors(proc):
  short = proc(make_image(56, 56), 'q')
  long = proc(make_image(400, 400), 'q')
  n = len(long['input_ids'])
  with pytest.raises(ValueError, match=f'example 1: {n} tokens is longer than the largest bucket 64'):
    proc.batch([short, long], (32, 64))
  with pytest.raises(ValueError, match=r'mix training .* loss_mask present at \[1\] of 2'):
    proc.batch([short, proc(make_image(56, 56), 'q', TARGET)], (4096,))
  with pytest.raises(ValueError, match='strictly increasing'):
    proc.batch([short], (128, 64))
  with pytest.raises(ValueError, match='no examples'):
    proc.batch([], (64,))
  with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
    proc.batch([short], (4096,), padding_side='middle')
  with pytest.raises(KeyError, match="example 0 has no 'pixel_values'"):
    proc.batch([{k: v for k, v in short.items() if k != 'pixel_values'}], (4096,))


# ------------------------------------------------------------------------------------------ small tokenizer


def test_processor_with_small_tokenizer_and_tiny_model():
  corpus = [TARGET, QUESTION, 'the right lung is clear', '<think>normal heart size</think><answer>normal</answer>']
  tok = T.train_small_tokenizer(corpus * 20, vocab_size=320)
  cfg = T.config_for_tokenizer(Qwen25VLConfig.tiny(), tok, vocab_multiple=64)
  proc = P.Qwen25VLProcessor(tok, cfg.vision, max_pixels=112 * 112)
  ex = proc(make_image(100, 150), QUESTION, TARGET)
  assert ex['pixel_values'].shape[1] == cfg.vision.patch_dim
  assert int((ex['input_ids'] == cfg.image_token_id).sum()) == ex['pixel_values'].shape[0] // 4
  assert ex['input_ids'].max() < cfg.text.vocab_size
  assert tok.decode(ex['input_ids'][ex['loss_mask'] == 1]) == TARGET + '<|im_end|>'
  batch = proc.batch([ex, proc(make_image(60, 60), 'q', TARGET)], (64, 128, 256))
  assert batch['input_ids'].shape[1] in (64, 128, 256)
  assert int(batch['input_ids'][0, len(ex['input_ids'])]) == cfg.pad_token_id


def test_importing_the_modules_does_not_import_transformers():
  import pathlib
  import subprocess
  import sys
  code = ('import sys, medad_jax.tokenizer, medad_jax.processor; '
          'sys.exit(int("transformers" in sys.modules or "torch" in sys.modules))')
  assert subprocess.run([sys.executable, '-c', code], cwd=str(pathlib.Path(__file__).parents[1]),
                        check=False).returncode == 0
