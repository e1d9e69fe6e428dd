"""A jaxft model from and to a Hugging Face checkpoint: build, load, initialise, export.

In: any checkpoint `formats.hub` locates and `formats.weights` reads
(safetensors, msgpack, opt-in pickles, GGUF). Out: `config.json`,
`model.safetensors` (float32, PyTorch layout and names) and the tokenizer or
image processor files, which transformers' Auto classes load as is.

Which model class serves a checkpoint, and how its parameters are named,
comes from `models.registry` (keyed by the task kind, `config.task`'s names)
and `models.naming`; this module only walks parameters.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import re
import shutil
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from jaxft import sharding
from jaxft.errors import UserError
from jaxft.formats import gguf
from jaxft.formats import hub
from jaxft.formats import weights
from jaxft.models import layers
from jaxft.models import naming
from jaxft.models import registry
from jaxft.tuning import param_paths
from jaxft.tuning import quantize

PREPROCESSOR_CONFIG = "preprocessor_config.json"

# The variables a checkpoint holds: parameters and BatchNorm running statistics.
_CHECKPOINTED = nnx.Any(nnx.Param, nnx.BatchStat)

# Non-persistent buffers that older transformers versions still saved.
_IGNORED_KEYS = re.compile(r"(^|\.)(position_ids|embeddings\.token_type_ids)$")


@dataclasses.dataclass
class LoadReport:
  """What a load did not match, and what it read.

  Attributes:
    missing: our param (and BatchNorm statistic) paths that were initialised
      fresh (e.g. the head).
    unexpected: checkpoint keys that were not used.
    replaced: of `missing`, the head params whose checkpoint tensor has another
      shape (a classifier's other label count), as "path: theirs -> ours".
    bytes_read: bytes this process read from the checkpoint (its devices'
      slices, or whole tensors where slices cannot be read; in the
      checkpoint's dtype).
  """
  missing: list[str]
  unexpected: list[str]
  bytes_read: int = 0
  replaced: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Loaded:
  """A model loaded from an HF checkpoint, with its config and report."""
  model: nnx.Module
  hf_config: transformers.PretrainedConfig
  report: LoadReport
  path: str


def build_model(hf_config: transformers.PretrainedConfig, task: str, *,
                dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                seed: int = 0) -> nnx.Module:
  """A randomly initialised model for `hf_config` and a task kind (`config.task`'s names).

  Works under `nnx.eval_shape` for abstract builds.
  """
  spec = registry.lookup(hf_config.model_type, task)
  return spec.module(hf_config, dtype=dtype, param_dtype=param_dtype,
                     rngs=nnx.Rngs(params=seed))


def _read_params(abstract: nnx.State, layout: naming.CheckpointLayout, ckpt: weights.Weights,
                 param_dtype: Any, places: dict[str, Any],
                 quantized: dict[str, tuple[str, tuple[int, int]]], built_from: str,
                 heads: Sequence[str] = ()) -> tuple[dict[str, jax.Array], LoadReport]:
  """The checkpoint tensors of `abstract`'s params and BatchNorm statistics, placed; the
  report of the rest.

  Params are read as `param_dtype`; statistics (`nnx.BatchStat`) keep the
  model's own dtype (float32 means and variances, the int32 count that
  torch stores as int64 `num_batches_tracked`), whatever `param_dtype` is.

  `built_from` names the config the model was built from, for messages.

  `quantized`: kernel path -> (kind, dense shape) of the kernels stored
  quantized (`_quantize_abstract`), each read dense, one at a time, and
  quantized at once. `heads`: top-level modules whose tensors of another shape
  are initialised fresh (`report.replaced`) instead of an error.
  """
  flat = param_paths.named_variables(nnx.state(abstract, _CHECKPOINTED))
  scales = {_scale_path(path) for path in quantized}
  values, used, missing, replaced = {}, set(), [], []
  for path, var in flat:
    if path in scales:
      continue  # Comes with its kernel.
    found = [(k, t) for k, t in layout.candidates(path, ckpt.fmt)
             if k in ckpt.tensors]
    if not found:
      missing.append(path)
      continue
    key, transform = found[0]
    theirs = _other_shape(ckpt, key, transform, var.shape)
    if theirs is not None and path.split("/", 1)[0] in heads:
      missing.append(path)
      replaced.append(f"{path}: {theirs} -> {tuple(var.shape)}")
      used.add(key)
      continue
    if path in quantized:
      kind, shape = quantized[path]
      dense = _read_param(ckpt, key, transform, path, shape, param_dtype, places[path],
                          built_from)
      values[path], values[_scale_path(path)] = jax.jit(
          functools.partial(quantize.quantize, kind=kind),
          out_shardings=(places[path], places[_scale_path(path)]))(dense)
    else:
      values[path] = _read_param(ckpt, key, transform, path, var.shape,
                                 _load_dtype(var, param_dtype), places[path], built_from)
    used.add(key)
  if not used:
    raise UserError(
        f"No tensor in {ckpt.source} matches a parameter of the model "
        f"(e.g. {layout.candidates(flat[0][0], ckpt.fmt)[0][0]!r}); "
        "does config.json's model_type match the weights?")
  unexpected = sorted(k for k in ckpt.tensors
                      if k not in used and not _IGNORED_KEYS.search(k))
  return values, LoadReport(missing=missing, unexpected=unexpected, bytes_read=ckpt.bytes_read,
                            replaced=replaced)


def _other_shape(ckpt: weights.Weights, key: str, transform: naming.Transform,
                 shape: tuple[int, ...]) -> tuple[int, ...] | None:
  """Tensor `key` in our layout's shape where the header tells it and it is not `shape`."""
  theirs = ckpt.tensors[key].shape
  ours = None if theirs is None else transform.our_shape(theirs)
  return None if ours is None or tuple(ours) == tuple(shape) else tuple(ours)


def _load_dtype(var: nnx.Variable, param_dtype: Any) -> np.dtype:
  """What a variable is read as: `param_dtype` for a param, its own dtype for a statistic."""
  if isinstance(var, nnx.BatchStat):
    return np.dtype(var.get_value().dtype)
  return param_dtype


def _read_param(ckpt: weights.Weights, key: str, transform: naming.Transform, path: str,
                shape: tuple[int, ...], param_dtype: Any,
                where: jax.sharding.Sharding, built_from: str) -> jax.Array:
  """Checkpoint tensor `key` as our variable `path` of `shape` and `param_dtype`, placed
  by `where`.

  Each of this process's devices reads only its own slice when the format
  reads slices (safetensors) and the transform maps a slice of ours to one of
  theirs (axis permutations: IDENTITY, TRANSPOSE, conv kernels' CONV_HWIO).
  Otherwise the whole tensor is read once and sliced: GGUF, msgpack and .bin,
  which only read whole tensors, and transforms without `axes`.
  """
  tensor = ckpt.tensors[key]
  file = tensor.file or ckpt.source
  check = functools.partial(_check_shape, file, key, path, built_from=built_from)
  _check_rank(check, transform, tensor.shape, shape)
  ours = None if tensor.shape is None else transform.our_shape(tensor.shape)
  if tensor.sliceable and ours is not None:
    _check_dtype(file, key, path, tensor.dtype, param_dtype)
    check(tensor.shape, ours, shape)
    # The dtype conversion is per element, so per slice gives the same values.
    return _place(shape, where, lambda index: transform.to_ours(
        ckpt.read(key, transform.their_index(index))).astype(param_dtype))
  raw = ckpt.read(key)
  _check_dtype(file, key, path, raw.dtype, param_dtype)
  _check_rank(check, transform, raw.shape, shape)
  value = transform.to_ours(raw)
  check(raw.shape, value.shape, shape)
  value = value.astype(param_dtype)
  return _place(shape, where, lambda index: value[index])


def _check_shape(file: str, key: str, path: str, theirs: tuple[int, ...],
                 ours: tuple[int, ...], expected: tuple[int, ...], *, built_from: str) -> None:
  if tuple(ours) != tuple(expected):
    raise UserError(
        f"Checkpoint tensor {key!r} in {file} has shape {tuple(theirs)} (as our param "
        f"{path!r}: {tuple(ours)}) but the model built from {built_from} "
        f"expects {tuple(expected)}. Is num_labels or the config right?")


def _check_rank(check: Callable[..., None], transform: naming.Transform,
                theirs: tuple[int, ...] | None, expected: tuple[int, ...]) -> None:
  """A permuting transform keeps the rank: another rank is a mismatch, caught (by
  `check`, a `_check_shape`) before the transform, whose permutation assumes the
  param's rank, fails on it."""
  if theirs is not None and transform.axes is not None and len(theirs) != len(expected):
    check(theirs, theirs, expected)


def _check_dtype(file: str, key: str, path: str, dtype: np.dtype | None, want: Any) -> None:
  """Weights are floating point: an integer, bool or complex tensor under a weight's
  name is a corrupt or foreign file (its values would convert to nonsense). An
  integer variable (a BatchNorm's batch count) takes integers only."""
  if dtype is None:
    return
  if _is_float(want) and not _is_float(dtype):
    raise UserError(f"Checkpoint tensor {key!r} in {file} has dtype {dtype}, but our param "
                    f"{path!r} takes floating-point weights")
  if _is_int(want) and not _is_int(dtype):
    raise UserError(f"Checkpoint tensor {key!r} in {file} has dtype {dtype}, but our "
                    f"variable {path!r} takes integers")


def _is_float(dtype: np.dtype) -> bool:
  # bfloat16 and the float8s (ml_dtypes) are numpy kind "V", but jnp knows them.
  return np.issubdtype(dtype, np.floating) or jnp.issubdtype(dtype, jnp.floating)


def _is_int(dtype: np.dtype) -> bool:
  return np.issubdtype(dtype, np.integer)


def _place(shape: tuple[int, ...], sharding: jax.sharding.Sharding,
           read: Callable[[weights.Index], np.ndarray]) -> jax.Array:
  """The array of `shape` laid out by `sharding`, each device's slice from `read(index)`.

  Only this process's devices ask; devices holding the same slice (replicas)
  share one read.
  """
  reads: dict[tuple, np.ndarray] = {}

  def slice_for(index: weights.Index) -> np.ndarray:
    bounds = tuple((s.start, s.stop, s.step) for s in index)
    if bounds not in reads:
      reads[bounds] = read(index)
    return reads[bounds]
  return jax.make_array_from_callback(shape, sharding, slice_for)


def _placements(abstract: nnx.State, shardings: Callable[[Any], Any] | None
                ) -> dict[str, jax.sharding.Sharding]:
  """Where each variable of the model goes, by path: `shardings`, else the default device."""
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {path: device for path, _ in param_paths.named_variables(abstract)}
  leaves = jax.tree_util.tree_flatten_with_path(shardings(abstract))[0]
  return {param_paths.path_str(kp): s for kp, s in leaves}


def _scale_path(kernel_path: str) -> str:
  return kernel_path + "_scale"


def _quantize_abstract(model: nnx.Module, kinds: dict[str, str]
                       ) -> dict[str, tuple[str, tuple[int, int]]]:
  """Quantizes the Linears `kinds` names (module path -> kind) of abstract `model` in place.

  Returns kernel path -> (kind, dense kernel shape) of each.
  """
  out = {}
  for path, m in nnx.iter_modules(model):
    name = "/".join(map(str, path))
    if name in kinds and isinstance(m, layers.Linear):
      m.quantize(kinds[name])
      out[f"{name}/kernel"] = (kinds[name], (m.in_features, m.out_features))
  return out


def _abstract(build: Callable[[], nnx.Module], shardings: Callable[[Any], Any] | None,
              quantized: dict[str, str] | None = None
              ) -> tuple[nnx.GraphDef, nnx.State, dict[str, jax.sharding.Sharding],
                         dict[str, tuple[str, tuple[int, int]]]]:
  """(graph, abstract state, placements, quantized kernels) of the model `build` makes,
  with the Linears `quantized` names stored quantized; nothing computed."""
  model = nnx.eval_shape(build)
  kernels = _quantize_abstract(model, quantized or {})
  graphdef, abstract = nnx.split(model)
  return graphdef, abstract, _placements(abstract, shardings), kernels


def _materialise(build: Callable[[], nnx.Module], values: dict[str, jax.Array],
                 graphdef: nnx.GraphDef, abstract: nnx.State,
                 places: dict[str, jax.sharding.Sharding]) -> nnx.Module:
  """The model `build` makes, with `values` for those paths and its own init elsewhere.

  Only the variables without a value are initialised, directly into their
  shards, in one jitted program: XLA drops the random draws of everything
  else, which for a loaded checkpoint is nearly the whole model (a 1B model's
  init would cost tens of seconds on a CPU, to be overwritten).
  """
  named = param_paths.named_variables(abstract)
  rest = [path for path, _ in named if path not in values]
  _check_fits(named, rest, places)
  if rest:
    def init() -> list[jax.Array]:
      built = dict(param_paths.named_variables(nnx.split(build())[1]))
      return [built[path].get_value() for path in rest]
    values = {**values, **dict(zip(rest, jax.jit(
        init, out_shardings=[places[path] for path in rest])()))}
  treedef = jax.tree_util.tree_structure(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
  state = jax.tree_util.tree_unflatten(treedef, [var.replace(values[path]) for path, var in named])
  return nnx.merge(graphdef, state)


def _device_bytes() -> int | None:
  """Memory of one device: its allocator's limit, or the host's RAM on a CPU; None if unknown."""
  stats = jax.local_devices()[0].memory_stats() or {}  # Another host's device has no stats.
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  if jax.devices()[0].platform != "cpu":
    return None
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    return None


def _check_fits(named: list[tuple[str, Any]], rest: list[str],
                places: dict[str, jax.sharding.Sharding]) -> None:
  """UserError when the params `rest` to initialise cannot fit on a device.

  Their sizes come from the config alone (nothing was read to check them
  against), so a corrupt or mistyped size would otherwise start an allocation
  of terabytes.
  """
  limit = _device_bytes()
  if limit is None or not rest:
    return
  shapes = dict(named)
  need = sum(math.prod(places[p].shard_shape(tuple(shapes[p].shape)))
             * np.dtype(shapes[p].dtype).itemsize for p in rest)
  if need > limit:
    raise UserError(
        f"initialising the model's parameters needs {need / 2**30:,.1f} GiB per device, more "
        f"than the {limit / 2**30:,.1f} GiB a device has: check the sizes in the model's "
        "config (hidden_size, vocab_size, num_hidden_layers, intermediate_size, ...)")


def load(path: str, task: str, *, num_labels: int | None = None,
         id2label: dict[int, str] | None = None, hf_config: Any = None,
         dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, seed: int = 0,
         allow_pickle: bool = False,
         shardings: Callable[[Any], Any] | None = None,
         quantized: dict[str, str] | None = None, heads: Sequence[str] = ()) -> Loaded:
  """Loads a checkpoint as the model of a task kind.

  Params the checkpoint lacks (typically a classification head) are
  initialised from `seed` and listed in `report.missing`; a base-model
  checkpoint (e.g. `ViTModel`) loads with its unused pooler listed in
  `report.unexpected`.

  Args:
    path: checkpoint folder, hub id, or (causal LMs) a llama.cpp `.gguf`
      file, whose tensors are dequantized.
    task: "classify", "causal_lm" or "image_classify" (models.registry).
    num_labels: number of classes of a classifier's head.
    id2label: optional class names.
    hf_config: the transformers config to build from; default: the
      checkpoint's, with the label space above.
    dtype: compute dtype.
    param_dtype: dtype the params are stored in.
    seed: init seed for fresh params.
    allow_pickle: permit reading `pytorch_model.bin` (unpickling).
    shardings: maps the model's abstract state to shardings; the model is then
      initialised sharded, and each process reads from safetensors only the
      slices of each tensor its devices hold (`report.bytes_read`). None:
      everything on the default device.
    quantized: Linear module path -> `tuning.quantize` kind, for frozen
      kernels a QLoRA run stores quantized: each is quantized as soon as it
      is read, so the dense model never exists whole on the devices.
    heads: top-level modules the task adds (`Task.fresh_heads`): where the
      checkpoint's tensor has another shape (a classifier trained on another
      label count: transformers' `ignore_mismatched_sizes=True`), the param is
      initialised fresh and listed in `report.replaced`. Elsewhere another
      shape is an error.

  Raises:
    UserError: missing folder or weights, unsupported model_type, or a
      tensor whose shape does not fit the config.
  """
  source = hub.resolve_model(path, allow_pickle=allow_pickle)
  from_file = hf_config is None
  if hf_config is None:
    hf_config = hub.load_hf_config(source, num_labels=num_labels, id2label=id2label)
  built_from = _config_source(source) if from_file else "the config given"
  spec = _lookup(hf_config, task, built_from)
  build = lambda: build_model(hf_config, task, dtype=dtype, param_dtype=param_dtype, seed=seed)
  with weights.open_weights(source, allow_pickle) as ckpt:
    # A kernel the checkpoint lacks is initialised dense (`split` quantizes it later).
    present = {path: kind for path, kind in (quantized or {}).items()
               if any(k in ckpt.tensors for k, _ in spec.layout.candidates(f"{path}/kernel",
                                                                          ckpt.fmt))}
    try:
      graphdef, abstract, places, kernels = _abstract(build, shardings, present)
    except UserError as e:  # A value the model cannot take (an activation, a head count).
      raise UserError(f"{built_from}: {e}") from e
    values, report = _read_params(abstract, spec.layout, ckpt, param_dtype, places, kernels,
                                  built_from, heads)
  return Loaded(model=_materialise(build, values, graphdef, abstract, places),
                hf_config=hf_config, report=report, path=source)


def _config_source(source: str) -> str:
  """The file a checkpoint's config comes from: its config.json, or the GGUF file."""
  return source if gguf.is_gguf(source) else os.path.join(source, hub.CONFIG)


def _lookup(hf_config: transformers.PretrainedConfig, task: str, built_from: str
            ) -> registry.ModelSpec:
  """`registry.lookup`, its UserError naming the config the model_type came from."""
  try:
    return registry.lookup(hf_config.model_type, task)
  except UserError as e:
    raise UserError(f"{built_from}: {e}") from e


def init_model(hf_config: transformers.PretrainedConfig, task: str, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, seed: int = 0,
               shardings: Callable[[Any], Any] | None = None) -> Loaded:
  """A randomly initialised model of `hf_config` (training from scratch): no weights read."""
  build = lambda: build_model(hf_config, task, dtype=dtype, param_dtype=param_dtype, seed=seed)
  return Loaded(model=_materialise(build, {}, *_abstract(build, shardings)[:3]),
                hf_config=hf_config, report=LoadReport([], []), path="")


def export_tensors(model: nnx.Module, layout: naming.CheckpointLayout,
                   keep: Callable[[str], bool] = lambda path: True
                   ) -> Iterator[tuple[str, str, np.ndarray]]:
  """(our path, checkpoint key, array in the checkpoint's layout) per param and statistic.

  Params and BatchNorm running means and variances come out float32; a
  BatchNorm's batch count int64, as torch's `num_batches_tracked`. Only
  variables whose path `keep` accepts; sharded ones are gathered, so every
  process must iterate. Quantized kernels (QLoRA) come out dense,
  dequantized one layer at a time; their scales are no checkpoint entry.
  """
  quantized = {"/".join(map(str, p)) + "/kernel": m for p, m in nnx.iter_modules(model)
               if isinstance(m, layers.Linear) and m.quantized}
  for path, var in param_paths.named_variables(nnx.state(model, _CHECKPOINTED)):
    if not keep(path) or path.endswith("/kernel_scale"):
      continue
    key, transform = layout.export_name(path)
    value = quantized[path].weight(jnp.float32) if path in quantized else var.get_value()
    value = sharding.to_host(value)
    value = transform.to_theirs(value.astype(np.int64 if _is_int(value.dtype) else np.float32))
    # Not ascontiguousarray: it makes a scalar (a batch count) 1-D.
    yield path, key, np.asarray(value, order="C")


def export(model: nnx.Module, hf_config: transformers.PretrainedConfig, task: str,
           out_dir: str, *, tokenizer_path: str | None = None,
           processor_path: str | None = None) -> None:
  """Writes `model` as an HF folder that transformers' Auto class for the task loads.

  Writes config.json (architectures, labels, dtype float32), model.safetensors
  (float32, PyTorch names and layout, with the base-model prefix; BatchNorm
  statistics too, their batch counts int64) and, if
  given, the tokenizer of `tokenizer_path` and the `preprocessor_config.json`
  of the folder `processor_path`. Every process must call this (sharded
  params are gathered); only process 0 writes.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  spec = registry.lookup(hf_config.model_type, task)
  tensors = {key: value for _, key, value in export_tensors(model, spec.layout)}
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  # transformers refuses safetensors files without a "format" entry.
  save_file(tensors, os.path.join(out_dir, weights.SAFETENSORS), metadata={"format": "pt"})
  config = copy.deepcopy(hf_config)
  config.label2id = {name: i for i, name in config.id2label.items()}
  config.architectures = [spec.architecture]
  config.dtype = "float32"
  config.save_pretrained(out_dir)
  if tokenizer_path is not None:
    hub.load_tokenizer(tokenizer_path).save_pretrained(out_dir)
  source = processor_path and os.path.join(processor_path, PREPROCESSOR_CONFIG)
  if source and os.path.exists(source):
    shutil.copy(source, os.path.join(out_dir, PREPROCESSOR_CONFIG))
