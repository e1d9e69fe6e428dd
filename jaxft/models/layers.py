"""Parameterised building blocks of jaxft models: Linear, norms, embeddings, activations.

Every parameter in every jaxft model is created by `param` in this file, so
attaching sharding (or any other per-parameter metadata) is a one-place change.
Each parameter carries its logical axis names (`embed`, `mlp`, `heads`, `vocab`,
...) as `logical_axes` metadata, which `jaxft.sharding` maps to mesh axes. They
are deliberately not passed as `sharding_names`, because flax then insists on
an active mesh.

Layers take two dtypes, as in Flax: `dtype` is the compute dtype (activations,
matmul inputs) and `param_dtype` the storage dtype of the parameters, so
`dtype=jnp.bfloat16, param_dtype=jnp.float32` is mixed precision.
"""

from __future__ import annotations

import functools
import typing
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.errors import UserError
from jaxft.models import dropout
from jaxft.tuning import quantize as quantize_lib

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]
LogicalAxes = tuple[str | None, ...]

# HF initialises every Linear and Embedding with N(0, initializer_range).
DEFAULT_INIT_STD = 0.02


def normal_init(stddev: float) -> Initializer:
  """N(0, stddev) initializer, as transformers' `_init_weights` uses."""
  return nnx.initializers.normal(stddev)


def param(init: Initializer, rngs: nnx.Rngs | None, shape: Sequence[int],
          param_dtype: Dtype, axes: LogicalAxes) -> nnx.Param:
  """A parameter with its logical axes (what sharding rules map to mesh axes)."""
  # Constant initializers (ones/zeros) need no key; keeping `rngs` optional for
  # them avoids consuming random numbers that would shift every later init.
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, tuple(shape), param_dtype), logical_axes=axes)


def pair(size: int | Sequence[int]) -> tuple[int, int]:
  """An image or patch size as (height, width): one number means a square."""
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  height, width = size
  return int(height), int(width)


# --- activations -------------------------------------------------------------

def _quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


# Keys are the `hidden_act` strings of transformers' ACT2FN.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_python": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[Array], Array]:
  """Returns the activation function for a transformers `hidden_act` name."""
  if not isinstance(name, str) or name not in ACTIVATIONS:
    raise UserError(f"Unsupported hidden_act {name!r} in the model config; "
                    f"supported: {', '.join(sorted(ACTIVATIONS))}.")
  return ACTIVATIONS[name]


# --- parameterised layers ----------------------------------------------------

class LoRAParam(nnx.Param):
  """A LoRA adapter matrix: a Param that `jaxft.tuning.lora` adds and export folds in."""


