"""Checkpoint weights by name, whatever the file format: one lazy tensor map.

safetensors (single or sharded; any slice of a tensor read on its own),
transformers' old Flax `flax_model.msgpack`, a llama.cpp `.gguf` file
(dequantized, under transformers' names), or, only with `allow_pickle`,
`pytorch_model.bin` (torch.load with weights_only=True). Which names map to
which parameter is the model family's business (models/naming.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np

from jaxft.errors import UserError
from jaxft.formats import gguf

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


# One slice per dimension, as `jax.make_array_from_callback` passes them.
Index = tuple[slice, ...]

# safetensors dtype names -> numpy's (bfloat16 and float8 from ml_dtypes, as
# safetensors' numpy reads return them).
_SAFETENSORS_DTYPES = {name: np.dtype(t) for name, t in {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}.items()}


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One checkpoint tensor, read only when asked.

  Attributes:
    shape: as stored; None where the format knows it only by reading (GGUF).
    dtype: as stored; None where unknown until read (GGUF, rare safetensors
      dtypes).
    read: index in the checkpoint's layout, or None for the whole tensor ->
      that array.
    sliceable: whether `read` of an index reads only that slice from the file
      (safetensors); otherwise it reads the whole tensor and slices it.
  """
  shape: tuple[int, ...] | None
  dtype: np.dtype | None
  read: Callable[[Index | None], np.ndarray]
  sliceable: bool = False


def _in_memory(value: np.ndarray) -> Tensor:
  """A Tensor over an array already read (msgpack, .bin)."""
  return Tensor(value.shape, value.dtype,
                lambda index: value if index is None else value[index])


def _whole(read: Callable[[], np.ndarray]) -> Tensor:
  """A Tensor whose format reads only whole tensors, of unknown shape until read."""
  return Tensor(None, None, lambda index: read() if index is None else read()[index])


@dataclasses.dataclass
class Weights:
  """Tensors of one checkpoint by dotted key, each read when asked.

  Attributes:
    fmt: which naming rules apply ("torch": transformers' PyTorch names,
      "flax": transformers' old Flax names).
    tensors: key -> the lazy tensor.
    source: the files, for messages.
    bytes_read: bytes of the arrays `read` returned so far (whole tensors or
      slices, in the checkpoint's dtype; .bin bfloat16 comes as float32).
  """
  fmt: str
  tensors: dict[str, Tensor]
  source: str
  bytes_read: int = 0

  def read(self, key: str, index: Index | None = None) -> np.ndarray:
    """Tensor `key`, or its slice `index` (in the checkpoint's layout)."""
    value = self.tensors[key].read(index)
    self.bytes_read += value.nbytes
    return value


def _weight_files(folder: str, single: str, index: str) -> list[str] | None:
  """The shard files an index lists, else the single file, else None."""
  index_path = os.path.join(folder, index)
  if os.path.exists(index_path):
    with open(index_path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(folder, s) for s in shards]
  single_path = os.path.join(folder, single)
  return [single_path] if os.path.exists(single_path) else None


def _read_safetensors(file: str, key: str, index: Index | None) -> np.ndarray:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  # A handle per read: the file's mmap goes when it closes, so the pages a
  # read touched do not stay resident (a slice across rows touches every page
  # of its tensor, and a whole file's would add up to the checkpoint).
  with safe_open(file, framework="np") as handle:
    return handle.get_tensor(key) if index is None else handle.get_slice(key)[index]


def _open_safetensors(files: list[str]) -> Weights:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  tensors = {}
  for file in files:
    with safe_open(file, framework="np") as handle:
      for key in handle.keys():
        info = handle.get_slice(key)
        tensors[key] = Tensor(
            tuple(info.get_shape()), _SAFETENSORS_DTYPES.get(info.get_dtype()),
            functools.partial(_read_safetensors, file, key), sliceable=True)
  return Weights("torch", tensors, ", ".join(files))


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
  return Weights("flax", {k: _in_memory(v) for k, v in tensors.items()}, file)


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
  return Weights("torch", {k: _in_memory(v) for k, v in tensors.items()}, ", ".join(files))


@contextlib.contextmanager
def open_weights(folder: str, allow_pickle: bool = False) -> Iterator[Weights]:
  """The weights of a checkpoint folder (safest format first) or a `.gguf` file."""
  if gguf.is_gguf(folder):
    yield Weights("torch", {k: _whole(r) for k, r in gguf.checkpoint(folder).items()}, folder)
    return
  safetensors_files = _weight_files(folder, SAFETENSORS, SAFETENSORS_INDEX)
  if safetensors_files:
    yield _open_safetensors(safetensors_files)
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
