"""Attention for every jaxft model: the softmax kernel and its fused alternative,
masks, q/k/v projections, and a decoder's KV cache and layer loop.

Masks are boolean, True where attending is allowed, and broadcast against
[batch, heads, q_len, kv_len] scores.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import config as config_lib
from jaxft import sharding
from jaxft.errors import UserError
from jaxft.models import dropout
from jaxft.models import layers
from jaxft.models import stack

Array = jax.Array
Dtype = Any
KVCache = tuple[Array, Array]  # keys, values: [batch, max_length, kv_heads, head_dim]

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
                          mask: Array | None, *, dropout_layer: dropout.Dropout,
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


# --- masks -------------------------------------------------------------------

def padding_mask(attention_mask: Array | None) -> Array | None:
  """[batch, kv_len] 1/0 padding mask -> boolean [batch, 1, 1, kv_len]."""
  if attention_mask is None:
    return None
  return (attention_mask != 0)[:, None, None, :]


def attention_mask_4d(length: int, attention_mask: Array | None,
                      segment_ids: Array | None) -> Array:
  """Boolean [batch | 1, 1, length, length]: causal, not padding, same segment.

  Args:
    length: the sequence length.
    attention_mask: [batch, length] 1/0 padding mask, or None.
    segment_ids: [batch, length] ids of packed documents (which never attend
      across each other), or None.
  """
  pos = jnp.arange(length)
  mask = (pos[:, None] >= pos[None, :])[None, None]
  if attention_mask is not None:
    mask = mask & padding_mask(attention_mask)
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return mask


def cached_attention_mask(length: int, max_length: int, cache_index: Array,
                          slot_mask: Array | None) -> Array:
  """Boolean [batch | 1, 1, length, max_length] for queries at slots cache_index + i.

  Args:
    length: the number of queries in this call.
    max_length: the number of cache slots.
    cache_index: the slot of the first query.
    slot_mask: [batch, max_length], 1 where a slot holds a real token, or None.
  """
  query_slot = cache_index + jnp.arange(length)
  mask = (jnp.arange(max_length)[None, :] <= query_slot[:, None])[None, None]
  if slot_mask is not None:
    mask = mask & padding_mask(slot_mask)
  return mask


# --- encoder self-attention --------------------------------------------------

class SelfAttention(nnx.Module):
  """Multi-head self-attention projections `query`, `key`, `value`.

  The output projection is left to the caller, because model families name
  and place it differently (BERT puts it with a LayerNorm in a sibling module).
  """

  def __init__(self, hidden_size: int, num_heads: int, *,
               head_dim: int | None = None, use_bias: bool = True,
               attention_dropout: float = 0.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32,
               kernel_init: layers.Initializer = layers.normal_init(layers.DEFAULT_INIT_STD),
               rngs: nnx.Rngs):
    if head_dim is None:
      if hidden_size % num_heads:
        raise UserError(f"hidden_size {hidden_size} is not a multiple of "
                        f"num_attention_heads {num_heads}.")
      head_dim = hidden_size // num_heads
    self.num_heads = num_heads
    self.head_dim = head_dim
    proj = functools.partial(layers.Linear, hidden_size, num_heads * head_dim,
                             use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                             kernel_init=kernel_init, axes=("embed", "heads"), rngs=rngs)
    self.query = proj()
    self.key = proj()
    self.value = proj()
    self.dropout = dropout.dropout(attention_dropout)

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


# --- decoders: KV cache and layer loop ---------------------------------------

def init_cache(num_layers: int, batch: int, max_length: int, kv_heads: int, head_dim: int,
               dtype: Dtype = jnp.float32) -> list[KVCache]:
  """Zeroed keys and values, [batch, max_length, kv_heads, head_dim], for each layer."""
  shape = (batch, max_length, kv_heads, head_dim)
  return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)]


def write_cache(cache: KVCache, k: Array, v: Array, cache_index: Array) -> KVCache:
  """The cache with this call's keys and values written from slot `cache_index` on."""
  start = (0, cache_index, 0, 0)
  return (jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start),
          jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start))


def run_decoder(blocks: Sequence[nnx.Module], input_ids: Array,
                embed: Callable[[Array, Array], Array], *, attention_mask: Array | None,
                positions: Array | None, segment_ids: Array | None, deterministic: bool,
                rngs: nnx.Rngs | None, options: stack.Options,
                cache: list[KVCache] | None = None, cache_index: Array | None = None
                ) -> tuple[Array, list[KVCache] | None]:
  """A causal decoder's blocks over its embedded tokens, with or without a KV cache.

  Args:
    blocks: each called as `block(x, positions, mask, *, deterministic, rngs,
      cache=None, cache_index=None) -> (x, its new cache or None)`.
    input_ids: [batch, length] token ids.
    embed: (input_ids, positions) -> the first block's input.
    attention_mask: without a cache, [batch, length] 1/0 padding; with one,
      [batch, max_length] over cache slots (1 where a slot holds a real
      token, this call's included).
    positions: [batch, length]; None means 0 .. length - 1.
    segment_ids: [batch, length] packed-document ids (no cache only), or None.
    deterministic: disables dropout.
    rngs: dropout randomness when not deterministic.
    options: how the blocks run without a cache (`stack.run`); a cached call
      (generation) always loops.
    cache: one (keys, values) per block; their tokens go to slots
      cache_index .. cache_index + length - 1.
    cache_index: the first cache slot of this call's tokens.

  Returns:
    (the last block's output, the new cache or None without one).
  """
  batch, length = input_ids.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  if cache is None:
    mask = attention_mask_4d(length, attention_mask, segment_ids)
  else:
    mask = cached_attention_mask(length, cache[0][0].shape[1], cache_index, attention_mask)
  x = embed(input_ids, positions)
  if cache is None:
    call = lambda block, h, block_rngs: block(h, positions, mask, deterministic=deterministic,
                                              rngs=block_rngs)[0]
    return stack.run(list(blocks), x, call, options=options, rngs=rngs), None
  new_cache = []
  for i, block in enumerate(blocks):
    x, block_cache = block(x, positions, mask, deterministic=deterministic, rngs=rngs,
                           cache=cache[i], cache_index=cache_index)
    new_cache.append(block_cache)
  return x, new_cache
