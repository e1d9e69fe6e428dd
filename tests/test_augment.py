"""On-device augmentation: random resized crops and flips, against cropping then resizing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.data import augment
from jaxft.data import image_prep


def _rng(seed=0):
  return np.random.default_rng(seed)


def _batch(n=16, h=12, w=12, seed=0):
  return jnp.asarray(_rng(seed).random((n, h, w, 3), dtype=np.float32))


def test_augment_flip_only_mirrors_or_keeps_each_image():
  x = _batch()
  out = jax.jit(functools.partial(augment.augment, random_resized_crop=False, flip=True))(
      jax.random.key(0), x)
  assert out.shape == x.shape
  flipped = np.array([bool(jnp.array_equal(o, i[:, ::-1])) for o, i in zip(out, x)])
  kept = np.array([bool(jnp.array_equal(o, i)) for o, i in zip(out, x)])
  assert np.all(flipped ^ kept) and flipped.any() and kept.any()


def test_augment_full_scale_crop_is_identity():
  x = _batch()
  out = jax.jit(functools.partial(augment.augment, random_resized_crop=True, flip=False,
                                  scale=(1.0, 1.0), ratio=(1.0, 1.0)))(jax.random.key(3), x)
  np.testing.assert_allclose(out, x, atol=1e-5)


def test_augment_crop_with_flip_mirrors_the_identity_crop():
  x = _batch(n=8)
  crop = functools.partial(augment.augment, random_resized_crop=True, flip=True,
                           scale=(1.0, 1.0), ratio=(1.0, 1.0))
  out = jax.jit(crop)(jax.random.key(1), x)
  for o, i in zip(out, x):
    assert (np.allclose(o, i, atol=1e-5) or np.allclose(o, i[:, ::-1], atol=1e-5))


def test_augment_random_crops_differ_by_key_and_stay_in_range():
  x = _batch(n=4, h=16, w=10)
  crop = jax.jit(functools.partial(augment.augment, random_resized_crop=True, flip=True))
  a, b = crop(jax.random.key(0), x), crop(jax.random.key(1), x)
  assert a.shape == x.shape and a.dtype == x.dtype
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, crop(jax.random.key(0), x))  # Deterministic per key.
  # Bilinear samples are convex combinations of the image's own pixels.
  assert float(a.min()) >= float(x.min()) - 1e-6 and float(a.max()) <= float(x.max()) + 1e-6


def test_augment_impossible_ratio_falls_back_to_centre_crop():
  x = _batch(n=2, h=8, w=16)
  # No square box of the whole area fits in 8x16: torchvision's fallback is the
  # centred 8x8 square (columns 4..11), stretched back to 8x16.
  out = augment.augment(jax.random.key(0), x, random_resized_crop=True, flip=False,
                       scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_allclose(out, image_prep.resize(np.asarray(x)[:, :, 4:12], (8, 16)), atol=1e-5)


def test_augment_crop_equals_cropping_then_resizing():
  x = _batch(n=6, h=16, w=12, seed=2)
  key = jax.random.key(5)
  out = augment.augment(key, x, random_resized_crop=True, flip=False)
  # The boxes augment drew (it splits the key into crop and flip keys the same way).
  top, left, h, w = (np.asarray(v, int) for v in
                     augment._crop_boxes(jax.random.split(key)[0], 6, 16, 12, (0.08, 1.0), (3 / 4, 4 / 3)))
  for i in range(6):
    assert 0 < h[i] <= 16 and 0 < w[i] <= 12 and top[i] + h[i] <= 16 and left[i] + w[i] <= 12
    crop = np.asarray(x)[i:i + 1, top[i]:top[i] + h[i], left[i]:left[i] + w[i]]
    np.testing.assert_allclose(out[i], image_prep.resize(crop, (16, 12))[0], atol=1e-5)
