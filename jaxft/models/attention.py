"""Attention for every jaxft model: the softmax kernel, its fused and TPU
(splash) alternatives, masks, q/k/v projections, and a decoder's KV cache and
layer loop.

Masks are boolean, True where attending is allowed, and broadcast against
[batch, heads, q_len, kv_len] scores; a decoder under `splash` passes a
`CausalSegments` instead, so that no L x L mask is ever built.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
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

# What `auto` means on each platform of a step's devices; any other (cpu): jaxft.
_AUTO = {"tpu": "splash", "gpu": "fused", "cuda": "fused", "rocm": "fused"}


def resolve(name: str, platform: str) -> str:
  """The implementation `name` (one of config.ATTENTION) means on devices of `platform`."""
  return _AUTO.get(platform, "jaxft") if name == "auto" else name


@contextlib.contextmanager
def attention_implementation(name: str) -> Iterator[None]:
  """While tracing inside this context, attention runs as `name` (one of config.ATTENTION).

  `jaxft`: einsum + softmax, with attention dropout. `fused`:
  jax.nn.dot_product_attention, which picks cuDNN's fused (flash) kernel on an
  NVIDIA GPU when dtype and shapes allow (bf16/fp16) and XLA's otherwise.
  `splash`: a decoder's causal self-attention runs the Pallas splash-attention
  kernel (TPU; interpreted elsewhere), every other attention `jaxft`'s.
  Neither `fused` nor `splash` has dropout, so layers that train with attention
  dropout keep `jaxft`. `auto`: by the platform of the active mesh's devices
  (`resolve`): splash on TPU, fused on GPU, jaxft on CPU.
  """
  if name not in config_lib.ATTENTION:
    raise ValueError(f"attention must be one of {config_lib.ATTENTION}, got {name!r}")
  token = _ATTENTION.set(name)
  try:
    yield
  finally:
    _ATTENTION.reset(token)


def _platform() -> str:
  """The platform the code being traced is for: the active mesh's, else the default backend."""
  active = sharding.active()
  return active[0].devices.flat[0].platform if active else jax.default_backend()


def current_implementation() -> str:
  """The implementation attention traced now runs as (`auto` resolved)."""
  name = _ATTENTION.get()
  return resolve(name, _platform()) if name == "auto" else name


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CausalSegments:
  """Causal self-attention within segments: the mask of `attention_mask_4d`, as ids.

  Attributes:
    ids: int32 [batch, length]; a query attends to the keys at or before it
      that carry its id. Padding has id 0, so real tokens never attend to it
      and a pad token attends to the pads before it (no row is empty).
  """
  ids: Array

  def dense(self) -> Array:
    """The boolean [batch, 1, length, length] mask (same rows for real tokens)."""
    pos = jnp.arange(self.ids.shape[1])
    causal = (pos[:, None] >= pos[None, :])[None, None]
    return causal & (self.ids[:, :, None] == self.ids[:, None, :])[:, None]


# What decoder layers pass through to `dot_product_attention`.
Mask = Array | CausalSegments


def causal_segments(batch: int, length: int, attention_mask: Array | None,
                    segment_ids: Array | None) -> CausalSegments:
  """The CausalSegments of a [batch, length] padding mask and packed-document ids."""
  if segment_ids is None:
    ids = jnp.ones((batch, length), jnp.int32)
  else:  # + 1: a document may have id 0, which padding takes.
    ids = jnp.broadcast_to(segment_ids.astype(jnp.int32) + 1, (batch, length))
  if attention_mask is not None:
    ids = jnp.where(attention_mask != 0, ids, 0)
  return CausalSegments(ids)