class Linear(nnx.Module):
  """y = x @ kernel + bias, `kernel` stored as (in_features, out_features).

  With a LoRA adapter attached (`jaxft.tuning.lora.attach`), also adds
  `lora_scale * dropout(x) @ lora_a @ lora_b`; `lora_a` is (in, rank) and
  `lora_b` (rank, out), so the base kernel keeps its path and layout.

  A frozen kernel may be stored quantized (`quantize`, QLoRA): `kernel` then
  holds the codes and `kernel_scale` the per-block scales of
  `jaxft.tuning.quantize`, and every call dequantizes it to the compute
  dtype just before the matmul. `weight()` is the dense kernel either way.
  """

  def __init__(self, in_features: int, out_features: int, *,
               use_bias: bool = True, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32,
               kernel_init: Initializer = normal_init(DEFAULT_INIT_STD),
               axes: LogicalAxes = (None, None), rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    self.axes = axes
    self.kernel = param(kernel_init, rngs, (in_features, out_features),
                         param_dtype, axes)
    self.bias = (param(nnx.initializers.zeros, None, (out_features,),
                        param_dtype, axes[-1:]) if use_bias else None)
    # Data attributes (not static), so `jaxft.tuning.lora.attach` may set them later.
    self.lora_a: LoRAParam | None = nnx.data(None)
    self.lora_b: LoRAParam | None = nnx.data(None)
    self.lora_scale = 0.0
    self.lora_dropout = dropout.dropout(0.0)
    # Set by `quantize`: a quantize_lib.KINDS name ("" when dense) and the scales.
    self.quantized = ""
    self.kernel_scale: nnx.Param | None = nnx.data(None)

  def weight(self, dtype: Dtype | None = None) -> Array:
    """The dense (in, out) kernel in `dtype` (default: the compute dtype), dequantized if need be."""
    dtype = self.dtype if dtype is None else dtype
    if not self.quantized:
      return self.kernel[...].astype(dtype)
    # XLA dequantizes each fsdp shard and gathers the dense kernel. Constraining
    # the codes to be gathered instead cut an 8B step's collective bytes 3.3x but
    # raised its peak HBM by 2.5 GiB (70B no longer fit 8 v5e chips): not done.
    return quantize_lib.dequantize(self.kernel[...], self.kernel_scale[...], self.quantized,
                                   dtype)

  def quantize(self, kind: str) -> None:
    """Stores the kernel as `kind` codes plus float32 scales, in place (abstract kernels too).

    Both Params keep the kernel's logical axes, so they shard like it where
    their (smaller) dims divide.
    """
    axes = self.kernel.get_metadata().get("logical_axes")
    data, scale = quantize_lib.quantize_any(self.kernel.get_value(), kind)
    self.kernel.set_value(data)
    self.kernel_scale = nnx.Param(scale, logical_axes=axes)
    self.quantized = kind

  def set_weight(self, kernel: Array) -> None:
    """Stores `kernel` (in, out) dense, replacing a quantized one."""
    self.kernel.set_value(kernel)
    self.kernel_scale = None
    self.quantized = ""

  def __call__(self, x: Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> Array:
    """`deterministic` and `rngs` only matter for LoRA dropout."""
    leading = x.shape[:-1]
    # As a 2-D matmul: XLA's CPU backend transposes the output gradient of a
    # [batch, length, in] dot in memory before the kernel-gradient matmul
    # (an 8 x 256 x 1536 copy took 50-140 ms on a 2-core Xeon, longer than
    # the matmul it fed); of a [batch * length, in] one, it does not.
    x = x.astype(self.dtype).reshape(-1, x.shape[-1])
    y = jnp.dot(x, self.weight())
    if self.lora_a is not None:
      h = self.lora_dropout(x, deterministic=deterministic, rngs=rngs)
      h = jnp.dot(h, self.lora_a[...].astype(self.dtype))
      y = y + self.lora_scale * jnp.dot(h, self.lora_b[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y.reshape(*leading, self.out_features)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with `scale` and `bias`.

  Statistics are always computed in float32: bf16 variance is too coarse, and
  PyTorch's fused LayerNorm also accumulates in float32.
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-12,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               axes: LogicalAxes = (None,)):
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = param(nnx.initializers.ones, None, (num_features,),
                        param_dtype, axes)
    self.bias = param(nnx.initializers.zeros, None, (num_features,),
                       param_dtype, axes)

  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    scale = self.scale[...].astype(jnp.float32)
    y = y * scale + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale over the last axis, statistics in float32 (as transformers)."""

  def __init__(self, num_features: int, *, epsilon: float = 1e-6,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               axes: LogicalAxes = (None,)):
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = param(nnx.initializers.ones, None, (num_features,),
                        param_dtype, axes)

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
                            + self.epsilon)
    return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


class Embed(nnx.Module):
  """Lookup table `embedding` of shape (num_embeddings, features)."""

  def __init__(self, num_embeddings: int, features: int, *,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               embedding_init: Initializer = normal_init(DEFAULT_INIT_STD),
               axes: LogicalAxes = ("vocab", "embed"), rngs: nnx.Rngs):
    self.num_embeddings = num_embeddings
    self.dtype = dtype
    self.embedding = param(embedding_init, rngs, (num_embeddings, features),
                            param_dtype, axes)

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """x @ embedding.T: the output layer of a model with tied embeddings."""
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class OutputLayer(typing.NamedTuple):
  """An LM's output layer as one matrix: logits = hidden @ weight (vocab_major: @ weight.T).

  `weight` is in the compute dtype; a tied embedding is vocab-major.
  """
  weight: Array
  vocab_major: bool


def output_layer(head: Linear | None, embed: Embed) -> OutputLayer | None:
  """The output layer of a causal LM (`head`, or `embed` tied when None) as one matrix.

  None when it is more than one (a LoRA adapter, a bias): callers then use the logits.
  """
  if head is None:
    return OutputLayer(embed.embedding[...].astype(embed.dtype), vocab_major=True)
  if head.lora_a is not None or head.bias is not None:
    return None
  return OutputLayer(head.weight(), vocab_major=False)


def hf_linear(config: Any, n_in: int, n_out: int, axes: LogicalAxes, *, use_bias: bool = True,
              dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> Linear:
  """A Linear initialised as transformers does: N(0, config.initializer_range)."""
  return Linear(n_in, n_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                kernel_init=normal_init(config.initializer_range), axes=axes, rngs=rngs)
