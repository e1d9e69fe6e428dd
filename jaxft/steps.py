"""The pure, jittable train step, shared by every task.

The train state is a plain dict {"step", "params", "frozen", "stats",
"opt_state", "skip"}: a pytree that optax updates, `jax.jit` donates and Orbax
saves without adapters. `params` holds the trainable parameters, `frozen` the
rest; only `params` is differentiated and has optimizer state, so frozen
layers cost no gradient matmuls, no optimizer memory and no update. `stats`
holds the model's BatchNorm running statistics (`nnx.BatchStat`; empty for
models without BatchNorm): not differentiated, but updated by every train
forward as PyTorch's `model.train()` does, so they are state that moves with
the step, checkpoints and resumes, unlike the constants in `rest`.

A step whose loss or gradient norm is not finite (or, with `skip_spikes`, whose
loss is a spike over the running median) is skipped inside the step: params
and optimizer state stay bitwise as they were, only `step` and the counters
in `skip` (`init_skip`) move on. The counters live in the state so that they
are checkpointed, resume exactly and cost no host sync; the loop reads them
where it already waits for the device (train.py).

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

# Accepted losses the running median of `skip_spikes` looks back on, and how many
# must be in before any step counts as a spike: a median of fewer is noise.
SPIKE_WINDOW = 32
SPIKE_MIN_LOSSES = 8


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


def init_state(params: nnx.State, frozen: nnx.State, tx: optax.GradientTransformation,
               stats: nnx.State | None = None) -> State:
  """The state of a new run; `stats`: the model's BatchNorm statistics (None: it has none)."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": frozen,
          "stats": nnx.State({}) if stats is None else stats,
          "opt_state": tx.init(params), "skip": init_skip()}


def init_skip() -> dict[str, jax.Array]:
  """The skipped-step counters of a new run (state["skip"]), all replicated scalars but one.

  total: steps skipped so far (metrics.jsonl `skipped_steps`).
  in_row: skipped steps in a row up to the current one (0 after an applied step).
  limit_step: the step at which `in_row` reached `max_skipped_steps`, 0 if it has
    not (a latch: the loop sees it at its next sync, however late).
  limit_loss, limit_grad_norm: that step's loss and gradient norm, for the message.
  losses: the last SPIKE_WINDOW applied losses, a ring written at (step - total)
    % SPIKE_WINDOW; 0 where none yet (not NaN: a multi-process device_put checks that
    every process passes equal values, and NaN equals nothing).
  """
  i32, f32 = lambda: jnp.zeros((), jnp.int32), lambda: jnp.zeros((), jnp.float32)
  return {"total": i32(), "in_row": i32(), "limit_step": i32(), "limit_loss": f32(),
          "limit_grad_norm": f32(), "losses": jnp.zeros((SPIKE_WINDOW,), jnp.float32)}


def clear_limit(state: State) -> State:
  """`state` with the in-row count and its latch (`limit_step`) reset.

  A run stopped on a streak saves this, so that its rerun gets
  `max_skipped_steps` fresh tries. Eager jnp ops: each leaf keeps its sharding.
  """
  skip = state["skip"]
  return {**state, "skip": {**skip, "in_row": jnp.zeros_like(skip["in_row"]),
                            "limit_step": jnp.zeros_like(skip["limit_step"])}}


def accepted(loss: jax.Array, grad_norm: jax.Array, skip: dict[str, jax.Array], step: jax.Array,
             skip_spikes: float) -> jax.Array:
  """Whether a step's update applies: a finite loss and gradient norm and, with
  `skip_spikes` k > 0, a loss at most k x the median of the recent applied losses.

  The spike test waits for SPIKE_MIN_LOSSES applied losses, and passes while their
  median is <= 0 (a loss that is not a positive quantity has no ratio to spike by).
  """
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_spikes > 0:
    applied = step - skip["total"]  # The ring's slots 0..applied-1 hold losses until it wraps.
    filled = jnp.arange(SPIKE_WINDOW) < applied
    median = jnp.nanmedian(jnp.where(filled, skip["losses"], jnp.nan))
    enough = applied >= SPIKE_MIN_LOSSES
    ok &= ~(enough & (median > 0) & (loss > skip_spikes * median))
  return ok


def _count_skip(skip: dict[str, jax.Array], ok: jax.Array, step: jax.Array, loss: jax.Array,
                grad_norm: jax.Array, max_skipped_steps: int) -> dict[str, jax.Array]:
  """The counters once step `step` + 1 applied (`ok`) or was skipped."""
  loss, grad_norm = loss.astype(jnp.float32), grad_norm.astype(jnp.float32)
  in_row = jnp.where(ok, 0, skip["in_row"] + 1)
  at = (step - skip["total"]) % SPIKE_WINDOW  # The next slot of the ring of applied losses.
  out = {**skip, "total": skip["total"] + jnp.where(ok, 0, 1), "in_row": in_row,
         "losses": skip["losses"].at[at].set(jnp.where(ok, loss, skip["losses"][at]))}
  if max_skipped_steps > 0:
    hit = (skip["limit_step"] == 0) & (in_row >= max_skipped_steps)
    latch = lambda new, old: jnp.where(hit, new, old)
    out.update(limit_step=latch(step + 1, skip["limit_step"]),
               limit_loss=latch(loss, skip["limit_loss"]),
               limit_grad_norm=latch(grad_norm, skip["limit_grad_norm"]))
  return out


