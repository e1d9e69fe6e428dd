"""Which parameters train: LoRA adapters, the rules, and the trainable/frozen split.

The split is what makes frozen parameters free: `nnx.split` puts the
trainable ones in `params` (differentiated, with optimizer state) and the
rest in `frozen` (constants of the step, optionally stored in bfloat16).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxft import hf
from jaxft import lora
from jaxft import params as params_lib
from jaxft import rules as rules_lib
from jaxft.models import registry

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


_TASKS = {"classify": registry.CLASSIFY, "causal_lm": registry.CAUSAL_LM,
          "image_classify": registry.IMAGE_CLASSIFY}


def task(config: ml_collections.ConfigDict) -> str:
  """The registry task of a config (workdirs older than `config.task` are classifiers)."""
  return _TASKS[config.get("task", "classify")]


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  return _DTYPES[config.model.dtype]


def with_adapters(model: nnx.Module, config: ml_collections.ConfigDict) -> nnx.Module:
  """`model` with LoRA adapters attached if the config asks for them (in place)."""
  if lora.enabled(config):
    lora.attach(model, config, seed=config.train.seed)
  return model


def abstract_model(hf_config: Any, config: ml_collections.ConfigDict) -> nnx.Module:
  """The model (with adapters) as shapes only: no weights read or initialised."""
  return nnx.eval_shape(lambda: with_adapters(
      hf.build_model(hf_config, task(config), dtype=compute_dtype(config),
                     seed=config.train.seed),
      config))


@dataclasses.dataclass
class Split:
  """A model taken apart for training.

  Attributes:
    graphdef: the model's structure.
    params: trainable parameters.
    frozen: every other parameter.
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
    return nnx.merge(self.graphdef, params, frozen, self.rest)


def _cast(x: Any, dtype: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
  return x.astype(dtype)


def split(model: nnx.Module, config: ml_collections.ConfigDict, model_type: str) -> Split:
  """Resolves the rules over `model`'s params and splits trainable from frozen.

  Raises:
    UserError: the rules do not fit the model (see `rules.assign`).
  """
  named = params_lib.named_variables(nnx.state(model, nnx.Param))
  paths = [p for p, _ in named]
  # LoRA trains a classifier's fresh head by default, never a language model's.
  head = (() if task(config) == registry.CAUSAL_LM
          else registry.lookup(model_type, task(config)).layout.head_modules)
  assignment = rules_lib.assign(rules_lib.all_rules(config, paths, head), paths)
  trainable = assignment.trainable()

  def is_trainable(path: tuple, x: Any) -> bool:
    return isinstance(x, nnx.Param) and "/".join(map(str, path)) in trainable

  graphdef, params, frozen, rest = nnx.split(model, is_trainable, nnx.Param, ...)
  frozen_dtype = _DTYPES[config.model.frozen_dtype]
  if frozen_dtype != jnp.float32:
    frozen = jax.tree.map(lambda x: _cast(x, frozen_dtype), frozen)
  sizes = {p: int(v.get_value().size) for p, v in named}
  return Split(graphdef, params, frozen, rest, assignment, sizes)
