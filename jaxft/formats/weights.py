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
import math
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
    file: the file it is in, for messages ("" where the checkpoint's `source`
      says it).
  """
  shape: tuple[int, ...] | None
  dtype: np.dtype | None
  read: Callable[[Index | None], np.ndarray]
  sliceable: bool = False
  file: str = ""


def _in_memory(value: np.ndarray, file: str) -> Tensor:
  """A Tensor over an array already read (msgpack, .bin) from `file`."""
  return Tensor(value.shape, value.dtype,
                lambda index: value if index is None else value[index], file=file)


def _whole(read: Callable[[], np.ndarray], file: str) -> Tensor:
  """A Tensor of `file` whose format reads only whole tensors, of unknown shape until read."""
  return Tensor(None, None, lambda index: read() if index is None else read()[index], file=file)


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
  """The shard files an index lists, else the single file, else None.

  Raises:
    UserError: the index is not JSON with a `weight_map` of file names, or
      names a file that is missing or outside the folder.
  """
  index_path = os.path.join(folder, index)
  if os.path.exists(index_path):
    return [os.path.join(folder, s) for s in _index_shards(index_path)]
  single_path = os.path.join(folder, single)
  return [single_path] if os.path.exists(single_path) else None


def _index_shards(index_path: str) -> list[str]:
  """The sorted shard file names of a `*.index.json`, each checked to exist beside it."""
  try:
    with open(index_path, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"cannot read the weight index {index_path}: "
                    f"{type(e).__name__}: {e}") from e
  if not isinstance(weight_map, dict) or not all(
      isinstance(v, str) for v in weight_map.values()):
    raise UserError(f"{index_path}: weight_map must map tensor names to file names")
  folder = os.path.dirname(index_path)
  shards = sorted(set(weight_map.values()))
  for shard in shards:
    # A shard is a file beside the index: a path elsewhere is corrupt or hostile.
    if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(folder, shard)):
      raise UserError(f"{index_path} lists weight file {shard!r}, which is not a file in "
                      f"{folder}")
  return shards


# safetensors' own cap on its JSON header: a larger length field is corrupt.
_MAX_HEADER_BYTES = 100_000_000


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One tensor of a safetensors header: dtype name, shape, first byte in the file."""
  dtype: str
  shape: tuple[int, ...]
  start: int


def _bad_file(file: str, why: str) -> UserError:
  return UserError(f"cannot read safetensors file {file}: {why}")


def _safetensors_header(file: str) -> tuple[dict[str, Any], int]:
  """(the parsed JSON header, the number of data bytes after it).

  The 8-byte length field is checked against the file's size before the header
  is read, so a corrupt length cannot make this read or allocate more than the
  file holds.
  """
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise _bad_file(file, f"{size} bytes, too short for the 8-byte header length")
    length = int.from_bytes(prefix, "little")
    if length > size - 8 or length > _MAX_HEADER_BYTES:
      raise _bad_file(file, f"its header length field says {length:,} bytes, more than "
                      f"the file's {size:,} or safetensors' limit of {_MAX_HEADER_BYTES:,} "
                      "(truncated, or not a safetensors file)")
    raw = f.read(length)
  try:
    header = json.loads(raw.decode("utf-8"))
  except ValueError as e:  # UnicodeDecodeError and JSONDecodeError both are.
    raise _bad_file(file, f"its JSON header is malformed ({e})") from e
  if not isinstance(header, dict):
    raise _bad_file(file, "its header is not a JSON object")
  return header, size - 8 - length


