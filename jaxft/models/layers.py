"""Shared building blocks for jaxft models and their checkpoint layout rules.

Every parameter in every jaxft model is created by `param` in this file, so
attaching sharding (or any other per-parameter metadata) is a one-place change.
Each parameter carries its logical axis names (`embed`, `mlp`, `heads`, `vocab`,
...) as `logical_axes` metadata; nothing reads them yet. They are deliberately
not passed as `sharding_names`, because flax then insists on an active mesh.

Layers take two dtypes, as in Flax: `dtype` is the compute dtype (activations,
matmul inputs) and `param_dtype` the storage dtype of the parameters, so
`dtype=jnp.bfloat16, param_dtype=jnp.float32` is mixed precision.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import typing
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import config as config_lib
from jaxft import sharding
from jaxft.errors import UserError

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
  """A LoRA adapter matrix: a Param that `jaxft.lora` adds and export folds in."""


class Linear(nnx.Module):
  """y = x @ kernel + bias, `kernel` stored as (in_features, out_features).

  With a LoRA adapter attached (`jaxft.lora.attach`), also adds
  `lora_scale * dropout(x) @ lora_a @ lora_b`; `lora_a` is (in, rank) and
  `lora_b` (rank, out), so the base kernel keeps its path and layout.
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
    # Data attributes (not static), so `jaxft.lora.attach` may set them later.
    self.lora_a: LoRAParam | None = nnx.data(None)
    self.lora_b: LoRAParam | None = nnx.data(None)
    self.lora_scale = 0.0
    self.lora_dropout = dropout(0.0)

  def __call__(self, x: Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> Array:
    """`deterministic` and `rngs` only matter for LoRA dropout."""
    leading = x.shape[:-1]
    # As a 2-D matmul: XLA's CPU backend transposes the output gradient of a
    # [batch, length, in] dot in memory before the kernel-gradient matmul
    # (an 8 x 256 x 1536 copy took 50-140 ms on a 2-core Xeon, longer than
    # the matmul it fed); of a [batch * length, in] one, it does not.
    x = x.astype(self.dtype).reshape(-1, x.shape[-1])
    y = jnp.dot(x, self.kernel[...].astype(self.dtype))
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
  return OutputLayer(head.kernel[...].astype(head.dtype), vocab_major=False)


def _mix32(x: Array) -> Array:
  """A bijective 32-bit integer hash (lowbias32, Wellons): good avalanche in 5 ops."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hashed_bits(seed: Array, shape: tuple[int, ...]) -> Array:
  """Uniform uint32 bits for every element of `shape`: a hash of (seed, element index).

  jax.random's threefry costs about a sixth of a BERT train step on a CPU
  when it draws every dropout mask; this hash fuses into the op that uses the
  mask instead of being computed and stored separately. Distinct elements of
  one call get distinct bits (the hash is a bijection of the index) up to
  2**32 elements per call, beyond which indices wrap around.
  """
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  return _mix32(_mix32(index ^ seed) + seed)


class Dropout(nnx.Module):
  """Inverted dropout with masks from `hashed_bits`, seeded per call from `rngs.dropout()`.

  Same interface as nnx.Dropout. The drop probability is `rate` rounded to a
  multiple of 2**-32.
  """

  def __init__(self, rate: float):
    self.rate = float(rate)

  def __call__(self, x: Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    if rngs is None:
      raise ValueError("Dropout needs rngs=nnx.Rngs(dropout=key) when not deterministic.")
    seed = jax.random.bits(rngs.dropout(), (), jnp.uint32)
    threshold = min(round(self.rate * 2**32), 2**32 - 1)
    keep = hashed_bits(seed, x.shape) >= jnp.uint32(threshold)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - self.rate), x.dtype), jnp.zeros_like(x))


def dropout(rate: float) -> Dropout:
  """A stateless dropout layer: randomness comes from `rngs` at call time.

  Built without `rngs`, so the model holds no RNG state and the train step can
  pass `nnx.Rngs(dropout=key)` per step.
  """
  return Dropout(rate)


# --- attention ---------------------------------------------------------------

_ATTENTION = contextvars.ContextVar("attention", default="jaxft")


@contextlib.contextmanager
def attention_implementation(name: str) -> Iterator[None]:
  """While tracing inside this context, attention runs as `name` (one of config.ATTENTION).

  `jaxft`: einsum + softmax, with attention dropout. `fused`:
  jax.nn.dot_product_attention, which picks cuDNN's fused (flash) kernel on an
  NVIDIA GPU when dtype and shapes allow (bf16/fp16) and XLA's otherwise; it
  has no dropout, so layers that train with attention dropout keep `jaxft`.
  """
  if name not in config_lib.ATTENTION:
    raise ValueError(f"attention must be one of {config_lib.ATTENTION}, got {name!r}")
  token = _ATTENTION.set(name)
  try:
    yield
  finally:
    _ATTENTION.reset(token)


def dot_product_attention(query: Array, key: Array, value: Array,
                          mask: Array | None, *, dropout_layer: Dropout,
                          deterministic: bool,
                          rngs: nnx.Rngs | None) -> Array:
  """Softmax attention over [batch, length, heads, head_dim] inputs.

  Args:
    query: [batch, q_len, heads, head_dim].
    key, value: [batch, kv_len, kv_heads, head_dim]; kv_heads divides heads
      (grouped-query attention: query head h reads key head h // (heads /
      kv_heads), as repeating each key head that many times would give).
    mask: boolean [batch, 1 | heads, q_len | 1, kv_len], True where attending
      is allowed; None attends everywhere.
    dropout_layer: applied to the attention probabilities.
    deterministic: disables dropout.
    rngs: dropout randomness when not deterministic.

  Returns:
    [batch, q_len, heads, head_dim] in the dtype of `value`.
  """
  if _ATTENTION.get() == "fused" and (deterministic or dropout_layer.rate == 0.0):
    # A fully masked row (a dummy padding example) gets uniform weights here too.
    return jax.nn.dot_product_attention(query, key, value, mask=mask).astype(value.dtype)
  # The query heads that share a key head are one matmul against it, not
  # `groups` matmuls against repeated copies (groups == 1 adds a unit axis).
  # Operands go heads-major explicitly rather than by the einsums' choice.
  # Both measured on a CPU: a SmolLM2 layer (9 heads, 3 key heads) ~10%
  # faster than with repeated keys and einsum-chosen layouts.
  batch, q_len, heads, head_dim = query.shape
  groups = heads // key.shape[2]
  q = query.reshape(batch, q_len, heads // groups, groups, head_dim).transpose(0, 2, 3, 1, 4)
  key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)
  scores = jnp.einsum("bhgqd,bhkd->bhgqk", q, key,
                      preferred_element_type=jnp.float32) * head_dim ** -0.5
  if mask is not None:
    # `where` rather than an additive bias: a fully padded row (a dummy
    # example filling a fixed-shape batch) then softmaxes to uniform weights
    # instead of NaN, which would poison a loss even when weighted by zero.
    scores = jnp.where(_grouped_mask(mask, groups), scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = dropout_layer(probs, deterministic=deterministic, rngs=rngs)
  context = jnp.einsum("bhgqk,bhkd->bhgqd", probs.astype(value.dtype), value)
  return context.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim)


def _grouped_mask(mask: Array, groups: int) -> Array:
  """[b, 1 | heads, q, k] -> [b, 1 | kv_heads, 1 | groups, q, k], as the grouped scores."""
  if mask.shape[1] == 1:
    return mask[:, :, None]
  return mask.reshape(mask.shape[0], mask.shape[1] // groups, groups, *mask.shape[2:])


def padding_mask(attention_mask: Array | None) -> Array | None:
  """[batch, kv_len] 1/0 padding mask -> boolean [batch, 1, 1, kv_len]."""
  if attention_mask is None:
    return None
  return (attention_mask != 0)[:, None, None, :]


def hf_linear(config: Any, n_in: int, n_out: int, axes: LogicalAxes, *, use_bias: bool = True,
              dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> Linear:
  """A Linear initialised as transformers does: N(0, config.initializer_range)."""
  return Linear(n_in, n_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                kernel_init=normal_init(config.initializer_range), axes=axes, rngs=rngs)


class SelfAttention(nnx.Module):
  """Multi-head self-attention projections `query`, `key`, `value`.

  The output projection is left to the caller, because model families name
  and place it differently (BERT puts it with a LayerNorm in a sibling module).
  """

  def __init__(self, hidden_size: int, num_heads: int, *,
               head_dim: int | None = None, use_bias: bool = True,
               attention_dropout: float = 0.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32,
               kernel_init: Initializer = normal_init(DEFAULT_INIT_STD),
               rngs: nnx.Rngs):
    if head_dim is None:
      if hidden_size % num_heads:
        raise UserError(f"hidden_size {hidden_size} is not a multiple of "
                        f"num_attention_heads {num_heads}.")
      head_dim = hidden_size // num_heads
    self.num_heads = num_heads
    self.head_dim = head_dim
    proj = functools.partial(Linear, hidden_size, num_heads * head_dim, use_bias=use_bias,
                             dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                             axes=("embed", "heads"), rngs=rngs)
    self.query = proj()
    self.key = proj()
    self.value = proj()
    self.dropout = dropout(attention_dropout)

  def __call__(self, x: Array, mask: Array | None, *, deterministic: bool,
               rngs: nnx.Rngs | None, queries: Array | None = None) -> Array:
    """[batch, length, hidden] -> [batch, q_len, heads * head_dim] (before out proj).

    `queries` ([batch, q_len, hidden], default `x`) are the positions whose
    outputs are needed: a classifier's last layer only needs the first token.
    """
    queries = x if queries is None else queries
    split = lambda y: y.reshape(*y.shape[:2], self.num_heads, self.head_dim)
    kw = dict(deterministic=deterministic, rngs=rngs)
    context = dot_product_attention(
        split(self.query(queries, **kw)), split(self.key(x, **kw)),
        split(self.value(x, **kw)), mask,
        dropout_layer=self.dropout, deterministic=deterministic, rngs=rngs)
    context = context.reshape(*queries.shape[:2], self.num_heads * self.head_dim)
    return sharding.constrain(context, ("batch", "length", "heads"))
