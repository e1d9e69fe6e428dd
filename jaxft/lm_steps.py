"""Pure, jittable loss and eval step for causal-LM fine-tuning on packed or padded rows.

A row holds one or more documents: `segment_ids` (1, 2, ... per document, 0 on
padding) keep attention inside a document and `positions` restart at 0 in
each; `loss_mask` marks the tokens to learn (the assistant's, by default).
"""

from __future__ import annotations

import functools
from typing import Union

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxft import lm_loss
from jaxft import steps
from jaxft.models import layers


# The logits [batch, length, vocab], or (final hidden states, output layer)
# when the output layer is one matrix: lm_loss then never holds the logits.
Outputs = Union[jax.Array, tuple[jax.Array, layers.OutputLayer]]


def loss_targets(batch: dict) -> jax.Array:
  """Bool [batch, length - 1]: position i is scored on predicting token i + 1.

  True when token i + 1 carries loss and belongs to the same (non-padding)
  document as token i.
  """
  segments = batch["segment_ids"]
  return (batch["loss_mask"][:, 1:].astype(bool) & (segments[:, 1:] == segments[:, :-1])
          & (segments[:, 1:] != 0))


def token_loss_sum(outputs: Outputs, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token losses over loss tokens, number of loss tokens).

  `outputs` is what `_forward` returned: logits, or hidden states + output
  layer. Dividing the two sums over the whole global batch averages per
  token, not per row, so packing does not change the loss.
  """
  valid = loss_targets(batch)
  targets = batch["input_ids"][:, 1:]
  if isinstance(outputs, tuple):
    hidden, output = outputs
    # Position i predicts token i + 1; the last position predicts nothing.
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 1)))
    total = lm_loss.loss_sum(hidden, output, pad(targets), pad(valid))
  else:
    losses = optax.softmax_cross_entropy_with_integer_labels(outputs[:, :-1], targets)
    total = jnp.sum(jnp.where(valid, losses, 0.0))
  return total, jnp.sum(valid)


def _forward(model, batch, deterministic, rngs) -> Outputs:
  output = model.output_layer()
  call = functools.partial(model, batch["input_ids"], None, batch["positions"],
                           batch["segment_ids"], deterministic=deterministic, rngs=rngs)
  return call() if output is None else (call(hidden_only=True), output)


CAUSAL_LM = steps.Objective(
    forward=_forward,
    loss_sums=lambda outputs, batch: (token_loss_sum(outputs, batch)[0], {}),
    units=lambda batch: jnp.sum(loss_targets(batch)).astype(jnp.float32))


def eval_step(params: nnx.State, frozen: nnx.State, batch: dict, *, graphdef: nnx.GraphDef,
              rest: nnx.State) -> tuple[jax.Array, jax.Array]:
  """(summed loss, loss tokens) of a batch, dropout off."""
  outputs = steps.model_outputs(CAUSAL_LM, graphdef, params, frozen, rest, batch, None)
  total, count = token_loss_sum(outputs, batch)
  return total, count.astype(jnp.float32)