def _naturals(value: Any) -> bool:
  """Whether `value` is a JSON list of non-negative integers."""
  return isinstance(value, list) and all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _safetensors_entry(file: str, name: str, entry: Any, data_start: int,
                       data_bytes: int) -> _Entry:
  """One header entry, checked: a dtype jaxft reads, and a shape whose bytes are the
  data_offsets' span, inside the file."""
  where = f"tensor {name!r}"
  if not isinstance(entry, dict):
    raise _bad_file(file, f"{where}: its header entry is not a JSON object")
  dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
  if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
    raise _bad_file(file, f"{where} has dtype {dtype!r}; jaxft reads "
                    f"{', '.join(_SAFETENSORS_DTYPES)}")
  if not _naturals(shape):
    raise _bad_file(file, f"{where} has shape {shape!r}; expected a list of integers >= 0")
  if not (_naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
    raise _bad_file(file, f"{where} has data_offsets {offsets!r}; expected [begin, end]")
  begin, end = offsets
  if end > data_bytes:
    raise _bad_file(file, f"the data of {where} (bytes {begin:,}..{end:,}) runs past the "
                    f"end of the file's {data_bytes:,} data bytes (truncated?)")
  nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
  if end - begin != nbytes:
    raise _bad_file(file, f"{where} has shape {shape} of {dtype} ({nbytes:,} bytes) but "
                    f"its data_offsets span {end - begin:,} bytes")
  return _Entry(dtype, tuple(shape), data_start + begin)


def _safetensors_layout(file: str) -> dict[str, _Entry]:
  """Tensor name -> its dtype, shape and place, from a safetensors header checked
  against the file (reads the header only).

  Raises:
    UserError: naming the file (and the tensor): too short, a header length
      beyond the file, a header that is not a JSON object, or a tensor with a
      dtype jaxft does not read, a malformed shape or data_offsets, data
      beyond the end of the file, or a shape whose size is not its data's.
  """
  header, data_bytes = _safetensors_header(file)
  data_start = os.path.getsize(file) - data_bytes
  return {name: _safetensors_entry(file, name, entry, data_start, data_bytes)
          for name, entry in header.items() if name != "__metadata__"}


# dtypes safetensors' numpy reads cannot return (it looks them up in numpy, which
# lacks them): read from a memory map of the file instead.
_MEMMAP_DTYPES = ("F8_E4M3", "F8_E5M2")


def _read_safetensors(file: str, key: str, entry: _Entry, index: Index | None) -> np.ndarray:
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top
  try:
    if entry.dtype in _MEMMAP_DTYPES:
      return _read_mapped(file, entry, index)
    # A handle per read: the file's mmap goes when it closes, so the pages a
    # read touched do not stay resident (a slice across rows touches every page
    # of its tensor, and a whole file's would add up to the checkpoint).
    with safe_open(file, framework="np") as handle:
      return handle.get_tensor(key) if index is None else handle.get_slice(key)[index]
  except (OSError, SafetensorError) as e:  # The file changed or went since it was opened.
    raise UserError(f"cannot read tensor {key!r} from {file}: {e}") from e


def _read_mapped(file: str, entry: _Entry, index: Index | None) -> np.ndarray:
  dtype = _SAFETENSORS_DTYPES[entry.dtype]
  if math.prod(entry.shape) == 0:  # numpy cannot map zero bytes.
    value = np.zeros(entry.shape, dtype)
    return value if index is None else value[index]
  mapped = np.memmap(file, dtype, mode="r", offset=entry.start, shape=entry.shape)
  return np.array(mapped if index is None else mapped[index])


def _open_safetensors(files: list[str]) -> Weights:
  tensors = {}
  for file in files:
    layout = _safetensors_layout(file)
    _check_with_library(file)
    for key, entry in layout.items():
      tensors[key] = Tensor(
          entry.shape, _SAFETENSORS_DTYPES[entry.dtype],
          functools.partial(_read_safetensors, file, key, entry), sliceable=True, file=file)
  return Weights("torch", tensors, ", ".join(files))


def _check_with_library(file: str) -> None:
  """UserError naming `file` where safetensors itself rejects it (overlapping or
  uncovered data, bad metadata: what `_safetensors_layout` does not check)."""
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(file, framework="np"):
      pass
  except (OSError, SafetensorError) as e:
    raise _bad_file(file, str(e)) from e


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
    raw = f.read()
  try:
    # msgpack_restore only rebuilds arrays and dicts: no code runs.
    restored = serialization.msgpack_restore(raw)
    if not isinstance(restored, dict):
      raise TypeError(f"it holds a {type(restored).__name__}, not a dict of arrays")
    tensors = _flatten(restored)
  except Exception as e:  # msgpack and numpy raise many types for corrupt data.
    raise UserError(f"cannot read {file}: {type(e).__name__}: {e}") from e
  return Weights("flax", {k: _in_memory(v, file) for k, v in tensors.items()}, file)


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
    try:
      state = torch.load(file, map_location="cpu", weights_only=True)
      tensors.update({k: _in_memory(_torch_to_numpy(v), file) for k, v in state.items()})
    except Exception as e:  # pickle, zip and torch errors: all mean "cannot use this file".
      raise UserError(f"cannot read {file}: {type(e).__name__}: {e}") from e
  return Weights("torch", tensors, ", ".join(files))


@contextlib.contextmanager
def open_weights(folder: str, allow_pickle: bool = False) -> Iterator[Weights]:
  """The weights of a checkpoint folder (safest format first) or a `.gguf` file."""
  if gguf.is_gguf(folder):
    yield Weights("torch", {k: _whole(r, folder) for k, r in gguf.checkpoint(folder).items()},
                  folder)
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
