"""Blockwise weight quantization for QLoRA: int8 and NF4, with absmax scales.

A kernel of shape (in, out) is cut into blocks of `BLOCK` consecutive rows
(inputs) per output column; each block keeps its absolute maximum as a
float32 scale, shape (in // block, out), and its values divided by it, in
[-1, 1], as codes:

- "int8": round(127 * w / absmax), one int8 per weight (symmetric absmax).
- "nf4": the nearest of QLoRA's 16 NormalFloat4 levels (Dettmers et al.
  2023, appendix E; bitsandbytes' `NF4` table), two 4-bit codes per uint8:
  rows 2i and 2i+1 share byte i, row 2i in the high nibble, as bitsandbytes
  packs consecutive elements. Blocks along the input axis of an (in, out)
  kernel hold the same weights as bitsandbytes' blocks along each row of
  the (out, in) PyTorch weight.

4.5 bits per weight for nf4, 8.5 for int8, against 16 for bfloat16. The
functions are pure and jittable and do the same float32 arithmetic each run,
so a kernel quantizes to the same bits every time (a resumed run re-quantizes
its base weights rather than reading them from the checkpoint). Of jaxft this
module imports only the config vocabulary: `models.layers` uses it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import config as config_lib

KINDS = config_lib.QUANTIZED  # The config.model.frozen_dtype values that quantize.
BLOCK = 64  # Weights per scale, as QLoRA.

# QLoRA's NF4 levels, exactly as bitsandbytes' `NF4` code table (float32).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# A value above the midpoint of two neighbouring levels takes the upper one
# (bitsandbytes' `dQuantizeNF4` decision tree compares with `>` the same way).
_NF4_MIDPOINTS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2
_INT8_MAX = 127.0

Array = jax.Array


def fits(in_features: int, block: int = BLOCK) -> bool:
  """Whether a kernel with `in_features` rows splits into whole blocks (and nibble pairs)."""
  return in_features > 0 and in_features % block == 0 and block % 2 == 0


def _check(shape: tuple[int, ...], kind: str, block: int) -> None:
  if kind not in KINDS:
    raise ValueError(f"quantization kind must be one of {KINDS}, got {kind!r}")
  if len(shape) < 1 or not fits(shape[0], block):
    raise ValueError(f"a kernel of shape {shape} does not split into blocks of {block} rows")


def _blocks(w: Array, block: int) -> Array:
  """(in, ...) -> (in // block, block, ...)."""
  return w.reshape(w.shape[0] // block, block, *w.shape[1:])


@functools.partial(jax.jit, static_argnames=("kind", "block"))
def quantize(w: Array, kind: str, block: int = BLOCK) -> tuple[Array, Array]:
  """(data, scale) of kernel `w` (in, ...) blockwise along its first axis.

  data: int8 (in, ...) for "int8", uint8 (in // 2, ...) for "nf4";
  scale: float32 (in // block, ...), each block's absmax.
  """
  _check(w.shape, kind, block)
  x = _blocks(w.astype(jnp.float32), block)
  absmax = jnp.max(jnp.abs(x), axis=1)
  # An all-zero block keeps scale 0 and dequantizes to zeros; dividing by 1
  # instead of 0 keeps its codes finite (0).
  safe = jnp.where(absmax == 0, 1.0, absmax)
  normed = (x / safe[:, None]).reshape(w.shape)
  if kind == "int8":
    data = jnp.clip(jnp.round(normed * _INT8_MAX), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
    return data, absmax
  codes = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), normed, side="left").astype(jnp.uint8)
  pairs = codes.reshape(w.shape[0] // 2, 2, *w.shape[1:])
  return (pairs[:, 0] << 4) | pairs[:, 1], absmax


def dequantize(data: Array, scale: Array, kind: str, dtype: Any = jnp.float32,
               block: int = BLOCK) -> Array:
  """The dense kernel, in `dtype`, that (data, scale) from `quantize` stand for."""
  if kind == "int8":
    values = data.astype(jnp.float32) * (1.0 / _INT8_MAX)
  elif kind == "nf4":
    codes = jnp.stack([data >> 4, data & 0xF], axis=1)
    codes = codes.reshape(data.shape[0] * 2, *data.shape[1:])
    values = jnp.take(jnp.asarray(NF4_LEVELS), codes.astype(jnp.int32), axis=0)
  else:
    raise ValueError(f"quantization kind must be one of {KINDS}, got {kind!r}")
  w = _blocks(values, block) * scale.astype(jnp.float32)[:, None]
  return w.reshape(values.shape).astype(dtype)


def quantize_any(w: Any, kind: str, block: int = BLOCK) -> tuple[Any, Any]:
  """`quantize` for an array or a jax.ShapeDtypeStruct (abstract models: shapes only)."""
  if isinstance(w, jax.ShapeDtypeStruct):
    _check(w.shape, kind, block)
    data, scale = jax.eval_shape(functools.partial(quantize, kind=kind, block=block), w)
    return (jax.ShapeDtypeStruct(data.shape, data.dtype),
            jax.ShapeDtypeStruct(scale.shape, scale.dtype))
  return quantize(w, kind, block)
