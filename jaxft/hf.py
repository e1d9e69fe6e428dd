"""Reading and writing Hugging Face checkpoints.

In: a local folder or hub id with `config.json` and weights as safetensors
(single or sharded), transformers' old `flax_model.msgpack`, or, only with
`allow_pickle=True`, `pytorch_model.bin`. Out: `config.json`,
`model.safetensors` (float32, PyTorch layout and names) and tokenizer files
that `transformers.AutoModelForSequenceClassification` loads as is.

Names and layouts are translated by each model family's `CheckpointLayout`
(see `jaxft.models.registry`); this file only knows file formats.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import shutil
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from jaxft import gguf_checkpoint
from jaxft import params as params_lib
from jaxft import sharding
from jaxft.errors import UserError
from jaxft.models import layers
from jaxft.models import registry

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"

# What a hub download fetches: config, weights we can read safely, tokenizer.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*",
                 FLAX_MSGPACK]
_HUB_PICKLE_PATTERNS = ["*.bin"]
# Top-level files only: repos keep ONNX/OpenVINO exports and sentence-
# transformers modules in subfolders, which would otherwise match too.
_HUB_IGNORE = ["*/*"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

# Non-persistent buffers that older transformers versions still saved.
_IGNORED_KEYS = re.compile(r"(^|\.)(position_ids|embeddings\.token_type_ids)$")


@dataclasses.dataclass
class LoadReport:
  """What a load did not match.

  Attributes:
    missing: our param paths that were initialised fresh (e.g. the head).
    unexpected: checkpoint keys that were not used.
  """
  missing: list[str]
  unexpected: list[str]


@dataclasses.dataclass
class Loaded:
  """A model loaded from an HF checkpoint, with its config and report."""
  model: nnx.Module
  hf_config: transformers.PretrainedConfig
  report: LoadReport
  path: str


# --- locating files ----------------------------------------------------------

def resolve_path(path_or_hub_id: str, *, allow_pickle: bool = False,
                 weights: bool = True) -> str:
  """A local checkpoint folder for a folder path or a hub id.

  Args:
    path_or_hub_id: an existing folder (returned as is, made absolute), or a
      Hugging Face hub id such as `org/name`, which is downloaded (config,
      safetensors, msgpack and tokenizer files; `*.bin` only with
      `allow_pickle`) into the hub cache.
    allow_pickle: also download pickled PyTorch weights.
    weights: False fetches only config and tokenizer files (for `inspect`).

  Returns:
    The local folder.

  Raises:
    UserError: the folder does not exist and the name is not a downloadable
      hub id.
  """
  path = os.path.expanduser(path_or_hub_id)
  if os.path.isdir(path):
    return os.path.abspath(path)
  if os.path.exists(path):
    raise UserError(f"Checkpoint path {path!r} is a file; expected a folder "
                    "with config.json and weights.")
  if path_or_hub_id.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(
      path_or_hub_id):
    raise UserError(f"Checkpoint folder {path!r} does not exist.")
  return _download(path_or_hub_id, allow_pickle, weights)


def resolve_model(path_or_hub_id: str, *, allow_pickle: bool = False,
                  weights: bool = True) -> str:
  """As `resolve_path`, but a `.gguf` file is a model too (returned absolute)."""
  if gguf_checkpoint.is_gguf(path_or_hub_id):
    path = os.path.abspath(os.path.expanduser(path_or_hub_id))
    if not os.path.isfile(path):
      raise UserError(f"GGUF file not found: {path}")
    return path
  return resolve_path(path_or_hub_id, allow_pickle=allow_pickle, weights=weights)


def _download(repo_id: str, allow_pickle: bool, weights: bool) -> str:
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  patterns = _HUB_PATTERNS + (_HUB_PICKLE_PATTERNS if allow_pickle else [])
  if not weights:
    patterns = [p for p in patterns if p not in ("*.safetensors", "*.bin", FLAX_MSGPACK)]
  try:
    return huggingface_hub.snapshot_download(
        repo_id, allow_patterns=patterns, ignore_patterns=_HUB_IGNORE)
  except Exception as e:  # every failure means the same to the user
    raise UserError(
        f"{repo_id!r} is not a local folder, and downloading it from the "
        f"Hugging Face hub failed ({type(e).__name__}: {e}). Check the path, "
        "the hub id, your network, and HF_TOKEN for gated models.") from e


# --- config and tokenizer ----------------------------------------------------

def load_hf_config(path: str, *, num_labels: int | None = None,
                   id2label: dict[int, str] | None = None
                   ) -> transformers.PretrainedConfig:
  """Reads `config.json` and sets the label space.

  Args:
    path: checkpoint folder (or hub id).
    num_labels: number of classes; keeps the checkpoint's label names when it
      already has that many.
    id2label: class index -> name; implies num_labels and sets label2id.

  Raises:
    UserError: unreadable config, or num_labels and id2label disagree.
  """
  folder = resolve_path(path)
  try:
    config = transformers.AutoConfig.from_pretrained(folder,
                                                     trust_remote_code=False)
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"Cannot read a model config from {folder!r}: {e}") from e
  if id2label is not None:
    _set_labels(config, id2label, num_labels)
  elif num_labels is not None:
    config.num_labels = num_labels
  # transformers 5 does not derive label2id when id2label changes.
  config.label2id = {name: i for i, name in config.id2label.items()}
  return config


def load_lm_config(path: str) -> transformers.PretrainedConfig:
  """The transformers config of a causal LM folder, hub id or `.gguf` file."""
  if gguf_checkpoint.is_gguf(path):
    return gguf_checkpoint.read_config(path)
  return load_hf_config(path)


def _set_labels(config: transformers.PretrainedConfig,
                id2label: dict[int, str], num_labels: int | None) -> None:
  labels = {int(i): str(name) for i, name in id2label.items()}
  if sorted(labels) != list(range(len(labels))):
    raise UserError(f"id2label keys must be 0..n-1, got {sorted(labels)}.")
  if num_labels is not None and num_labels != len(labels):
    raise UserError(f"num_labels={num_labels} but id2label has "
                    f"{len(labels)} entries.")
  config.id2label = labels


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
  """The fast tokenizer of a checkpoint folder, hub id or GGUF file; no remote code."""
  if gguf_checkpoint.is_gguf(path):
    return gguf_checkpoint.load_tokenizer(path)
  folder = resolve_path(path)
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        folder, use_fast=True, trust_remote_code=False)
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"Cannot load a tokenizer from {folder!r}: {e}") from e
  if not tokenizer.is_fast:
    raise UserError(f"The tokenizer in {folder!r} has no fast (Rust) version; "
                    "jaxft needs one (add a tokenizer.json).")
  return tokenizer


# --- building models ---------------------------------------------------------

def build_classifier(hf_config: transformers.PretrainedConfig, *,
                     dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                     seed: int = 0) -> nnx.Module:
  """A randomly initialised sequence classifier for `hf_config`.

  Works under `nnx.eval_shape` for abstract builds.
  """
  return build_model(hf_config, registry.CLASSIFY, dtype=dtype, param_dtype=param_dtype,
                     seed=seed)


def build_model(hf_config: transformers.PretrainedConfig, task: str, *,
                dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                seed: int = 0) -> nnx.Module:
  """A randomly initialised model for `hf_config` and a task of `registry`."""
  spec = registry.lookup(hf_config.model_type, task)
  return spec.module(hf_config, dtype=dtype, param_dtype=param_dtype,
                     rngs=nnx.Rngs(params=seed))


# --- reading checkpoints -----------------------------------------------------

@dataclasses.dataclass
class _Checkpoint:
  """Tensors of one checkpoint by dotted key; `fmt` picks the name rules."""
  fmt: str
  readers: dict[str, Callable[[], np.ndarray]]
  source: str


def _weight_files(folder: str, single: str, index: str) -> list[str] | None:
  """The shard files an index lists, else the single file, else None."""
  index_path = os.path.join(folder, index)
  if os.path.exists(index_path):
    with open(index_path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(folder, s) for s in shards]
  single_path = os.path.join(folder, single)
  return [single_path] if os.path.exists(single_path) else None


@contextlib.contextmanager
def _open_safetensors(files: list[str]) -> Iterator[_Checkpoint]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with contextlib.ExitStack() as stack:
    readers = {}
    for file in files:
      handle = stack.enter_context(safe_open(file, framework="np"))
      for key in handle.keys():
        # Tensors are read one at a time, when matched, from the mmap.
        readers[key] = lambda h=handle, k=key: h.get_tensor(k)
    yield _Checkpoint("torch", readers, ", ".join(files))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for name, value in tree.items():
    key = f"{prefix}{name}"
    if isinstance(value, dict):
      out.update(_flatten(value, key + "."))
    else:
      out[key] = np.asarray(value)
  return out


def _read_msgpack(file: str) -> _Checkpoint:
  from flax import serialization  # pylint: disable=g-import-not-at-top
  with open(file, "rb") as f:
    # msgpack_restore only rebuilds arrays and dicts: no code runs.
    tensors = _flatten(serialization.msgpack_restore(f.read()))
  return _Checkpoint("flax", {k: (lambda v=v: v) for k, v in tensors.items()},
                     file)


def _torch_to_numpy(tensor: Any) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
    tensor = tensor.float()
  return tensor.detach().cpu().numpy()


def _read_torch_bin(files: list[str]) -> _Checkpoint:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("Loading pytorch_model.bin needs PyTorch, which is not "
                    "installed (pip install torch), or convert the checkpoint "
                    "to safetensors.") from None
  tensors = {}
  for file in files:
    state = torch.load(file, map_location="cpu", weights_only=True)
    tensors.update({k: _torch_to_numpy(v) for k, v in state.items()})
  return _Checkpoint("torch", {k: (lambda v=v: v) for k, v in tensors.items()},
                     ", ".join(files))


@contextlib.contextmanager
def _open_checkpoint(folder: str, allow_pickle: bool) -> Iterator[_Checkpoint]:
  """The weights of `folder`, safest format first."""
  safetensors_files = _weight_files(folder, SAFETENSORS, SAFETENSORS_INDEX)
  if safetensors_files:
    with _open_safetensors(safetensors_files) as ckpt:
      yield ckpt
    return
  if os.path.exists(os.path.join(folder, FLAX_MSGPACK)):
    yield _read_msgpack(os.path.join(folder, FLAX_MSGPACK))
    return
  bin_files = _weight_files(folder, TORCH_BIN, TORCH_BIN_INDEX)
  if bin_files and not allow_pickle:
    raise UserError(
        f"{folder!r} has only pickled PyTorch weights ({TORCH_BIN}), which can "
        "run arbitrary code when loaded, so jaxft does not read them by "
        "default. Set config.model.allow_pickle=True if you trust the source, "
        "or convert the checkpoint to safetensors.")
  if bin_files:
    yield _read_torch_bin(bin_files)
    return
  raise UserError(
      f"No weights found in {folder!r}: expected {SAFETENSORS}, "
      f"{SAFETENSORS_INDEX}, {FLAX_MSGPACK} or (with "
      f"config.model.allow_pickle=True) {TORCH_BIN}. Found: "
      f"{sorted(os.listdir(folder))}.")


def _read_params(abstract: nnx.State, layout: layers.CheckpointLayout, ckpt: _Checkpoint,
                 param_dtype: Any, places: dict[str, Any]
                 ) -> tuple[dict[str, jax.Array], LoadReport]:
  """The checkpoint tensors of `abstract`'s params, placed; the report of the rest."""
  flat = params_lib.named_variables(nnx.state(abstract, nnx.Param))
  values, used, missing = {}, set(), []
  for path, var in flat:
    found = [(k, t) for k, t in layout.candidates(path, ckpt.fmt)
             if k in ckpt.readers]
    if not found:
      missing.append(path)
      continue
    key, transform = found[0]
    raw = ckpt.readers[key]()
    value = transform.to_ours(raw)
    if value.shape != var.shape:
      raise UserError(
          f"Checkpoint tensor {key!r} has shape {raw.shape} (as our param "
          f"{path!r}: {value.shape}) but the model built from config.json "
          f"expects {var.shape}. Is num_labels or the config right?")
    values[path] = _place(value.astype(param_dtype), places[path])
    used.add(key)
  if not used:
    raise UserError(
        f"No tensor in {ckpt.source} matches a parameter of the model "
        f"(e.g. {layout.candidates(flat[0][0], ckpt.fmt)[0][0]!r}); "
        "does config.json's model_type match the weights?")
  unexpected = sorted(k for k in ckpt.readers
                      if k not in used and not _IGNORED_KEYS.search(k))
  return values, LoadReport(missing=missing, unexpected=unexpected)


