"""Per-token log-probs of a causal LM on its own rows: what preference and RL losses read.

SFT needs only the summed loss; DPO and GRPO need each response's log-probs
apart, per row or per token. Both read the final hidden states through
`lm_loss`, a chunk of positions at a time, where the output layer is one matrix.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxft.tasks import causal_lm
from jaxft.tasks import lm_loss


def token_logps(model: Any, rows: dict, deterministic: bool = True,
                rngs: Any = None) -> jax.Array:
  """float32 [rows, length - 1]: log p(token i + 1 | tokens ..i) at position i.

  `rows` holds `input_ids`, `positions`, `segment_ids` and `loss_mask`
  [rows, length] (tasks/causal_lm.py's layout); positions that are not loss
  targets (`causal_lm.loss_targets`) are 0. When the output layer is one
  matrix, the log-probs come from the final hidden states chunk by chunk
  (`lm_loss.token_logps`), never the whole float32 logits.
  """
  output = model.output_layer()
  call = functools.partial(model, rows["input_ids"], None, rows["positions"],
                           rows["segment_ids"], deterministic=deterministic, rngs=rngs)
  targets = rows["input_ids"][:, 1:]
  if output is None:
    logps = logps_at(call()[:, :-1], targets)
  else:
    # Position i predicts token i + 1; the last position predicts nothing.
    logps = lm_loss.token_logps(call(hidden_only=True), output,
                                jnp.pad(targets, ((0, 0), (0, 1))))[:, :-1]
  return jnp.where(causal_lm.loss_targets(rows), logps, 0.0)


def logps_at(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """float32 log p(token) [B, T] from logits [B, T, V] that already predict `tokens` [B, T]."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)

