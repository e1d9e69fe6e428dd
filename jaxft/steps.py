"""Pure, jittable train and eval steps for classification.

The train state is a plain dict {"step", "params", "frozen", "opt_state"}: a
pytree that optax updates, `jax.jit` donates and Orbax saves without adapters.
`params` holds the trainable parameters, `frozen` the rest; only `params` is
differentiated and has optimizer state, so frozen layers cost no gradient
matmuls, no optimizer memory and no update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

State = dict[str, Any]


def init_state(params: nnx.State, frozen: nnx.State, tx: optax.GradientTransformation) -> State:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": frozen,
          "opt_state": tx.init(params)}


def _logits(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, rest: nnx.State,
            batch: dict, dropout_key: jax.Array | None) -> jax.Array:
  model = nnx.merge(graphdef, params, frozen, rest)
  rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
  return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
               deterministic=dropout_key is None, rngs=rngs)


def _loss_and_grads(graphdef, rest, params, frozen, batch, key):
  def loss_fn(p):
    logits = _logits(graphdef, p, frozen, rest, batch, key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, acc, grads


def train_step(state: State, batch: dict, *, graphdef: nnx.GraphDef, rest: nnx.State,
               tx: optax.GradientTransformation, grad_accum: int,
               dropout_key: jax.Array) -> tuple[State, dict]:
  """One optimizer update on a global batch, split into `grad_accum` micro-batches.

  Micro-batches have equal size, so the mean of their mean losses (and grads)
  equals the full-batch mean.
  """
  params, frozen = state["params"], state["frozen"]
  key = jax.random.fold_in(dropout_key, state["step"])
  if grad_accum == 1:
    loss, acc, grads = _loss_and_grads(graphdef, rest, params, frozen, batch, key)
  else:
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

    def accumulate(carry, xs):
      mb, i = xs
      out = _loss_and_grads(graphdef, rest, params, frozen, mb, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, carry, out), None

    zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
    total, _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum)))
    loss, acc, grads = jax.tree.map(lambda x: x / grad_accum, total)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
               "frozen": frozen, "opt_state": opt_state}
  return new_state, {"loss": loss, "accuracy": acc, "grad_norm": optax.tree_utils.tree_norm(grads)}


def eval_step(params: nnx.State, frozen: nnx.State, batch: dict, *, graphdef: nnx.GraphDef,
              rest: nnx.State) -> tuple[jax.Array, jax.Array]:
  """Per-example loss and predicted class, dropout off."""
  logits = _logits(graphdef, params, frozen, rest, batch, None)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return losses, jnp.argmax(logits, -1)
