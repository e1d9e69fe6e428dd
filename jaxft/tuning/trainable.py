"""The trainable/frozen split of a model, after LoRA adapters and the rules.

The split is what makes frozen parameters free: `nnx.split` puts the
trainable ones in `params` (differentiated, with optimizer state) and the
rest in `frozen` (constants of the step, optionally stored in bfloat16).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxft.formats import hf
from jaxft import config as config_lib
from jaxft.tuning import lora
from jaxft.tuning import param_paths
from jaxft.tuning import rules as rules_lib
from jaxft.models import stack

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  return _DTYPES[config.model.dtype]


def with_adapters(model: nnx.Module, config: ml_collections.ConfigDict) -> nnx.Module:
  """`model` with LoRA adapters attached if the config asks for them, and the
  layer stack run as config.model.scan_layers / remat say (in place)."""
  if config_lib.lora_enabled(config):
    c = config.lora
    lora.attach(model, targets_regex=c.targets, rank=c.rank, alpha=c.alpha,
                dropout_rate=c.dropout, seed=config.train.seed)
  return stack.configure(model, stack_options(config))


def stack_options(config: ml_collections.ConfigDict) -> stack.Options:
  """How the config runs layer stacks (configs older than the keys: a plain loop)."""
  return stack.Options(scan=bool(config.model.get("scan_layers", False)),
                       remat=config.model.get("remat", "none"))


def abstract_model(hf_config: Any, config: ml_collections.ConfigDict, task: str) -> nnx.Module:
  """The model of a task kind (with adapters) as shapes only: no weights read or initialised."""
  return nnx.eval_shape(lambda: with_adapters(
      hf.build_model(hf_config, task, dtype=compute_dtype(config),
                     seed=config.train.seed),
      config))


@dataclasses.dataclass
class Split:
  """A model taken apart for training.

  Attributes:
    graphdef: the model's structure.
    params: trainable parameters (layer lists stacked under config.model.scan_layers).
    frozen: every other parameter (likewise).
    rest: non-parameter state.
    assignment: each parameter's rule.
    sizes: parameter path -> element count.
  """
  graphdef: nnx.GraphDef
  params: nnx.State
  frozen: nnx.State
  rest: nnx.State
  assignment: rules_lib.Assignment
  sizes: dict[str, int]

  def merge(self, params: nnx.State, frozen: nnx.State) -> nnx.Module:
    return nnx.merge(self.graphdef, stack.unstack_state(params), stack.unstack_state(frozen),
                     self.rest)


def _cast(x: Any, dtype: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
  return x.astype(dtype)


def split(model: nnx.Module, config: ml_collections.ConfigDict,
          heads: Sequence[str] = ()) -> Split:
  """Resolves the rules over `model`'s params and splits trainable from frozen.

  `heads`: modules the task adds to the pretrained model (Task.fresh_heads),
  which LoRA trains by default.

  Raises:
    UserError: the rules do not fit the model (see `rules.assign`).
  """
  named = param_paths.named_variables(nnx.state(model, nnx.Param))
  paths = [p for p, _ in named]
  assignment = rules_lib.assign(rules_lib.all_rules(config, paths, heads), paths)
  trainable = assignment.trainable()

  def is_trainable(path: tuple, x: Any) -> bool:
    return isinstance(x, nnx.Param) and "/".join(map(str, path)) in trainable

  graphdef, params, frozen, rest = nnx.split(model, is_trainable, nnx.Param, ...)
  frozen_dtype = _DTYPES[config.model.frozen_dtype]
  if frozen_dtype != jnp.float32:
    frozen = jax.tree.map(lambda x: _cast(x, frozen_dtype), frozen)
  sizes = {p: int(v.get_value().size) for p, v in named}
  if stack_options(config).scan:
    lists = stack.containers(model)
    params = stack.stack_state(params, lists, lambda p: assignment.of["/".join(map(str, p))])
    frozen = stack.stack_state(frozen, lists)
  return Split(graphdef, params, frozen, rest, assignment, sizes)
