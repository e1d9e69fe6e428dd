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


# --- convolutional layers ----------------------------------------------------

def kaiming_normal_fan_out() -> Initializer:
  """torch's `kaiming_normal_(mode="fan_out", nonlinearity="relu")`: N(0, 2 / fan_out).

  fan_out of an HWIO kernel is kh * kw * out, as torch counts it for OIHW.
  Untruncated, as torch draws it (jax's `he_normal` truncates).
  """
  return nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def uniform_init(bound: float) -> Initializer:
  """U(-bound, bound)."""
  def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Conv2d(nnx.Module):
  """A 2-D convolution over channels-last images, padded as torch's `nn.Conv2d`.

  `kernel` is HWIO [kh, kw, in, out] (Flax's layout; PyTorch's OIHW weight is
  converted on load and export by `naming.CONV_HWIO`), `bias` [out] if
  `use_bias`. `padding` zeros are added on every side, as torch's integer
  `padding` does, so output size = (size + 2 * padding - kernel) // stride + 1.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int], *,
               stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
               use_bias: bool = True, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32,
               kernel_init: Initializer = kaiming_normal_fan_out(),
               axes: LogicalAxes = (None, None, None, "channels"), rngs: nnx.Rngs):
    self.kernel_size = pair(kernel_size)
    self.stride = pair(stride)
    self.padding = pair(padding)
    self.dtype = dtype
    self.kernel = param(kernel_init, rngs, (*self.kernel_size, in_features, out_features),
                        param_dtype, axes)
    self.bias = (param(nnx.initializers.zeros, None, (out_features,), param_dtype, axes[-1:])
                 if use_bias else None)

  def __call__(self, x: Array) -> Array:
    """[batch, height, width, in] -> [batch, out_height, out_width, out]."""
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=self.stride, padding=[(p, p) for p in self.padding],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def max_pool(x: Array, kernel_size: int, stride: int, padding: int) -> Array:
  """torch's `nn.MaxPool2d(kernel_size, stride, padding)` over channels-last images.

  Padding is -inf, so a padded position never wins (floor output size, as
  torch without ceil_mode).
  """
  pad = [(0, 0), (padding, padding), (padding, padding), (0, 0)]
  # A Python -inf, not an array: jax then sees the max monoid and has its gradient
  # (a traced init value turns into a generic, non-differentiable reduction under jit).
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel_size, kernel_size, 1),
                               (1, stride, stride, 1), pad)


class BatchNorm(nnx.Module):
  """torch's `nn.BatchNorm2d` over channels-last inputs (statistics over every axis but the last).

  Params `scale` (ones) and `bias` (zeros); running statistics are
  `nnx.BatchStat`s, float32 whatever `param_dtype`: `mean` (zeros), `var`
  (ones) and `count`, the int32 number of training forwards (torch's
  `num_batches_tracked`).

  In training (`use_running_average=False`, not `frozen`) it normalises with
  the batch's mean and biased variance and moves the running statistics
  exactly as torch does: `stat = (1 - momentum) * stat + momentum * batch`,
  with the *unbiased* batch variance (n / (n - 1), n elements per channel),
  and `count += 1`. Flax's own `nnx.BatchNorm` cannot match torch: its
  momentum weighs the old statistic (0.99 there is torch's 0.01) and it keeps
  the biased variance.

  The updates are plain (stop_gradient) values that replace the statistics on
  the module, so a caller inside jit or grad reads them back with
  `nnx.state(model, nnx.BatchStat)` after the forward (`nnx.jit` carries them
  out by itself).

  `frozen` (set by `jaxft.tuning.trainable.freeze_batch_norms`): normalise with
  the running statistics in training too, and never update them.
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-5, momentum: float = 0.1,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs | None = None, axes: LogicalAxes = ("channels",)):
    del rngs  # Constant inits only; accepted for a uniform layer signature.
    self.epsilon = epsilon
    self.momentum = momentum
    self.dtype = dtype
    self.frozen = False  # Static: part of the graph definition, as a jit sees it.
    self.scale = param(nnx.initializers.ones, None, (num_features,), param_dtype, axes)
    self.bias = param(nnx.initializers.zeros, None, (num_features,), param_dtype, axes)
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32), logical_axes=axes)
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32), logical_axes=axes)
    self.count = nnx.BatchStat(jnp.zeros((), jnp.int32), logical_axes=())

  def __call__(self, x: Array, *, use_running_average: bool) -> Array:
    x32 = x.astype(jnp.float32)
    if use_running_average or self.frozen:
      mean, var = self.mean[...], self.var[...]
    else:
      mean, var = self._batch_statistics(x32)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)

  def _batch_statistics(self, x32: Array) -> tuple[Array, Array]:
    """The batch's mean and biased variance; moves the running statistics."""
    reduce = tuple(range(x32.ndim - 1))
    mean = jnp.mean(x32, axis=reduce)
    var = jnp.mean(jnp.square(x32 - mean), axis=reduce)  # Two-pass: no cancellation.
    n = x32.size // x32.shape[-1]
    # torch refuses n == 1 in training; here the batch then normalises to `bias`.
    unbiased = var * (n / max(n - 1, 1))
    m = self.momentum
    self._update("mean", (1 - m) * self.mean[...] + m * mean)
    self._update("var", (1 - m) * self.var[...] + m * unbiased)
    self._update("count", self.count[...] + 1)
    return mean, var

  def _update(self, name: str, value: Array) -> None:
    # A new Variable (same metadata) rather than `set_value`: the statistics may
    # come from an outer trace, e.g. closed over by a loss that jax.grad traces
    # inside jit (`steps.loss_and_grads`), and nnx refuses to mutate a Variable
    # from another trace level. The module itself was merged in this trace.
    setattr(self, name, getattr(self, name).replace(jax.lax.stop_gradient(value)))
