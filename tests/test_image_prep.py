"""Image preprocessing: Pillow-equal resize, processor stats, the model's uint8 layout, and the
normalisation the train step runs, against transformers' image processor."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from PIL import Image

from jaxft.data import image_prep
from jaxft.errors import UserError
from jaxft.tasks import image_classify


def _rng(seed=0):
  return np.random.default_rng(seed)


@pytest.mark.parametrize("mean, std", [([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                                       ([0.5], [0.5])])
def test_step_normalisation_matches_transformers_image_processor(mean, std):
  channels = len(mean)
  x = _rng(2).integers(0, 256, (3, 6, 7, channels), dtype=np.uint8)
  x[0, 0, 0], x[0, 0, 1] = 0, 255
  processor = transformers.ViTImageProcessor(do_resize=False, do_rescale=True,
                                             rescale_factor=1 / 255, do_normalize=True,
                                             image_mean=mean, image_std=std)
  want = processor(list(x), return_tensors="np",
                   input_data_format="channels_last")["pixel_values"].transpose(0, 2, 3, 1)
  # The train and eval steps' own forward, with an identity model: what the ViT receives.
  input_ = image_classify.ImageInput(size=(6, 7), channels=channels, mean=tuple(mean),
                                     std=tuple(std), interpolate=False,
                                     random_resized_crop=False, flip=False,
                                     crop_scale=(0.08, 1.0))
  # pylint: disable-next=protected-access
  forward = functools.partial(image_classify._image_forward, input_=input_)
  got = jax.jit(lambda batch: forward(lambda x, **_: x, batch, True, None))(
      {"pixels": jnp.asarray(x)})
  assert got.shape == x.shape and got.dtype == jnp.float32
  assert np.abs(np.asarray(got) - want).max() <= 1e-5


def test_to_model_pixels_converts_channels_and_resizes():
  x = _rng().integers(0, 256, (2, 4, 5, 1), dtype=np.uint8)
  out = image_prep.to_model_pixels(x, (4, 5), 3)
  assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], x[..., 0])
  assert image_prep.to_model_pixels(x, 7, 3).shape == (2, 7, 7, 3)
  rgb = np.repeat(x, 3, axis=-1)
  gray = image_prep.to_model_pixels(rgb, (4, 5), 1)
  np.testing.assert_array_equal(gray[..., 0], x[..., 0])  # Luma of gray is gray.
  with pytest.raises(UserError, match="image_mean has 3 values"):
    image_prep.channel_stats([0.1, 0.2, 0.3], "image_mean", 1)


@pytest.mark.parametrize("size", [(20, 17), (5, 3)])
def test_resize_matches_pillow_bilinear(size):
  x = _rng(1).integers(0, 256, (9, 11), dtype=np.uint8)
  ours = image_prep.resize(x[None, ..., None], size)[0, ..., 0]
  pil = np.asarray(Image.fromarray(x).resize(size[::-1], Image.Resampling.BILINEAR), np.float32)
  # Pillow rounds to uint8 between its two passes; we stay in float.
  assert np.abs(ours - pil).max() <= 1.5


def test_processor_stats(tmp_path):
  assert image_prep.processor_stats(str(tmp_path)) == ([0.5] * 3, [0.5] * 3, None)
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(
      {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
       "size": {"height": 384, "width": 320}}))
  assert image_prep.processor_stats(str(tmp_path)) == (
      [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], (384, 320))
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 224}))
  assert image_prep.processor_stats(str(tmp_path)) == ([0.5] * 3, [0.5] * 3, (224, 224))


def test_processor_stats_rejects_a_zero_std(tmp_path):
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_std": [0.5, 0.0, 0.5]}))
  with pytest.raises(UserError, match="image_std must be non-zero"):
    image_prep.processor_stats(str(tmp_path))
