"""Per-token log-probs of a causal LM on its own rows: what preference and RL losses read.

SFT needs only the summed loss (`lm_loss` never holds the logits); DPO and
GRPO need each response's log-probs apart, per row or per token, so these
compute the float32 logits of the rows and gather the target tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxft.tasks import causal_lm


def token_logps(model: Any, rows: dict, deterministic: bool = True,
                rngs: Any = None) -> jax.Array:
  """float32 [rows, length - 1]: log p(token i + 1 | tokens ..i) at position i.

  `rows` holds `input_ids`, `positions`, `segment_ids` and `loss_mask`
  [rows, length] (tasks/causal_lm.py's layout); positions that are not loss
  targets (`causal_lm.loss_targets`) are 0.
  """
  logits = model(rows["input_ids"], None, rows["positions"], rows["segment_ids"],
                 deterministic=deterministic, rngs=rngs)[:, :-1]
  logps = logps_at(logits, rows["input_ids"][:, 1:])
  return jnp.where(causal_lm.loss_targets(rows), logps, 0.0)


def logps_at(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """float32 log p(token) [B, T] from logits [B, T, V] that already predict `tokens` [B, T]."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)

