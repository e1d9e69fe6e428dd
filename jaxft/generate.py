"""Text generation for causal LMs: one jitted program, prefill then a decode scan.

The KV cache is preallocated for prompt + new tokens, so each decode step
costs the same whatever the position. Prompts are left-padded (the last
prompt column is a real token of every row); positions count real tokens only,
as transformers' `generate` does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen: temperature 0 is greedy (argmax).

  Attributes:
    temperature: softmax temperature; 0 for greedy.
    top_k: keep only the k most likely tokens (0: all).
    top_p: keep the smallest set of tokens whose probability reaches p (1: all).
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0


def next_token(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """[batch, vocab] float32 logits -> [batch] int32 tokens."""
  if sampling.temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Drop a token once the ones before it already reach top_p.
    drop_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) >= sampling.top_p
    drop = jnp.zeros_like(drop_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
              attention_mask: jax.Array, key: jax.Array, eos_ids: jax.Array, *,
              max_new_tokens: int, sampling: Sampling) -> jax.Array:
  model = nnx.merge(graphdef, state)
  batch, prompt_len = input_ids.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  slots = jnp.concatenate(
      [attention_mask.astype(jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.int32)], 1)
  positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)
  logits, cache = model(input_ids, slots, positions, cache=cache, cache_index=0)

  def step(carry, i):
    cache, slots, last, position, done, key = carry
    key, sub = jax.random.split(key)
    token = next_token(last, sub, sampling)
    token = jnp.where(done, eos_ids[0], token)
    done = done | jnp.isin(token, eos_ids)
    slot = prompt_len + i
    slots = slots.at[:, slot].set(1)
    logits, cache = model(token[:, None], slots, position[:, None], cache=cache,
                          cache_index=slot)
    return (cache, slots, logits[:, -1], position + 1, done, key), token

  init = (cache, slots, logits[:, -1], positions[:, -1] + 1,
          jnp.zeros((batch,), bool), key)
  _, tokens = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
  return tokens.T


def generate(model: nnx.Module, input_ids: np.ndarray, attention_mask: np.ndarray, *,
             max_new_tokens: int, eos_ids: Sequence[int], sampling: Sampling = Sampling(),
             seed: int = 0) -> np.ndarray:
  """New tokens [batch, max_new_tokens] for left-padded prompts.

  After a row emits one of `eos_ids` it repeats the first EOS id; callers cut
  each row at its first EOS.
  """
  graphdef, state = nnx.split(model)
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  return np.asarray(_generate(graphdef, state, jnp.asarray(input_ids, jnp.int32),
                              jnp.asarray(attention_mask, jnp.int32), jax.random.key(seed),
                              eos, max_new_tokens=max_new_tokens, sampling=sampling))


def prompts_to_ids(tokenizer, prompts: Sequence[str],
                   pad_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded token ids and mask for a batch of prompt texts."""
  tokenizer.padding_side = "left"
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  enc = tokenizer(list(prompts), padding=True, return_tensors="np", add_special_tokens=False,
                  pad_to_multiple_of=pad_multiple if pad_multiple > 1 else None)
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def complete(model: nnx.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
             sampling: Sampling = Sampling(), stop: Sequence[str] = (),
             seed: int = 0, pad_multiple: int = 1) -> list[str]:
  """Generated text for each prompt, cut at EOS and at the first stop string.

  `pad_multiple` rounds the padded prompt length up (fewer distinct shapes to
  compile when many batches are generated).
  """
  ids, mask = prompts_to_ids(tokenizer, prompts, pad_multiple)
  eos = tokenizer.eos_token_id
  tokens = generate(model, ids, mask, max_new_tokens=max_new_tokens,
                    eos_ids=[] if eos is None else [eos], sampling=sampling, seed=seed)
  return [cut_at_stop(decode(tokenizer, row), stop) for row in tokens]


def decode(tokenizer, tokens: np.ndarray) -> str:
  """The text of one row of `generate`'s new tokens, up to its first EOS."""
  eos = tokenizer.eos_token_id
  if eos is not None and (tokens == eos).any():
    tokens = tokens[:int(np.argmax(tokens == eos))]
  return tokenizer.decode(tokens, skip_special_tokens=True)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """`text` up to the first stop string found after its leading whitespace.

  A reply that opens with a blank line is not cut to nothing by a "\n" stop.
  """
  start = len(text) - len(text.lstrip())
  cuts = [text.index(s, start) for s in stop if s and s in text[start:]]
  return text[:min(cuts)] if cuts else text


def chat_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> str:
  """The conversation rendered by the tokenizer's chat template, ready for the reply."""
  if not getattr(tokenizer, "chat_template", None):
    from jaxft.errors import UserError  # pylint: disable=g-import-not-at-top
    raise UserError("this model's tokenizer has no chat template; use jaxft generate")
  return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
