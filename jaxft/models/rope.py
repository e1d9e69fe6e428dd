"""Rotary position embeddings (RoPE) as transformers' `modeling_rope_utils` defines them.

A rope_type gives static inverse frequencies, an attention factor that scales
cos and sin (yarn), and for `dynamic` a rescaling that depends on the longest
position in the batch.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import UserError

Array = jax.Array


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


def rope_type(params: dict[str, Any]) -> str:
  """The rope_type of transformers' `rope_parameters`; UserError if unsupported."""
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise UserError(f"rope_type {kind!r} is not supported "
                    f"({', '.join(ROPE_TYPES)} are)")
  return kind


def _rope_theta(params: dict[str, Any]) -> float:
  return float(params.get("rope_theta", 10000.0))


def _rope_wavelength_factors(theta: float, head_dim: int) -> np.ndarray:
  """theta ** (2i / head_dim): the default frequencies are their inverses."""
  # float32 throughout, as transformers computes them in torch.float.
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
  return (theta ** exponents).astype(np.float32)


def _llama3_inverse_frequencies(inv: np.ndarray, params: dict[str, Any]) -> np.ndarray:
  factor, low, high = (float(params[k]) for k in
                       ("factor", "low_freq_factor", "high_freq_factor"))
  old = float(params["original_max_position_embeddings"])
  wavelen = 2 * np.pi / inv
  scaled = np.where(wavelen > old / low, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old / high) & ~(wavelen > old / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _require_max_positions(kind: str, max_positions: int | None) -> int:
  if max_positions is None:
    raise UserError(f"rope_type {kind!r} needs max_position_embeddings in the model config")
  return int(max_positions)


def _yarn_original_max_positions(params: dict[str, Any], max_positions: int | None) -> float:
  # transformers 5 fills this in from max_position_embeddings when absent.
  original = params.get("original_max_position_embeddings")
  return float(original if original is not None
               else _require_max_positions("yarn", max_positions))


def _yarn_factor(params: dict[str, Any], max_positions: int | None) -> float:
  factor = params.get("factor")
  if factor is not None:
    return float(factor)
  # DeepSeek-V3-style configs give the stretch only as this ratio.
  return (_require_max_positions("yarn", max_positions)
          / _yarn_original_max_positions(params, max_positions))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_attention_factor(params: dict[str, Any], max_positions: int | None) -> float:
  if params.get("attention_factor") is not None:
    return float(params["attention_factor"])
  factor = _yarn_factor(params, max_positions)
  mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
  if mscale and mscale_all_dim:
    return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
  return _yarn_mscale(factor)


def _yarn_correction_range(params: dict[str, Any], head_dim: int,
                           original: float) -> tuple[float, float]:
  """The dims between which yarn blends extrapolated into interpolated frequencies."""
  theta = _rope_theta(params)
  # `or`, not a .get default: transformers also replaces an explicit None/0.
  beta_fast = params.get("beta_fast") or 32
  beta_slow = params.get("beta_slow") or 1

  def dim_for(rotations: float) -> float:  # the dim that turns `rotations` times
    return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = dim_for(beta_fast), dim_for(beta_slow)
  if params.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  return max(low, 0), min(high, head_dim - 1)


def _yarn_inverse_frequencies(params: dict[str, Any], head_dim: int,
                              max_positions: int | None) -> np.ndarray:
  factor = _yarn_factor(params, max_positions)
  powers = _rope_wavelength_factors(_rope_theta(params), head_dim)
  low, high = _yarn_correction_range(params, head_dim,
                                     _yarn_original_max_positions(params, max_positions))
  if low == high:
    high += 0.001  # As transformers: avoids dividing by zero in the ramp.
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  # Blended as transformers does (weight 1 - (1 - ramp), not ramp), for equal rounding.
  extrapolation = (1 - ramp).astype(np.float32)
  interpolated = (1.0 / (factor * powers)).astype(np.float32)
  extrapolated = (1.0 / powers).astype(np.float32)
  return (interpolated * (1 - extrapolation) + extrapolated * extrapolation).astype(np.float32)


def rope_inverse_frequencies(params: dict[str, Any], head_dim: int,
                             max_positions: int | None = None) -> np.ndarray:
  """Static RoPE inverse frequencies (float32) for transformers' `rope_parameters`.

  `max_positions` is the config's max_position_embeddings (yarn may derive
  its factor from it). For `dynamic` these are the frequencies used while
  positions stay below max_positions; `dynamic_rope_inverse_frequencies`
  rescales them beyond. Unsupported rope types raise UserError.
  """
  kind = rope_type(params)
  if kind == "yarn":
    return _yarn_inverse_frequencies(params, head_dim, max_positions)
  inv = (1.0 / _rope_wavelength_factors(_rope_theta(params), head_dim)).astype(np.float32)
  if kind in ("default", "dynamic"):
    return inv
  if kind == "linear":
    return (inv / np.float32(params["factor"])).astype(np.float32)
  return _llama3_inverse_frequencies(inv, params)


def rope_attention_scaling(params: dict[str, Any], max_positions: int | None = None) -> float:
  """The factor transformers multiplies cos and sin by: yarn's, else 1."""
  if rope_type(params) == "yarn":
    return float(_yarn_attention_factor(params, max_positions))
  return 1.0


def dynamic_rope_settings(params: dict[str, Any],
                          max_positions: int | None) -> tuple[float, float, int] | None:
  """(rope_theta, factor, max_positions) for rope_type `dynamic`, else None."""
  if rope_type(params) != "dynamic":
    return None
  return (_rope_theta(params), float(params["factor"]),
          _require_max_positions("dynamic", max_positions))


def dynamic_rope_inverse_frequencies(positions: Array, inv_freq: np.ndarray,
                                     settings: tuple[float, float, int]) -> Array:
  """Dynamic-NTK inverse frequencies for this call's `positions` (jittable).

  `inv_freq` while every position is below max_positions; beyond, the base
  grows with L = max(positions) + 1 as in transformers'
  `_compute_dynamic_ntk_parameters`. transformers keeps the largest L seen
  (until a call falls back below max_positions); that is this call's L for a
  single forward and for cached decoding, where positions only grow. Cached
  keys keep the frequencies they were rotated with, on both sides.
  """
  theta, factor, max_positions = settings
  head_dim = 2 * inv_freq.shape[-1]
  length = jnp.max(positions) + 1
  f32 = jnp.float32
  # float32 like transformers, which computes this from an int64 tensor.
  stretch = f32(factor) * length.astype(f32) / f32(max_positions) - f32(factor - 1)
  base = f32(theta) * stretch ** f32(head_dim / (head_dim - 2))
  exponents = jnp.asarray(np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
  scaled = 1.0 / base ** exponents
  # A select, not a Python branch: `length` is traced. Below max_positions the
  # static frequencies are used exactly (the formula gives them up to rounding).
  return jnp.where(length > max_positions, scaled, jnp.asarray(inv_freq))


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray | Array,
               attention_scaling: float = 1.0) -> Array:
  """Rotates [batch, length, heads, head_dim] by position (transformers' half split).

  cos and sin are scaled by `attention_scaling` (yarn's attention factor), as
  transformers' rotary embeddings do.
  """
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos = (jnp.cos(emb) * attention_scaling).astype(x.dtype)
  sin = (jnp.sin(emb) * attention_scaling).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
