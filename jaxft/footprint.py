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
from jaxft import hf
from jaxft import optim
from jaxft import params as params_lib
from jaxft import rules
from jaxft import sharding
from jaxft import steps
from jaxft import tasks
from jaxft import train
from jaxft import trainable
from jaxft.data import sources
from jaxft.data import text
from jaxft.models import registry


def tree_bytes(tree: Any) -> int:
  """Bytes of every array (or abstract array) leaf of `tree`."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def tree_size(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _labels(config: ml_collections.ConfigDict, task: Any) -> list[str] | None:
  """Class names from the training data (no tokenizing); None for a language model."""
  if task.name == registry.CAUSAL_LM:
    return None
  if task.name == registry.IMAGE_CLASSIFY:  # The class names are the data's: read it.
    return task.read(config.data.train, config.data.train_split, None).label_names
  ds = sources.load_split(config.data.train, config.data.train_split)
  text.check_columns(ds, [config.data.label_key], "train")
  return text.label_names(ds, config.data.label_key)


def abstract_batch(config: ml_collections.ConfigDict, with_token_types: bool,
                   task: Any = None) -> dict:
  """Shapes of one global train batch (`task`: the config's, when the caller has it)."""
  shape = (config.train.batch_size, config.data.max_length)
  task = task or tasks.of(config)
  if task.name == registry.IMAGE_CLASSIFY:
    size, channels = task.input.size, task.input.channels
    return {"pixels": jax.ShapeDtypeStruct((shape[0], *size, channels), jnp.uint8),
            "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32)}
  if task.name == registry.CAUSAL_LM:
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32)
             for k in ("input_ids", "positions", "segment_ids")}
    batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.bool_)
    return batch
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("input_ids", "attention_mask")}
  if with_token_types:
    batch["token_type_ids"] = jax.ShapeDtypeStruct(shape, jnp.int32)
  batch["label"] = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
  return batch


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
                 with_token_types: bool, task: Any = None) -> tuple[Any, Any, jax.sharding.Mesh]:
  """(compiled train step, its abstract sharded state, the mesh): nothing runs."""
  task = task or tasks.of(config)
  mesh = sharding.make_mesh(config)
  tx = optim.build(config, split.params, split.assignment)
  state = jax.eval_shape(functools.partial(steps.init_state, tx=tx), split.params, split.frozen)
  where = train.placement(config, mesh, state)
  state = sharding.with_shardings(state, where.state)
  batch = abstract_batch(config, with_token_types, task)
  batch = sharding.with_shardings(batch, jax.tree.map(lambda _: where.batch, batch))
  step_fn = train.make_step_fn(config, split, tx, where, task.objective)
  compiled = step_fn.lower(state, batch).compile()
  return compiled, state, mesh


def inspect(config: ml_collections.ConfigDict, show_params: bool = False) -> dict[str, Any]:
  """Prints the rules table (and with `show_params` every parameter); returns the figures."""
  config_lib.validate(config)
  model_path = hf.resolve_model(config.model.path, weights=False)
  task = tasks.of(config)
  labels = _labels(config, task)
  hf_config = task.hf_config(model_path, labels)
  tokenizer = hf.load_tokenizer(model_path) if task.uses_tokenizer else None
  sharding.check_fits(config, sharding.make_mesh(config), hf_config.num_attention_heads)
  split = trainable.split(trainable.abstract_model(hf_config, config), config,
                          hf_config.model_type)
  decay = config.optim.weight_decay
  if show_params:
    shapes = {p: tuple(v.get_value().shape)
              for p, v in params_lib.named_variables(split.params)
              + params_lib.named_variables(split.frozen)}
    print(rules.listing(split.assignment, dict(sorted(shapes.items())), decay))
    print()
  print(rules.table(split.assignment, split.sizes, decay))
  token_types = tokenizer is not None and "token_type_ids" in tokenizer.model_input_names
  compiled, state, mesh = compile_step(config, split, token_types, task)
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
