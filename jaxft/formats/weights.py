"""Checkpoint weights by name, whatever the file format: one lazy tensor map.

safetensors (single or sharded; read tensor by tensor from the mmap),
transformers' old Flax `flax_model.msgpack`, a llama.cpp `.gguf` file
(dequantized, under transformers' names), or, only with `allow_pickle`,
`pytorch_model.bin` (torch.load with weights_only=True). Which names map to
which parameter is the model family's business (models/naming.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable, Iterator

import numpy as np

from jaxft.errors import UserError
from jaxft.formats import gguf

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


@dataclasses.dataclass
class Weights:
  """Tensors of one checkpoint by dotted key, each read when called.

  Attributes:
    fmt: which naming rules apply ("torch": transformers' PyTorch names,
      "flax": transformers' old Flax names).
    readers: key -> a function that reads the tensor.
    source: the files, for messages.
  """
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
def _open_safetensors(files: list[str]) -> Iterator[Weights]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with contextlib.ExitStack() as stack:
    readers = {}
    for file in files:
      handle = stack.enter_context(safe_open(file, framework="np"))
      for key in handle.keys():
        # Tensors are read one at a time, when matched, from the mmap.
        readers[key] = lambda h=handle, k=key: h.get_tensor(k)
    yield Weights("torch", readers, ", ".join(files))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for name, value in tree.items():
    key = f"{prefix}{name}"
    if isinstance(value, dict):
      out.update(_flatten(value, key + "."))
    else:
      out[key] = np.asarray(value)
  return out


def _read_msgpack(file: str) -> Weights:
  from flax import serialization  # pylint: disable=g-import-not-at-top
  with open(file, "rb") as f:
    # msgpack_restore only rebuilds arrays and dicts: no code runs.
    tensors = _flatten(serialization.msgpack_restore(f.read()))
  return Weights("flax", {k: (lambda v=v: v) for k, v in tensors.items()},
                     file)


def _torch_to_numpy(tensor: Any) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
    tensor = tensor.float()
  return tensor.detach().cpu().numpy()


def _read_torch_bin(files: list[str]) -> Weights:
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
  return Weights("torch", {k: (lambda v=v: v) for k, v in tensors.items()},
                     ", ".join(files))


@contextlib.contextmanager
def open_weights(folder: str, allow_pickle: bool = False) -> Iterator[Weights]:
  """The weights of a checkpoint folder (safest format first) or a `.gguf` file."""
  if gguf.is_gguf(folder):
    yield Weights("torch", gguf.checkpoint(folder), folder)
    return
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
