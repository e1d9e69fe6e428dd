"""The trainable/frozen split of a model, after LoRA adapters and the rules.

The split is what makes frozen parameters free: `nnx.split` puts the
trainable ones in `params` (differentiated, with optimizer state) and the
rest in `frozen` (constants of the step, stored as config.model.frozen_dtype
says: float32, bfloat16, or for QLoRA int8 / nf4 Linear kernels, see
`quantize_frozen`).
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
from jaxft.tuning import quantize
from jaxft.tuning import rules as rules_lib
from jaxft.models import layers
from jaxft.models import stack

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What a quantized run (config.model.frozen_dtype in quantize.KINDS) stores
# its frozen parameters in that are not quantized Linear kernels.
_QUANTIZED_REST = jnp.bfloat16


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  return _DTYPES[config.model.dtype]


def with_adapters(model: nnx.Module, config: ml_collections.ConfigDict) -> nnx.Module:
  """`model` with LoRA adapters attached if the config asks for them, and the
  layer stack run as config.model.scan_layers / remat say (in place)."""
  if config_lib.lora_enabled(config):
    c = config.lora
    lora.attach(model, targets_regex=c.targets, rank=c.rank, alpha=c.alpha,
                dropout_rate=c.dropout, seed=config.train.seed, last_layers=c.last_layers)
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
    rest: non-parameter state that training does not change.
    assignment: each parameter's rule.
    sizes: parameter path -> element count.
    stats: BatchNorm running statistics (`nnx.BatchStat`), which train-mode
      forwards update; empty for models without BatchNorm.
  """
  graphdef: nnx.GraphDef
  params: nnx.State
  frozen: nnx.State
  rest: nnx.State
  assignment: rules_lib.Assignment
  sizes: dict[str, int]
  stats: nnx.State = dataclasses.field(default_factory=lambda: nnx.State({}))

  def merge(self, params: nnx.State, frozen: nnx.State,
            stats: nnx.State | None = None) -> nnx.Module:
    """The model of these parameters and BatchNorm statistics (None: the split's own)."""
    return nnx.merge(self.graphdef, stack.unstack_state(params), stack.unstack_state(frozen),
                     self.rest, self.stats if stats is None else stats)


