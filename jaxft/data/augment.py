"""On-device image augmentation: random resized crops and flips, jittable, per batch.

Runs inside the train step on float NHWC pixels, so augmentation never sits
on the host's critical path.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp


def _crop_boxes(key: jax.Array, n: int, height: int, width: int, scale: Sequence[float],
                ratio: Sequence[float], attempts: int = 10) -> tuple[jax.Array, ...]:
  """Per-image (top, left, crop height, crop width) as torchvision's RandomResizedCrop picks them.

  Ten tries of (area fraction ~ U(scale), aspect ~ log-U(ratio)) all drawn at
  once; each image keeps its first box that fits, else a centre crop at the
  nearest allowed aspect. Vectorised with no data-dependent Python, so it jits.
  """
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(k_area, (n, attempts), minval=scale[0],
                                             maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (n, attempts), minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  w = jnp.round(jnp.sqrt(area * aspect))
  h = jnp.round(jnp.sqrt(area / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(fits, axis=1)[:, None]
  # The fallback depends only on static shapes and ratio, so plain Python computes it.
  in_ratio = width / height
  if in_ratio < min(ratio):
    fw, fh = width, round(width / min(ratio))
  elif in_ratio > max(ratio):
    fw, fh = round(height * max(ratio)), height
  else:
    fw, fh = width, height
  ok = fits.any(axis=1)
  h = jnp.where(ok, jnp.take_along_axis(h, first, axis=1)[:, 0], fh)
  w = jnp.where(ok, jnp.take_along_axis(w, first, axis=1)[:, 0], fw)
  # An integer offset, uniform over 0..size-crop (torch.randint(0, size - crop + 1));
  # the fallback box is centred.
  top = jnp.minimum(jnp.floor(jax.random.uniform(k_top, (n,)) * (height - h + 1)), height - h)
  left = jnp.minimum(jnp.floor(jax.random.uniform(k_left, (n,)) * (width - w + 1)), width - w)
  top = jnp.where(ok, top, (height - fh) // 2)
  left = jnp.where(ok, left, (width - fw) // 2)
  return top, left, h, w


def _interp_matrix(start: jax.Array, length: jax.Array, n: int, dtype) -> jax.Array:
  """[n, n] bilinear weights sampling `length` source pixels from `start` onto n outputs.

  Half-pixel centres, clamped to the crop's own edges (as cropping, then
  resizing would), never reading pixels outside it. A matrix rather than a
  gather: two small matmuls per image run on the MXU / tensor cores, gathers do not.
  """
  src = start + (jnp.arange(n) + 0.5) * (length / n) - 0.5
  src = jnp.clip(src, start, start + length - 1)
  lo = jnp.floor(src)
  frac = (src - lo).astype(dtype)
  lo = lo.astype(jnp.int32)
  hi = jnp.minimum(lo + 1, n - 1)
  return ((1 - frac)[:, None] * jax.nn.one_hot(lo, n, dtype=dtype)
          + frac[:, None] * jax.nn.one_hot(hi, n, dtype=dtype))


def augment(key: jax.Array, images: jax.Array, *, random_resized_crop: bool, flip: bool,
            scale: Sequence[float] = (0.08, 1.0),
            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> jax.Array:
  """Random resized crop and/or horizontal flip of a float NHWC batch; same shape out.

  Each image gets its own crop box (torchvision's RandomResizedCrop sampling:
  area fraction in `scale`, aspect ratio log-uniform in `ratio`, integer box),
  resized back to the input size bilinearly, and is mirrored with probability
  1/2. Pure and jittable: `random_resized_crop`, `flip`, `scale` and `ratio`
  are static Python values; everything drawn from `key` stays traced.
  """
  if not (random_resized_crop or flip):
    return images
  n, height, width, _ = images.shape
  k_crop, k_flip = jax.random.split(key)
  mirror = jax.random.bernoulli(k_flip, 0.5, (n,)) if flip else jnp.zeros((n,), bool)
  if not random_resized_crop:
    return jnp.where(mirror[:, None, None, None], images[:, :, ::-1], images)
  top, left, h, w = _crop_boxes(k_crop, n, height, width, scale, ratio)

  def one(image, top, left, h, w, mirror):
    rows = _interp_matrix(top, h, height, images.dtype)
    cols = _interp_matrix(left, w, width, images.dtype)
    # Flipping reverses which source column each output column reads: free here.
    cols = jnp.where(mirror, cols[::-1], cols)
    # HIGHEST: TPUs would otherwise multiply float32 in bfloat16 and blur the pixels.
    return jnp.einsum("ih,hwc,jw->ijc", rows, image, cols,
                      precision=jax.lax.Precision.HIGHEST)

  return jax.vmap(one)(images, top, left, h, w, mirror)
