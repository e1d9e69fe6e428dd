"""GPT-2 (`GPT2LMHeadModel`): learned positions, fused qkv, pre-LayerNorm, tied head.

Paths mirror transformers' (`transformer/h/3/attn/c_attn/kernel`); GPT-2's
Conv1D weights are already (in, out), so kernels load without a transpose.
Same call and KV-cache interface as `llama.CausalLM`, so `jaxft.generate`
serves both.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import sharding
from jaxft.models import attention
from jaxft.models import dropout
from jaxft.models import layers
from jaxft.models import naming
from jaxft.models import stack

Array = jax.Array


class Attention(nnx.Module):
  """`c_attn` (q, k, v fused) and `c_proj`."""

  def __init__(self, config: Any, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.num_heads = config.n_head
    self.head_dim = config.n_embd // config.n_head
    linear = functools.partial(layers.Linear, dtype=dtype, param_dtype=param_dtype,
                               kernel_init=layers.normal_init(config.initializer_range),
                               rngs=rngs)
    self.c_attn = linear(config.n_embd, 3 * config.n_embd, axes=("embed", "heads"))
    self.c_proj = linear(config.n_embd, config.n_embd, axes=("heads", "embed"))
    self.dropout = dropout.dropout(config.attn_pdrop)
    self.resid_dropout = dropout.dropout(config.resid_pdrop)

  def __call__(self, x: Array, mask: attention.Mask, *, deterministic: bool, rngs: nnx.Rngs | None,
               cache: attention.KVCache | None = None, cache_index: Array | None = None):
    batch, length, dim = x.shape
    kw = dict(deterministic=deterministic, rngs=rngs)
    q, k, v = jnp.split(self.c_attn(x, **kw), 3, axis=-1)
    split = lambda y: y.reshape(batch, length, self.num_heads, self.head_dim)
    q, k, v = split(q), split(k), split(v)
    if cache is not None:
      cache = attention.write_cache(cache, k, v, cache_index)
      k, v = cache
    context = attention.dot_product_attention(q, k, v, mask, dropout_layer=self.dropout, **kw)
    context = sharding.constrain(context.reshape(batch, length, dim),
                                 ("batch", "length", "heads"))
    return self.resid_dropout(self.c_proj(context, **kw), **kw), cache


class MLP(nnx.Module):
  """`c_fc`, activation, `c_proj`."""

  def __init__(self, config: Any, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    inner = config.n_inner or 4 * config.n_embd
    linear = functools.partial(layers.Linear, dtype=dtype, param_dtype=param_dtype,
                               kernel_init=layers.normal_init(config.initializer_range),
                               rngs=rngs)
    self.c_fc = linear(config.n_embd, inner, axes=("embed", "mlp"))
    self.c_proj = linear(inner, config.n_embd, axes=("mlp", "embed"))
    self.act = layers.activation(config.activation_function)
    self.dropout = dropout.dropout(config.resid_pdrop)

  def __call__(self, x: Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> Array:
    kw = dict(deterministic=deterministic, rngs=rngs)
    hidden = sharding.constrain(self.act(self.c_fc(x, **kw)), ("batch", "length", "mlp"))
    return self.dropout(self.c_proj(hidden, **kw), **kw)


class Block(nnx.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, config: Any, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    norm = functools.partial(layers.LayerNorm, config.n_embd,
                             epsilon=config.layer_norm_epsilon, axes=("embed",), **kw)
    self.ln_1 = norm()
    self.attn = Attention(config, rngs=rngs, **kw)
    self.ln_2 = norm()
    self.mlp = MLP(config, rngs=rngs, **kw)

  def __call__(self, x, positions, mask, *, deterministic, rngs, cache=None, cache_index=None):
    """`positions` are unused: they were added at the embedding (`wpe`)."""
    del positions
    attn, cache = self.attn(self.ln_1(x), mask, deterministic=deterministic, rngs=rngs,
                            cache=cache, cache_index=cache_index)
    x = x + attn
    x = x + self.mlp(self.ln_2(x), deterministic=deterministic, rngs=rngs)
    return sharding.constrain(x, ("batch", "length", "embed")), cache


class Transformer(nnx.Module):
  """`wte`, `wpe`, `h`, `ln_f`."""

  def __init__(self, config: Any, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    init = layers.normal_init(config.initializer_range)
    self.wte = layers.Embed(config.vocab_size, config.n_embd, embedding_init=init, rngs=rngs,
                            **kw)
    self.wpe = layers.Embed(config.n_positions, config.n_embd, embedding_init=init,
                            axes=(None, "embed"), rngs=rngs, **kw)
    self.drop = dropout.dropout(config.embd_pdrop)
    self.h = nnx.List([Block(config, rngs=rngs, **kw) for _ in range(config.n_layer)])
    self.stack_options = stack.Options()
    self.ln_f = layers.LayerNorm(config.n_embd, epsilon=config.layer_norm_epsilon,
                                 axes=("embed",), **kw)


class GPT2LMHeadModel(nnx.Module):
  """GPT-2 with the output layer tied to `transformer.wte`."""

  def __init__(self, config: Any, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.transformer = Transformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               positions: Array | None = None, segment_ids: Array | None = None, *,
               deterministic: bool = True, rngs: nnx.Rngs | None = None,
               cache: list[attention.KVCache] | None = None, cache_index: Array | None = None,
               hidden_only: bool = False):
    """As `llama.CausalLM.__call__`."""
    t = self.transformer
    embed = lambda ids, positions: t.drop(t.wte(ids) + t.wpe(positions),
                                          deterministic=deterministic, rngs=rngs)
    x, cache = attention.run_decoder(
        t.h, input_ids, embed, attention_mask=attention_mask, positions=positions,
        segment_ids=segment_ids, deterministic=deterministic, rngs=rngs,
        options=t.stack_options, cache=cache, cache_index=cache_index)
    hidden = t.ln_f(x)
    if hidden_only:
      return hidden
    logits = t.wte.attend(hidden).astype(jnp.float32)
    return logits if cache is None else (logits, cache)

  def output_layer(self) -> layers.OutputLayer:
    """The tied output weight for jaxft.tasks.lm_loss."""
    return layers.output_layer(None, self.transformer.wte)

  def init_cache(self, batch: int, max_length: int,
                 dtype: Any = jnp.float32) -> list[attention.KVCache]:
    """Zeroed keys and values for every block."""
    attn = self.transformer.h[0].attn
    return attention.init_cache(len(self.transformer.h), batch, max_length, attn.num_heads,
                                attn.head_dim, dtype)


# Conv1D weights are stored (in, out), like our kernels: no transpose.
GPT2_CHECKPOINT = naming.CheckpointLayout(prefix="", head_modules=("lm_head",), rules={
    "torch": (naming.NameRule(r"(.*)/scale", r"\1/weight"),
              naming.NameRule(r"(.*)/kernel", r"\1/weight"),
              naming.NameRule(r"(.*)/embedding", r"\1/weight"),
              naming.NameRule(r"(.*)/bias", r"\1/bias")),
    "flax": naming.FLAX_RULES})
