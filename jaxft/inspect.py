"""`jaxft inspect`: what a run will cost, before paying for it.

Builds the model abstractly (shapes only: no weights read, nothing
initialised), resolves the rules, then lowers and compiles one train step for
the configured batch and reports parameter and optimizer bytes, the step's
FLOPs (XLA cost analysis) and its memory (XLA memory analysis).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxft import config as config_lib
from jaxft import run
from jaxft import sharding
from jaxft import steps
from jaxft import tasks
from jaxft.formats import hub
from jaxft.tuning import optimizer
from jaxft.tuning import param_paths
from jaxft.tuning import rules
from jaxft.tuning import trainable


def tree_bytes(tree: Any) -> int:
  """Bytes of every array (or abstract array) leaf of `tree`."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def tree_size(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def compiled_costs(compiled: Any) -> tuple[float, int]:
  """(FLOPs, peak bytes per device) of a compiled computation.

  On a mesh, XLA reports both per device (the SPMD program each one runs).

  Peak memory is arguments + outputs - donated (aliased) + temporaries: what
  XLA's buffer assignment must hold at once at most.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per computation.
    cost = cost[0]
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  return float(cost.get("flops", 0.0)), int(peak)


def compile_step(config: ml_collections.ConfigDict, split: trainable.Split,
                 batch: dict[str, jax.ShapeDtypeStruct], task: tasks.Task
                 ) -> tuple[Any, Any, jax.sharding.Mesh]:
  """(compiled train step for `batch`'s shapes, its abstract sharded state, the mesh).

  Nothing runs: the step is lowered and compiled from shapes alone.
  """
  mesh = sharding.make_mesh(config)
  tx = optimizer.build(config, split.params, split.assignment)
  state = jax.eval_shape(functools.partial(steps.init_state, tx=tx), split.params, split.frozen)
  where = sharding.placement(mesh, sharding.logical_rules(config), state)
  state = sharding.with_shardings(state, where.state)
  batch = sharding.with_shardings(batch, jax.tree.map(lambda _: where.batch, batch))
  step_fn = run.make_step_fn(config, split, tx, where, task.objective)
  compiled = step_fn.lower(state, batch).compile()
  return compiled, state, mesh


def inspect(config: ml_collections.ConfigDict, show_params: bool = False) -> dict[str, Any]:
  """Prints the rules table (and with `show_params` every parameter); returns the figures."""
  config_lib.validate(config)
  model_path = hub.resolve_model(config.model.path, weights=False)
  task = tasks.of(config)
  hf_config = task.hf_config(model_path, task.class_names())
  t = config.train
  sharding.check_fits(sharding.make_mesh(config), batch_size=t.batch_size,
                      grad_accum=t.grad_accum, eval_batch_size=t.eval_batch_size,
                      num_heads=hf_config.num_attention_heads)
  split = trainable.split(trainable.abstract_model(hf_config, config, task.name), config,
                          task.fresh_heads(hf_config))
  decay = config.optim.weight_decay
  if show_params:
    shapes = {p: tuple(v.get_value().shape)
              for p, v in param_paths.named_variables(split.params)
              + param_paths.named_variables(split.frozen)}
    print(rules.listing(split.assignment, dict(sorted(shapes.items())), decay))
    print()
  print(rules.table(split.assignment, split.sizes, decay))
  compiled, state, mesh = compile_step(config, split, task.abstract_batch(model_path), task)
  flops, peak = compiled_costs(compiled)
  return {
      "params_total": tree_size(state["params"]) + tree_size(state["frozen"]),
      "params_trainable": tree_size(state["params"]),
      "param_bytes": tree_bytes(state["params"]) + tree_bytes(state["frozen"]),
      "optimizer_state_bytes": tree_bytes(state["opt_state"]),
      "step_flops": flops,
      "peak_memory_bytes": peak,
      # Activations (what remat trades for recompute) and XLA's scratch space.
      "temp_memory_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
      "devices": jax.device_count(),
      "mesh": dict(mesh.shape),
      "param_bytes_per_device": sharding.bytes_per_device([state["params"], state["frozen"]]),
      "optimizer_state_bytes_per_device": sharding.bytes_per_device(state["opt_state"]),
      "batch_size": config.train.batch_size,
      "max_length": config.data.max_length,
  }