def _outputs_and_stats(objective: Objective, graphdef: nnx.GraphDef, params: nnx.State,
                       frozen: nnx.State, rest: nnx.State, stats: nnx.State, batch: dict,
                       dropout_key: jax.Array | None) -> tuple[Any, nnx.State]:
  """The model's outputs on `batch` and its BatchNorm statistics after the forward."""
  model = nnx.merge(graphdef, stack.unstack_state(params), stack.unstack_state(frozen), rest,
                    stats)
  rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
  outputs = objective.forward(model, batch, dropout_key is None, rngs)
  return outputs, nnx.state(model, nnx.BatchStat)


def model_outputs(objective: Objective, graphdef: nnx.GraphDef, params: nnx.State,
                  frozen: nnx.State, rest: nnx.State, batch: dict,
                  dropout_key: jax.Array | None, stats: nnx.State | None = None) -> Any:
  """The model's outputs on `batch` (`objective.forward`); dropout on iff `dropout_key` is
  given. Training mode also moves BatchNorm statistics; those updates are dropped here
  (`loss_and_grads` keeps them)."""
  stats = nnx.State({}) if stats is None else stats
  return _outputs_and_stats(objective, graphdef, params, frozen, rest, stats, batch,
                            dropout_key)[0]


def loss_and_grads(objective: Objective, graphdef, rest, params, frozen, batch, key,
                   units: jax.Array, stats: nnx.State | None = None
                   ) -> tuple[jax.Array, dict, Any, nnx.State]:
  """(loss sum / units, metric sums / units, grads, BatchNorm statistics after the
  forward) of one (micro-)batch."""
  stats = nnx.State({}) if stats is None else stats

  def loss_fn(p):
    outputs, new_stats = _outputs_and_stats(objective, graphdef, p, frozen, rest, stats, batch,
                                            key)
    total, sums = objective.loss_sums(outputs, batch)
    return total / units, (jax.tree.map(lambda s: s / units, sums), new_stats)
  (loss, (metrics, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, metrics, grads, new_stats


def train_step(state: State, batch: dict, *, objective: Objective, graphdef: nnx.GraphDef,
               rest: nnx.State, tx: optax.GradientTransformation, grad_accum: int,
               dropout_key: jax.Array, max_skipped_steps: int = 0,
               skip_spikes: float = 0.0) -> tuple[State, dict]:
  """One optimizer update on a global batch, split into `grad_accum` micro-batches.

  Every micro-batch divides its summed loss by the units of the whole batch,
  so the accumulated loss and gradients are those of the full batch. A step
  that is not `accepted` leaves params, BatchNorm statistics and optimizer state
  bitwise unchanged (so optax's step count, and the schedule it drives, stays
  behind `step` by one per skip); `max_skipped_steps` (0: never) sets
  state["skip"]["limit_step"] when that many are skipped in a row. Metrics add
  `skipped_steps` (the total).
  """
  params, frozen = state["params"], state["frozen"]
  key = jax.random.fold_in(dropout_key, state["step"])
  units = objective.units(batch)
  # An all-masked batch must not divide by 0; any positive total (class weights can sum
  # below 1) divides as it is.
  units = jnp.where(units > 0, units, 1.0)
  if grad_accum == 1:
    loss, metrics, grads, stats = loss_and_grads(objective, graphdef, rest, params, frozen,
                                                 batch, key, units, state["stats"])
  else:
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

    # BatchNorm statistics thread through the micro-batches in order, as PyTorch's
    # running averages do over the forwards of an accumulated step.
    def accumulate(carry, xs):
      sums, stats = carry
      mb, i = xs
      *out, stats = loss_and_grads(objective, graphdef, rest, params, frozen, mb,
                                   jax.random.fold_in(key, i), units, stats)
      return (jax.tree.map(jnp.add, sums, tuple(out)), stats), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: loss_and_grads(objective, graphdef, rest, params, frozen,
                               jax.tree.map(lambda x: x[0], micro), key, units,
                               state["stats"])[:3]))
    ((loss, metrics, grads), stats), _ = jax.lax.scan(
        accumulate, (zeros, state["stats"]), (micro, jnp.arange(grad_accum)))
  grad_norm = optax.tree_utils.tree_norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  ok = accepted(loss, grad_norm, state["skip"], state["step"], skip_spikes)
  # A select rather than lax.cond: elementwise, so XLA fuses it into the update itself.
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  skip = _count_skip(state["skip"], ok, state["step"], loss, grad_norm, max_skipped_steps)
  new_state = {"step": state["step"] + 1,
               "params": keep(optax.apply_updates(params, updates), params),
               "frozen": frozen, "stats": keep(stats, state["stats"]),
               "opt_state": keep(opt_state, state["opt_state"]), "skip": skip}
  return new_state, {"loss": loss, **metrics, "grad_norm": grad_norm,
                     "skipped_steps": skip["total"]}