def _place(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """`value` laid out by `sharding`: each device gets only its own slice."""
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _placements(abstract: nnx.State, shardings: Callable[[Any], Any] | None
                ) -> dict[str, jax.sharding.Sharding]:
  """Where each variable of the model goes, by path: `shardings`, else the default device."""
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {path: device for path, _ in params_lib.named_variables(abstract)}
  leaves = jax.tree_util.tree_flatten_with_path(shardings(abstract))[0]
  return {params_lib.path_str(kp): s for kp, s in leaves}


def _abstract(build: Callable[[], nnx.Module], shardings: Callable[[Any], Any] | None
              ) -> tuple[nnx.GraphDef, nnx.State, dict[str, jax.sharding.Sharding]]:
  """(graph, abstract state, placements) of the model `build` makes, nothing computed."""
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  return graphdef, abstract, _placements(abstract, shardings)


def _materialise(build: Callable[[], nnx.Module], values: dict[str, jax.Array],
                 graphdef: nnx.GraphDef, abstract: nnx.State,
                 places: dict[str, jax.sharding.Sharding]) -> nnx.Module:
  """The model `build` makes, with `values` for those paths and its own init elsewhere.

  Only the variables without a value are initialised, directly into their
  shards, in one jitted program: XLA drops the random draws of everything
  else, which for a loaded checkpoint is nearly the whole model (a 1B model's
  init would cost tens of seconds on a CPU, to be overwritten).
  """
  named = params_lib.named_variables(abstract)
  rest = [path for path, _ in named if path not in values]
  if rest:
    def init() -> list[jax.Array]:
      built = dict(params_lib.named_variables(nnx.split(build())[1]))
      return [built[path].get_value() for path in rest]
    values = {**values, **dict(zip(rest, jax.jit(
        init, out_shardings=[places[path] for path in rest])()))}
  treedef = jax.tree_util.tree_structure(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
  state = jax.tree_util.tree_unflatten(treedef, [var.replace(values[path]) for path, var in named])
  return nnx.merge(graphdef, state)


def load_classifier(path: str, *, num_labels: int,
                    id2label: dict[int, str] | None = None,
                    dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    seed: int = 0, allow_pickle: bool = False,
                    shardings: Callable[[Any], Any] | None = None) -> Loaded:
  """Loads an HF checkpoint as a sequence classifier.

  Params the checkpoint lacks (typically the classification head) are
  initialised from `seed` and listed in `report.missing`.

  Args:
    path: checkpoint folder or hub id.
    num_labels: number of classes of the head.
    id2label: optional class names.
    dtype: compute dtype.
    param_dtype: dtype the params are stored in.
    seed: init seed for fresh params.
    allow_pickle: permit reading `pytorch_model.bin` (unpickling).
    shardings: maps the model's abstract state to shardings; the model is then
      initialised sharded and each checkpoint tensor is copied straight into
      its shards. None: everything on the default device.

  Raises:
    UserError: missing folder or weights, unsupported model_type, or a
      tensor whose shape does not fit the config.
  """
  folder = resolve_path(path, allow_pickle=allow_pickle)
  hf_config = load_hf_config(folder, num_labels=num_labels, id2label=id2label)
  return _load(folder, hf_config, registry.CLASSIFY, dtype=dtype, param_dtype=param_dtype,
               seed=seed, allow_pickle=allow_pickle, shardings=shardings)


def load_image_classifier(path: str, *, num_labels: int,
                          id2label: dict[int, str] | None = None,
                          dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                          seed: int = 0, allow_pickle: bool = False,
                          shardings: Callable[[Any], Any] | None = None) -> Loaded:
  """Loads an HF checkpoint (ViT) as an image classifier; arguments as `load_classifier`.

  A base-model checkpoint (`ViTModel`, e.g. an in21k backbone) loads with the
  head initialised from `seed` and listed in `report.missing`; its pooler,
  which the classifier does not use, is listed in `report.unexpected`.
  """
  folder = resolve_path(path, allow_pickle=allow_pickle)
  hf_config = load_hf_config(folder, num_labels=num_labels, id2label=id2label)
  return _load(folder, hf_config, registry.IMAGE_CLASSIFY, dtype=dtype,
               param_dtype=param_dtype, seed=seed, allow_pickle=allow_pickle,
               shardings=shardings)


def load_causal_lm(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   seed: int = 0, allow_pickle: bool = False,
                   shardings: Callable[[Any], Any] | None = None) -> Loaded:
  """Loads an HF checkpoint (Llama, Mistral, Qwen2, Qwen3) or a llama.cpp
  `.gguf` file (dequantized) as a causal LM.

  Arguments and errors as `load_classifier`, without the label space.
  """
  if gguf_checkpoint.is_gguf(path):
    hf_config = gguf_checkpoint.read_config(path)
    opener = lambda: contextlib.nullcontext(
        _Checkpoint("torch", gguf_checkpoint.checkpoint(path), path))
    return _load(path, hf_config, registry.CAUSAL_LM, dtype=dtype, param_dtype=param_dtype,
                 seed=seed, opener=opener, shardings=shardings)
  folder = resolve_path(path, allow_pickle=allow_pickle)
  return _load(folder, load_lm_config(folder), registry.CAUSAL_LM, dtype=dtype,
               param_dtype=param_dtype, seed=seed, allow_pickle=allow_pickle,
               shardings=shardings)


def init_model(hf_config: transformers.PretrainedConfig, task: str, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, seed: int = 0,
               shardings: Callable[[Any], Any] | None = None) -> Loaded:
  """A randomly initialised model of `hf_config` (training from scratch): no weights read."""
  build = lambda: build_model(hf_config, task, dtype=dtype, param_dtype=param_dtype, seed=seed)
  return Loaded(model=_materialise(build, {}, *_abstract(build, shardings)), hf_config=hf_config,
                report=LoadReport([], []), path="")


def _load(folder: str, hf_config: transformers.PretrainedConfig, task: str, *,
          dtype: Any, param_dtype: Any, seed: int, allow_pickle: bool = False,
          shardings: Callable[[Any], Any] | None,
          opener: Callable[[], Any] | None = None) -> Loaded:
  opener = opener or (lambda: _open_checkpoint(folder, allow_pickle))
  spec = registry.lookup(hf_config.model_type, task)
  build = lambda: build_model(hf_config, task, dtype=dtype, param_dtype=param_dtype, seed=seed)
  graphdef, abstract, places = _abstract(build, shardings)
  with opener() as ckpt:
    values, report = _read_params(abstract, spec.layout, ckpt, param_dtype, places)
  return Loaded(model=_materialise(build, values, graphdef, abstract, places),
                hf_config=hf_config, report=report, path=folder)


# --- writing checkpoints -----------------------------------------------------

def export_classifier(model: nnx.Module,
                      hf_config: transformers.PretrainedConfig, out_dir: str,
                      *, tokenizer_path: str | None) -> None:
  """Writes `model` as an HF checkpoint transformers can load.

  Writes config.json (architectures, labels, dtype float32), model.safetensors
  (float32, PyTorch names and layout, with the base-model prefix) and, if
  `tokenizer_path` is given, its tokenizer files. Every process must call this
  (sharded params are gathered); only process 0 writes.
  """
  config = copy.deepcopy(hf_config)
  config.label2id = {name: i for i, name in config.id2label.items()}
  _export(model, config, registry.CLASSIFY, out_dir, tokenizer_path)


def export_image_classifier(model: nnx.Module,
                            hf_config: transformers.PretrainedConfig, out_dir: str,
                            *, processor_path: str | None = None) -> None:
  """Writes an image classifier as an HF folder `AutoModelForImageClassification` loads.

  As `export_classifier`; instead of a tokenizer, copies
  `preprocessor_config.json` from the folder `processor_path` when it has one.
  """
  config = copy.deepcopy(hf_config)
  config.label2id = {name: i for i, name in config.id2label.items()}
  _export(model, config, registry.IMAGE_CLASSIFY, out_dir, None)
  source = processor_path and os.path.join(processor_path, PREPROCESSOR_CONFIG)
  if jax.process_index() == 0 and source and os.path.exists(source):
    shutil.copy(source, os.path.join(out_dir, PREPROCESSOR_CONFIG))


def export_causal_lm(model: nnx.Module, hf_config: transformers.PretrainedConfig,
                     out_dir: str, *, tokenizer_path: str | None) -> None:
  """Writes a causal LM as an HF folder `AutoModelForCausalLM` loads (as `export_classifier`)."""
  _export(model, copy.deepcopy(hf_config), registry.CAUSAL_LM, out_dir, tokenizer_path)


def _export(model: nnx.Module, config: transformers.PretrainedConfig, task: str,
            out_dir: str, tokenizer_path: str | None) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  spec = registry.lookup(config.model_type, task)
  tensors = {}
  for path, var in params_lib.named_variables(nnx.state(model, nnx.Param)):
    key, transform = spec.layout.export_name(path)
    value = transform.to_theirs(sharding.to_host(var.get_value()).astype(np.float32))
    tensors[key] = np.ascontiguousarray(value)
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  # transformers refuses safetensors files without a "format" entry.
  save_file(tensors, os.path.join(out_dir, SAFETENSORS), metadata={"format": "pt"})
  config.architectures = [spec.architecture]
  config.dtype = "float32"
  config.save_pretrained(out_dir)
  if tokenizer_path is not None:
    load_tokenizer(tokenizer_path).save_pretrained(out_dir)
