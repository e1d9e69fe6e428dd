"""Decoder-only causal LMs of the Llama family: Llama, Mistral, Qwen2, Qwen3.

Param paths are transformers' module names (`model/layers/3/self_attn/q_proj/
kernel`, `model/embed_tokens/embedding`, `lm_head/kernel`), so checkpoints
load by name. One attention implementation serves them all: grouped-query
heads, RoPE (`default`, `linear`, `llama3`, `yarn`, `dynamic`), optional
q/k/v/o biases (Qwen2: q/k/v), optional per-head q/k RMSNorm (Qwen3), a causal
mask combined with padding and segment ids (packed documents never attend
across each other).

  model(input_ids, attention_mask=None, positions=None, segment_ids=None, *,
        deterministic=True, rngs=None) -> float32 logits [batch, length, vocab]
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import sharding
from jaxft.errors import UserError
from jaxft.models import attention
from jaxft.models import dropout
from jaxft.models import layers
from jaxft.models import naming
from jaxft.models import rope
from jaxft.models import stack

Array = jax.Array
Dtype = Any


def rope_parameters(config: Any) -> dict[str, Any]:
  """transformers 5's `rope_parameters`, or 4.x's `rope_theta` + `rope_scaling`."""
  params = getattr(config, "rope_parameters", None)
  if params:
    return dict(params)
  return {**(getattr(config, "rope_scaling", None) or {}),
          "rope_theta": getattr(config, "rope_theta", 10000.0)}


def head_dim(config: Any) -> int:
  return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE: `q_proj`, `k_proj`, `v_proj`, `o_proj`."""

  def __init__(self, config: Any, *, qkv_bias: bool, o_bias: bool, qk_norm: bool,
               dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.num_heads = config.num_attention_heads
    self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
    if self.num_heads % self.num_kv_heads:
      raise UserError(f"num_attention_heads {self.num_heads} is not a multiple of "
                      f"num_key_value_heads {self.num_kv_heads}")
    self.head_dim = head_dim(config)
    rope_params = rope_parameters(config)
    max_positions = getattr(config, "max_position_embeddings", None)
    # A tuple, not an array: nnx would make an array attribute state, and an
    # abstract (eval_shape) build, as a checkpoint restore uses, would lose it.
    self.rope_inv_freq = tuple(
        float(f) for f in rope.rope_inverse_frequencies(rope_params, self.head_dim, max_positions))
    self.rope_attention_scaling = rope.rope_attention_scaling(rope_params, max_positions)
    self.rope_dynamic = rope.dynamic_rope_settings(rope_params, max_positions)
    init = layers.normal_init(config.initializer_range)
    linear = functools.partial(layers.Linear, dtype=dtype, param_dtype=param_dtype,
                               kernel_init=init, rngs=rngs)
    hidden, q_dim, kv_dim = (config.hidden_size, self.num_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim)
    self.q_proj = linear(hidden, q_dim, use_bias=qkv_bias, axes=("embed", "heads"))
    self.k_proj = linear(hidden, kv_dim, use_bias=qkv_bias, axes=("embed", "heads"))
    self.v_proj = linear(hidden, kv_dim, use_bias=qkv_bias, axes=("embed", "heads"))
    self.o_proj = linear(q_dim, hidden, use_bias=o_bias, axes=("heads", "embed"))
    norm = functools.partial(layers.RMSNorm, self.head_dim, epsilon=config.rms_norm_eps,
                             dtype=dtype, param_dtype=param_dtype)
    self.q_norm = norm() if qk_norm else None
    self.k_norm = norm() if qk_norm else None
    self.dropout = dropout.dropout(getattr(config, "attention_dropout", 0.0))

  @property
  def inv_freq(self) -> np.ndarray:
    """The static RoPE inverse frequencies (float32)."""
    return np.asarray(self.rope_inv_freq, np.float32)

  def rope_frequencies(self, positions: Array) -> np.ndarray | Array:
    """RoPE inverse frequencies for this call: static, or dynamic-NTK's from `positions`."""
    if self.rope_dynamic is None:
      return self.inv_freq
    return rope.dynamic_rope_inverse_frequencies(positions, self.inv_freq, self.rope_dynamic)

  def __call__(self, x: Array, positions: Array, mask: attention.Mask, *, deterministic: bool,
               rngs: nnx.Rngs | None, cache: attention.KVCache | None = None,
               cache_index: Array | None = None) -> tuple[Array, attention.KVCache | None]:
    """With a cache, writes this call's keys/values at `cache_index` and attends
    over the whole cache (`mask` then covers cache slots)."""
    batch, length, _ = x.shape
    kw = dict(deterministic=deterministic, rngs=rngs)
    q = self.q_proj(x, **kw).reshape(batch, length, self.num_heads, self.head_dim)
    k = self.k_proj(x, **kw).reshape(batch, length, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x, **kw).reshape(batch, length, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = self.rope_frequencies(positions)
    q = rope.apply_rope(q, positions, inv_freq, self.rope_attention_scaling)
    k = rope.apply_rope(k, positions, inv_freq, self.rope_attention_scaling)
    if cache is not None:
      cache = attention.write_cache(cache, k, v, cache_index)
      k, v = cache
    context = attention.dot_product_attention(q, k, v, mask, dropout_layer=self.dropout, **kw)
    context = context.reshape(batch, length, self.num_heads * self.head_dim)
    context = sharding.constrain(context, ("batch", "length", "heads"))
    return self.o_proj(context, **kw), cache


class MLP(nnx.Module):
  """down_proj(act(gate_proj(x)) * up_proj(x))."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    bias = getattr(config, "mlp_bias", False)
    linear = functools.partial(layers.Linear, use_bias=bias, dtype=dtype,
                               param_dtype=param_dtype,
                               kernel_init=layers.normal_init(config.initializer_range),
                               rngs=rngs)
    self.gate_proj = linear(config.hidden_size, config.intermediate_size, axes=("embed", "mlp"))
    self.up_proj = linear(config.hidden_size, config.intermediate_size, axes=("embed", "mlp"))
    self.down_proj = linear(config.intermediate_size, config.hidden_size, axes=("mlp", "embed"))
    self.act = layers.activation(config.hidden_act)

  def __call__(self, x: Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> Array:
    kw = dict(deterministic=deterministic, rngs=rngs)
    hidden = self.act(self.gate_proj(x, **kw)) * self.up_proj(x, **kw)
    hidden = sharding.constrain(hidden, ("batch", "length", "mlp"))
    return self.down_proj(hidden, **kw)


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: Any, *, family: dict[str, bool], dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.self_attn = Attention(config, **family, rngs=rngs, **kw)
    self.mlp = MLP(config, rngs=rngs, **kw)
    norm = functools.partial(layers.RMSNorm, config.hidden_size, epsilon=config.rms_norm_eps,
                             axes=("embed",), **kw)
    self.input_layernorm = norm()
    self.post_attention_layernorm = norm()

  def __call__(self, x: Array, positions: Array, mask: attention.Mask, *, deterministic: bool,
               rngs: nnx.Rngs | None, cache: attention.KVCache | None = None,
               cache_index: Array | None = None) -> tuple[Array, attention.KVCache | None]:
    kw = dict(deterministic=deterministic, rngs=rngs)
    attn, cache = self.self_attn(self.input_layernorm(x), positions, mask, cache=cache,
                                 cache_index=cache_index, **kw)
    x = x + attn
    x = x + self.mlp(self.post_attention_layernorm(x), **kw)
    return sharding.constrain(x, ("batch", "length", "embed")), cache


class DecoderModel(nnx.Module):
  """`embed_tokens`, `layers`, `norm`."""

  def __init__(self, config: Any, *, family: dict[str, bool], dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    self.embed_tokens = layers.Embed(
        config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
        embedding_init=layers.normal_init(config.initializer_range), rngs=rngs)
    self.layers = nnx.List([
        DecoderLayer(config, family=family, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.num_hidden_layers)])
    self.stack_options = stack.Options()
    self.norm = layers.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, dtype=dtype,
                               param_dtype=param_dtype, axes=("embed",))

  def __call__(self, input_ids: Array, attention_mask: Array | None, positions: Array | None,
               segment_ids: Array | None, *, deterministic: bool,
               rngs: nnx.Rngs | None, cache: list[attention.KVCache] | None = None,
               cache_index: Array | None = None) -> tuple[Array, list[attention.KVCache] | None]:
    x, cache = attention.run_decoder(
        self.layers, input_ids, lambda ids, _: self.embed_tokens(ids),
        attention_mask=attention_mask, positions=positions, segment_ids=segment_ids,
        deterministic=deterministic, rngs=rngs, options=self.stack_options, cache=cache,
        cache_index=cache_index)
    return self.norm(x), cache


class CausalLM(nnx.Module):
  """`model` + `lm_head` (absent with tied embeddings: logits = h @ embed_tokens.T)."""

  # Per family: biases and q/k norms that config.json does not spell out.
  FAMILY: dict[str, Any] = {}

  def __init__(self, config: Any, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    family = {k: (f(config) if callable(f) else f) for k, f in self.FAMILY.items()}
    self.model = DecoderModel(config, family=family, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
    self.lm_head = None if getattr(config, "tie_word_embeddings", False) else layers.Linear(
        config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
        param_dtype=param_dtype, kernel_init=layers.normal_init(config.initializer_range),
        axes=("embed", "vocab"), rngs=rngs)

  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               positions: Array | None = None, segment_ids: Array | None = None, *,
               deterministic: bool = True, rngs: nnx.Rngs | None = None,
               cache: list[attention.KVCache] | None = None, cache_index: Array | None = None,
               hidden_only: bool = False):
    """float32 logits [batch, length, vocab]; with `cache`, (logits, new cache).

    With a cache, `attention_mask` is [batch, max_length] over cache slots
    (1 where a slot holds a real token, including this call's) and this call's
    tokens go to slots cache_index .. cache_index + length - 1. `hidden_only`
    (no cache) returns the final hidden states instead, for `output_layer`.
    """
    hidden, cache = self.model(input_ids, attention_mask, positions, segment_ids,
                               deterministic=deterministic, rngs=rngs, cache=cache,
                               cache_index=cache_index)
    if hidden_only:
      return hidden
    if self.lm_head is None:
      logits = self.model.embed_tokens.attend(hidden).astype(jnp.float32)
    else:
      logits = self.lm_head(hidden, deterministic=deterministic, rngs=rngs).astype(jnp.float32)
    return logits if cache is None else (logits, cache)

  def output_layer(self) -> layers.OutputLayer | None:
    """The output weight for jaxft.tasks.lm_loss (None with a LoRA adapter on lm_head)."""
    return layers.output_layer(self.lm_head, self.model.embed_tokens)

  def init_cache(self, batch: int, max_length: int,
                 dtype: Any = jnp.float32) -> list[attention.KVCache]:
    """Zeroed keys and values for every layer."""
    attn = self.model.layers[0].self_attn
    return attention.init_cache(len(self.model.layers), batch, max_length, attn.num_kv_heads,
                                attn.head_dim, dtype)


class LlamaForCausalLM(CausalLM):
  FAMILY = {"qkv_bias": lambda c: bool(getattr(c, "attention_bias", False)),
            "o_bias": lambda c: bool(getattr(c, "attention_bias", False)),
            "qk_norm": False}


class MistralForCausalLM(LlamaForCausalLM):
  """Llama's layout; sliding-window attention equals full attention up to the window."""


class Qwen2ForCausalLM(CausalLM):
  FAMILY = {"qkv_bias": True, "o_bias": False, "qk_norm": False}


class Qwen3ForCausalLM(CausalLM):
  FAMILY = {"qkv_bias": lambda c: bool(getattr(c, "attention_bias", False)),
            "o_bias": lambda c: bool(getattr(c, "attention_bias", False)),
            "qk_norm": True}


# transformers' causal LM checkpoints name params exactly as our paths (no
# base-model prefix to add or strip: `model.` is part of the path).
CAUSAL_LM_CHECKPOINT = naming.CheckpointLayout(prefix="", head_modules=("lm_head",))