def dot_product_attention(query: Array, key: Array, value: Array,
                          mask: Array | CausalSegments | None, *,
                          dropout_layer: dropout.Dropout,
                          deterministic: bool,
                          rngs: nnx.Rngs | None) -> Array:
  """Softmax attention over [batch, length, heads, head_dim] inputs.

  Args:
    query: [batch, q_len, heads, head_dim].
    key, value: [batch, kv_len, kv_heads, head_dim]; kv_heads divides heads
      (grouped-query attention: query head h reads key head h // (heads /
      kv_heads), as repeating each key head that many times would give).
    mask: boolean [batch, 1 | heads, q_len | 1, kv_len], True where attending
      is allowed; None attends everywhere. Or CausalSegments (causal
      self-attention): splash runs its kernel on the ids, when it can (no
      dropout, a length of whole tiles); any other path builds the mask.
    dropout_layer: applied to the attention probabilities.
    deterministic: disables dropout.
    rngs: dropout randomness when not deterministic.

  Returns:
    [batch, q_len, heads, head_dim] in the dtype of `value`.
  """
  no_dropout = deterministic or dropout_layer.rate == 0.0
  implementation = current_implementation()
  if isinstance(mask, CausalSegments):
    if implementation == "splash" and no_dropout and _splash_block(query.shape[1]):
      return splash_attention(query, key, value, mask.ids).astype(value.dtype)
    mask = mask.dense()
  if implementation == "fused" and no_dropout:
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


# --- splash attention (Pallas TPU kernel) ------------------------------------

def _splash_block(length: int) -> int | None:
  """The kernel's tile along both sequences for `length`, or None where it cannot run.

  The kernel needs tiles that divide the length and are multiples of 128 (a
  TPU vreg's lanes); 512 is the largest MaxText uses by default. A length
  that 128 does not divide leaves attention to the jaxft path with a dense mask.
  """
  return next((b for b in (512, 256, 128) if length % b == 0), None)


def splash_attention(query: Array, key: Array, value: Array, ids: Array) -> Array:
  """Causal self-attention within segments by the splash kernel, per device of the mesh.

  Args:
    query: [batch, length, heads, head_dim]; 128 divides length.
    key, value: [batch, length, kv_heads, head_dim]; kv_heads divides heads.
    ids: int32 [batch, length] segment ids (`CausalSegments.ids`).

  Returns:
    [batch, length, heads, head_dim] in the dtype of `query`.
  """
  active = sharding.active()
  if active is None:
    return _splash_local(query, key, value, ids, interpret=jax.default_backend() != "tpu")
  mesh, rules = active
  q_spec = sharding.spec(("batch", None, "heads", None), query.shape, mesh, rules)
  kv_spec = sharding.spec(("batch", None, "heads", None), key.shape, mesh, rules)
  if kv_spec[2] != q_spec[2]:
    # Key heads that do not split like the query heads: give every query head
    # its own, so that each device holds the key heads of its query heads.
    groups = query.shape[2] // key.shape[2]
    key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
    kv_spec = q_spec
  local = functools.partial(_splash_local, interpret=mesh.devices.flat[0].platform != "tpu")
  ids_spec = jax.sharding.PartitionSpec(q_spec[0], None)
  # check_vma off: the kernel's pallas_call does not track varying mesh axes.
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids_spec),
                       out_specs=q_spec, check_vma=False)(query, key, value, ids)


def _splash_local(query: Array, key: Array, value: Array, ids: Array, *,
                  interpret: bool) -> Array:
  """`splash_attention` on one device's arrays (interpreted off TPU: slow, for tests)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as splash, splash_attention_mask as splash_mask)
  length, heads, head_dim = query.shape[1:]
  b = _splash_block(length)
  blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                             block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                             block_kv_dq=b)
  # One causal mask per head (the kernel stores one copy): the segment ids
  # make it block-diagonal. With kv_heads < heads the kernel reads key head
  # h // (heads / kv_heads) for query head h, as the jaxft path does.
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * heads)
  kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
  # The kernel has no scale; its softmax statistics are float32 whatever the inputs.
  query = query * jnp.asarray(head_dim ** -0.5, query.dtype)
  per_example = lambda q, k, v, i: kernel(q, k, v, segment_ids=splash.SegmentIds(i, i))
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)
  out = jax.vmap(per_example)(heads_major(query), heads_major(key), heads_major(value), ids)
  return heads_major(out)


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


def causal_self_attention_mask(batch: int, length: int, attention_mask: Array | None,
                               segment_ids: Array | None) -> Array | CausalSegments:
  """A decoder's mask without a cache: `attention_mask_4d`, or its ids under splash.

  The splash kernel reads segment ids, so under it no L x L mask is built.
  """
  if current_implementation() == "splash":
    return causal_segments(batch, length, attention_mask, segment_ids)
  return attention_mask_4d(length, attention_mask, segment_ids)


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
    mask = causal_self_attention_mask(batch, length, attention_mask, segment_ids)
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
