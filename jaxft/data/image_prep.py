"""Image preprocessing: the processor's statistics, host-side resizing to the model's
layout, and the one normalisation the train and eval steps run on the device.

Resizing is bilinear with Pillow's conventions (a triangle filter with
half-pixel centres, widened when shrinking so it averages rather than aliases),
which is also what transformers' ViTImageProcessor uses.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import UserError
from jaxft.models import layers

# What the checkpoint's processor would use when the folder has no preprocessor_config.json
# (transformers' ViTImageProcessor defaults).
DEFAULT_MEAN = [0.5, 0.5, 0.5]
DEFAULT_STD = [0.5, 0.5, 0.5]

# Pillow's L conversion (ITU-R 601-2 luma), so gray from RGB matches a gray-converted file.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def processor_stats(model_folder: str) -> tuple[list[float], list[float], tuple[int, int] | None]:
  """(image_mean, image_std, (height, width) or None) from the folder's preprocessor_config.json.

  Missing file or keys give mean = std = [0.5, 0.5, 0.5] (ViTImageProcessor's
  defaults) and size None; `do_normalize: false` gives mean 0 and std 1.

  Raises:
    UserError: naming the file (and the key): unreadable, not a JSON object,
      a mean or std that is not numbers, a zero in image_std, or a size that
      is not an integer in 1..65536.
  """
  path = os.path.join(os.path.expanduser(model_folder), "preprocessor_config.json")
  if not os.path.isfile(path):
    return list(DEFAULT_MEAN), list(DEFAULT_STD), None
  try:
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path}: {e}") from e
  if not isinstance(cfg, dict):
    raise UserError(f"{path} is not a JSON object of settings")
  mean = _numbers(path, "image_mean", cfg.get("image_mean", DEFAULT_MEAN))
  std = _numbers(path, "image_std", cfg.get("image_std", DEFAULT_STD))
  if cfg.get("do_normalize", True) is False:
    mean, std = [0.0] * len(mean), [1.0] * len(std)
  if 0.0 in std:
    raise UserError(f"{path}: image_std must be non-zero, got {std}")
  raw = cfg.get("size")
  size = None
  if isinstance(raw, int):
    size = (_side(path, "size", raw),) * 2
  elif isinstance(raw, dict) and "height" in raw and "width" in raw:
    size = (_side(path, "size.height", raw["height"]), _side(path, "size.width", raw["width"]))
  elif isinstance(raw, dict) and "shortest_edge" in raw:
    # Such processors resize the short side and crop; a square is the nearest fixed shape.
    size = (_side(path, "size.shortest_edge", raw["shortest_edge"]),) * 2
  return mean, std, size


# Larger sides than any processor uses: a corrupt size would make resizing allocate
# its square.
_MAX_SIDE = 65536


def _side(path: str, key: str, value: object) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SIDE:
    raise UserError(f"{path}: {key} is {value!r}; expected an integer in 1..{_MAX_SIDE}")
  return value


def _numbers(path: str, key: str, value: object) -> list[float]:
  """`value` (a number or a list of them) as floats; UserError naming `key` otherwise."""
  values = _as_list(value)
  if not values or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                           and math.isfinite(x) for x in values):
    raise UserError(f"{path}: {key} is {value!r}; expected a number or a list of numbers")
  return [float(x) for x in values]


def _as_list(x) -> list:
  return list(x) if isinstance(x, (list, tuple)) else [x]


def _resize_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
  """Source indices and weights [n_out, K] of a 1-D bilinear (triangle) resize, Pillow-style.

  Half-pixel centres; when shrinking, the filter widens by n_in / n_out so each
  output averages all the inputs it covers instead of sampling two of them.
  """
  scale = n_in / n_out
  support = max(scale, 1.0)
  centers = (np.arange(n_out) + 0.5) * scale
  taps = math.ceil(2 * support) + 1
  j = np.floor(centers - support).astype(np.int64)[:, None] + np.arange(taps)
  w = np.maximum(0.0, 1.0 - np.abs((j + 0.5 - centers[:, None]) / support))
  w[(j < 0) | (j >= n_in)] = 0.0  # Outside the image: drop, and renormalise the rest.
  w /= w.sum(axis=1, keepdims=True)
  return np.clip(j, 0, n_in - 1), w.astype(np.float32)


def _resize_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
  if x.shape[axis] == n_out:
    return x
  idx, w = _resize_taps(x.shape[axis], n_out)
  shape = [1] * x.ndim
  shape[axis] = n_out
  out = np.zeros(x.shape[:axis] + (n_out,) + x.shape[axis + 1:], np.float32)
  # One gather per tap (a few when enlarging) keeps memory at one output's worth.
  for k in range(idx.shape[1]):
    out += w[:, k].reshape(shape) * np.take(x, idx[:, k], axis=axis)
  return out


def resize(images: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
  """Bilinear (Pillow-style, antialiased when shrinking) resize of [N, H, W, C] to float32."""
  h, w = layers.pair(size)
  x = np.asarray(images, np.float32)
  return _resize_axis(_resize_axis(x, h, 1), w, 2)


def _model_layout(images: np.ndarray, image_size: int | Sequence[int],
                  channels: int) -> np.ndarray:
  """float32 [N, *image_size, channels] in 0..255: channels converted, resized."""
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  have = x.shape[-1]
  # Reduce to gray before resizing (a third of the work), widen to RGB after.
  if have == 3 and channels == 1:
    x = np.asarray(x, np.float32) @ _LUMA[:, None]
  elif have not in (1, 3) or channels not in (1, 3):
    raise UserError(f"cannot turn {have}-channel images into the model's {channels} channels")
  x = resize(x, image_size)
  if x.shape[-1] == 1 and channels == 3:
    x = np.repeat(x, 3, axis=-1)
  return x


def to_model_pixels(images: np.ndarray, image_size: int | Sequence[int],
                    channels: int) -> np.ndarray:
  """uint8 [N, *image_size, channels]: what `normalize` turns into model input on the device.

  Stored once at load, so batches are cheap row gathers and a dataset costs
  a quarter of its float32 size.
  """
  x = _model_layout(images, image_size, channels)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def channel_stats(values: Sequence[float], name: str, channels: int) -> np.ndarray:
  """Per-channel mean or std for a `channels`-channel model (one value broadcasts).

  Three equal values (the defaults, and many processors) serve a gray model too.
  """
  a = np.asarray(values, np.float32).reshape(-1)
  if channels == 1 and len(a) == 3 and np.all(a == a[0]):
    a = a[:1]
  if len(a) not in (1, channels):
    raise UserError(f"{name} has {len(a)} values but the model takes {channels} channel(s)")
  return a


def normalize(pixels: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 pixels [..., C] as the model's float32 input: scaled to [0, 1], then (x - mean) / std.

  What transformers' image processor does after resizing (rescale, normalize),
  here inside the jitted step so batches cross to the device as uint8.

  Args:
    pixels: uint8 (or any integer or float dtype holding 0..255), channels last.
    mean: per-channel mean, C values or one (as `channel_stats` gives).
    std: per-channel standard deviation, likewise.

  Returns:
    float32, the shape of `pixels`.
  """
  x = jnp.asarray(pixels).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
