"""The pure, jittable train step, shared by every task.

The train state is a plain dict {"step", "params", "frozen", "opt_state"}: a
pytree that optax updates, `jax.jit` donates and Orbax saves without adapters.
`params` holds the trainable parameters, `frozen` the rest; only `params` is
differentiated and has optimizer state, so frozen layers cost no gradient
matmuls, no optimizer memory and no update.

A task plugs in through an `Objective`: how to call the model on a batch, the
summed loss of a batch, and how many loss units (examples, or tokens for a
language model) a batch holds. The loss of a step is the sum over the whole
global batch divided by its units, so gradient accumulation and packing do
not change it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxft.models import stack

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a task trains.

  Attributes:
    forward: (model, batch, deterministic, rngs) -> the model's outputs: float32
      logits, or whatever `loss_sums` reads (a causal LM's hidden states and
      output layer, tasks/causal_lm.py).
    loss_sums: (outputs, batch) -> (summed loss, {metric name: summed value}).
    units: batch -> how many loss units it holds (a float scalar).
  """
  forward: Callable[..., Any]
  loss_sums: Callable[[Any, dict], tuple[jax.Array, dict[str, jax.Array]]]
  units: Callable[[dict], jax.Array]


def init_state(params: nnx.State, frozen: nnx.State, tx: optax.GradientTransformation) -> State:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": frozen,
          "opt_state": tx.init(params)}


def model_outputs(objective: Objective, graphdef: nnx.GraphDef, params: nnx.State,
                  frozen: nnx.State, rest: nnx.State, batch: dict,
                  dropout_key: jax.Array | None) -> Any:
  """The model's outputs on `batch` (`objective.forward`); dropout on iff `dropout_key` is given."""
  model = nnx.merge(graphdef, stack.unstack_state(params), stack.unstack_state(frozen), rest)
  rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
  return objective.forward(model, batch, dropout_key is None, rngs)


def loss_and_grads(objective: Objective, graphdef, rest, params, frozen, batch, key,
                   units: jax.Array) -> tuple[jax.Array, dict, Any]:
  """(loss sum / units, metric sums / units, grads) of one (micro-)batch."""
  def loss_fn(p):
    total, sums = objective.loss_sums(
        model_outputs(objective, graphdef, p, frozen, rest, batch, key), batch)
    return total / units, jax.tree.map(lambda s: s / units, sums)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, metrics, grads


def train_step(state: State, batch: dict, *, objective: Objective, graphdef: nnx.GraphDef,
               rest: nnx.State, tx: optax.GradientTransformation, grad_accum: int,
               dropout_key: jax.Array) -> tuple[State, dict]:
  """One optimizer update on a global batch, split into `grad_accum` micro-batches.

  Every micro-batch divides its summed loss by the units of the whole batch,
  so the accumulated loss and gradients are those of the full batch.
  """
  params, frozen = state["params"], state["frozen"]
  key = jax.random.fold_in(dropout_key, state["step"])
  units = jnp.maximum(objective.units(batch), 1.0)  # An all-masked batch must not divide by 0.
  if grad_accum == 1:
    loss, metrics, grads = loss_and_grads(objective, graphdef, rest, params, frozen, batch, key,
                                          units)
  else:
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

    def accumulate(carry, xs):
      mb, i = xs
      out = loss_and_grads(objective, graphdef, rest, params, frozen, mb,
                           jax.random.fold_in(key, i), units)
      return jax.tree.map(jnp.add, carry, out), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: loss_and_grads(objective, graphdef, rest, params, frozen,
                               jax.tree.map(lambda x: x[0], micro), key, units)))
    (loss, metrics, grads), _ = jax.lax.scan(accumulate, zeros,
                                             (micro, jnp.arange(grad_accum)))
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
               "frozen": frozen, "opt_state": opt_state}
  return new_state, {"loss": loss, **metrics, "grad_norm": optax.tree_utils.tree_norm(grads)}
