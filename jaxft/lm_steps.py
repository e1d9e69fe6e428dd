"""Pure, jittable loss for causal-LM fine-tuning on packed or padded rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_loss_sum(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token losses over loss tokens, number of loss tokens).

  Position i predicts token i + 1 when that token carries loss and belongs to
  the same document (segment) as token i. Dividing the two sums over the whole
  global batch averages per token, not per row, so packing does not change
  the loss.
  """
  targets = batch["input_ids"][:, 1:]
  segments = batch["segment_ids"]
  valid = (batch["loss_mask"][:, 1:] & (segments[:, 1:] == segments[:, :-1])
           & (segments[:, 1:] != 0))
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
  return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid)