def _cast(x: Any, dtype: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
  return x.astype(dtype)


def _frozen_quantizable(model: nnx.Module, assignment: rules_lib.Assignment
                        ) -> list[tuple[str, Any]]:
  """(module path, Linear) of the Linears whose kernel is frozen and splits into blocks."""
  trainable = assignment.trainable()
  return [(path, m) for path, m in lora.linear_modules(model)
          if f"{path}/kernel" not in trainable and quantize.fits(m.in_features)]


def quantized_linears(model: nnx.Module, config: ml_collections.ConfigDict,
                      heads: Sequence[str] = ()) -> dict[str, str]:
  """Module path -> kind of the Linears a QLoRA run stores quantized (empty otherwise).

  `model` (abstract is enough) with its adapters, as `split` will see it:
  loading quantizes these kernels as it reads them (`hf.load(quantized=)`).
  """
  kind = config.model.frozen_dtype
  if kind not in quantize.KINDS:
    return {}
  paths = [p for p, _ in param_paths.named_variables(nnx.state(model, nnx.Param))]
  assignment = rules_lib.assign(rules_lib.all_rules(config, paths, heads), paths)
  return {path: kind for path, _ in _frozen_quantizable(model, assignment)}


def quantize_frozen(model: nnx.Module, assignment: rules_lib.Assignment,
                    kind: str) -> rules_lib.Assignment:
  """Stores the frozen kernel of every Linear as `kind` (quantize.KINDS), in place.

  Only kernels whose in_features split into whole blocks; the others, like
  every other frozen parameter, are left for `split` to cast. Kernels the
  load already quantized stay as they are. Each `kernel_scale` takes its
  kernel's rule (frozen); returns the assignment with them added. Works on
  abstract models too.
  """
  of = dict(assignment.of)
  for path, m in _frozen_quantizable(model, assignment):
    if not m.quantized:
      m.quantize(kind)
    of[f"{path}/kernel_scale"] = of[f"{path}/kernel"]
  return dataclasses.replace(assignment, of=of)


def _sizes(model: nnx.Module) -> dict[str, int]:
  """Parameter path -> element count, a quantized kernel counted as its dense (in, out)."""
  sizes = {p: int(v.get_value().size)
           for p, v in param_paths.named_variables(nnx.state(model, nnx.Param))}
  for path, m in lora.linear_modules(model):
    if m.quantized:
      sizes[f"{path}/kernel"] = m.in_features * m.out_features
      del sizes[f"{path}/kernel_scale"]
  return sizes


def _cast_frozen(frozen: nnx.State, dtype: Any) -> nnx.State:
  """`frozen` with its float parameters in `dtype`; quantized kernels and their scales kept."""
  def cast(path: tuple, var: nnx.Variable) -> nnx.Variable:
    value = var.get_value()
    if path[-1] == "kernel_scale" or not jnp.issubdtype(value.dtype, jnp.floating):
      return var
    return var.replace(_cast(value, dtype))
  return nnx.from_flat_state([(p, cast(p, v)) for p, v in nnx.to_flat_state(frozen)])


def split(model: nnx.Module, config: ml_collections.ConfigDict,
          heads: Sequence[str] = ()) -> Split:
  """Resolves the rules over `model`'s params and splits trainable from frozen.

  `heads`: modules the task adds to the pretrained model (Task.fresh_heads),
  which LoRA trains by default. With config.model.frozen_dtype int8 / nf4 the
  frozen Linear kernels of `model` are quantized in place (`quantize_frozen`)
  before the split, so the model is not the same afterwards.

  Raises:
    UserError: the rules do not fit the model (see `rules.assign`).
  """
  # The model's parameter counts, not its storage; scales of kernels the
  # load quantized take their kernel's rule below, not one of their own.
  sizes = _sizes(model)
  paths = list(sizes)
  assignment = rules_lib.assign(rules_lib.all_rules(config, paths, heads), paths)
  trainable = assignment.trainable()
  kind = config.model.frozen_dtype
  if kind in quantize.KINDS:
    assignment = quantize_frozen(model, assignment, kind)

  def is_trainable(path: tuple, x: Any) -> bool:
    return isinstance(x, nnx.Param) and "/".join(map(str, path)) in trainable

  freeze_batch_norms(model, trainable)
  graphdef, params, frozen, stats, rest = nnx.split(model, is_trainable, nnx.Param,
                                                    nnx.BatchStat, ...)
  frozen_dtype = _QUANTIZED_REST if kind in quantize.KINDS else _DTYPES[kind]
  if frozen_dtype != jnp.float32:
    frozen = _cast_frozen(frozen, frozen_dtype)
  if stack_options(config).scan:
    lists = stack.containers(model)
    params = stack.stack_state(params, lists, lambda p: assignment.of["/".join(map(str, p))])
    frozen = stack.stack_state(frozen, lists)
  return Split(graphdef, params, frozen, rest, assignment, sizes, stats)


def freeze_batch_norms(model: nnx.Module, trainable: set[str] | frozenset[str]) -> None:
  """Marks each BatchNorm none of whose parameters train as frozen (in place).

  A frozen BatchNorm normalises with its running statistics in training too and
  never updates them (detectron2's FrozenBatchNorm2d, timm's freeze_batch_norm_2d):
  a layer frozen by the rules keeps the function it was pretrained to compute,
  rather than drifting with the fine-tuning batches' statistics.
  """
  for path, module in nnx.iter_modules(model):
    if isinstance(module, layers.BatchNorm):
      prefix = "/".join(map(str, path))
      module.frozen = not any(f"{prefix}/{name}" in trainable for name in ("scale", "bias"))
