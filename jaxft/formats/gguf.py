"""Reading llama.cpp GGUF files: config, tensors (dequantized), tokenizer.

GGUF stores a Llama-architecture model under llama.cpp's names
(`blk.3.attn_q.weight`), quantized, with Q and K rows permuted for its RoPE
layout. `checkpoint` maps names to transformers' and undoes the permutation,
so the rest of jaxft sees a transformers checkpoint; tensors are dequantized
one at a time, when read, with the `gguf` package (numpy; no torch).
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import re
import struct
from typing import Any, Callable

import numpy as np
import transformers

from jaxft.errors import UserError

# llama.cpp tensor name -> transformers state-dict key (the writer, gguf_export.py,
# maps them back).
NAMES = (
    (r"token_embd\.weight", r"model.embed_tokens.weight"),
    (r"output_norm\.weight", r"model.norm.weight"),
    (r"output\.weight", r"lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
)


def is_gguf(path: str) -> bool:
  return path.endswith(".gguf")


def _reader(path: str):
  if not os.path.isfile(path):
    raise UserError(f"GGUF file not found: {path}")
  stat = os.stat(path)
  return _parsed(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


# Parsing the metadata (every vocabulary string and merge, one numpy view
# each) takes ~6 s for SmolLM2 on a CPU core, and one load needs the reader
# for its config, its tensors and its tokenizer check: parse once per file
# version. The reader memory-maps the file, so keeping it is cheap.
@functools.lru_cache(maxsize=2)
def _parsed(path: str, mtime_ns: int, size: int):
  del mtime_ns, size  # Part of the cache key only: a rewritten file is parsed again.
  import gguf  # pylint: disable=g-import-not-at-top
  check_layout(path)
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # A truncated or foreign file: many error types.
    raise UserError(f"cannot read GGUF file {path}: {e}") from e


# ---------------------------------------------------------------- layout check
#
# gguf's reader trusts the file: a count or length past the end makes it loop
# over empty reads (arrays of numbers, up to 2**64 times) or fail anywhere.
# `check_layout` walks the same header with every size checked against the
# file first, so a corrupt file is a UserError before the reader runs.

# GGUF value type -> bytes of one scalar; 8 (string) and 9 (array) are walked.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_ARRAY_DEPTH = 4  # Real files nest none; a deep nest would only recurse.
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Cursor:
  """Bounds-checked reads through a GGUF header; each read past the end is a UserError."""

  def __init__(self, path: str, data: Any, order: str):
    self.path, self.data, self.order = path, data, order
    self.pos = self.start = 0

  def fail(self, why: str) -> UserError:
    return UserError(f"cannot read GGUF file {self.path}: {why}")

  def skip(self, n: int, what: str) -> None:
    if n > len(self.data) - self.pos:
      raise self.fail(f"{what} ({n:,} bytes at offset {self.pos:,}) runs past the end of "
                      f"the file ({len(self.data):,} bytes): truncated or corrupt")
    self.pos += n

  def number(self, fmt: str, what: str) -> int:
    size = struct.calcsize(fmt)
    self.skip(size, what)
    return struct.unpack_from(self.order + fmt, self.data, self.pos - size)[0]

  def string(self, what: str) -> str:
    self.skip_string(what)
    return bytes(self.data[self.start:self.pos]).decode("utf-8", errors="replace")

  def skip_string(self, what: str) -> None:
    """Skips a length-prefixed string, leaving `start` at its first byte."""
    n = self.number("Q", what)
    self.start = self.pos
    self.skip(n, what)

  def value(self, vtype: int, what: str, depth: int = 0) -> None:
    """Skips one metadata value of type `vtype`."""
    if vtype in _SCALAR_BYTES:
      self.skip(_SCALAR_BYTES[vtype], what)
    elif vtype == _STRING:
      self.skip_string(what)
    elif vtype == _ARRAY and depth < _MAX_ARRAY_DEPTH:
      self._array(what, depth)
    else:
      raise self.fail(f"{what} has value type {vtype}, which GGUF does not define")

  def _array(self, what: str, depth: int) -> None:
    itype, count = self.number("I", what), self.number("Q", what)
    if itype in _SCALAR_BYTES:
      self.skip(count * _SCALAR_BYTES[itype], what)
      return
    # Each element takes at least 4 bytes (an empty string's length is 8, an
    # array's header 12): a count beyond that is corrupt, and walking it would hang.
    if count * 4 > len(self.data) - self.pos:
      raise self.fail(f"{what} claims {count:,} elements, more than the rest of the file holds")
    for _ in range(count):
      self.value(itype, what, depth + 1)


def check_layout(path: str) -> None:
  """Checks a GGUF file's header against its size, without allocating by its counts.

  Every metadata entry and tensor description must lie within the file, and
  each tensor's data (by its type's block size) too.

  Raises:
    UserError: naming the file (and the entry or tensor): too short, not GGUF,
      a count, length or offset past the end, an unknown value or tensor type.
  """
  size = os.path.getsize(path)
  if size < 24:
    raise UserError(f"cannot read GGUF file {path}: {size} bytes, too short for a GGUF header")
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
    if data[:4] != b"GGUF":
      raise UserError(f"cannot read GGUF file {path}: it does not start with GGUF")
    # As gguf's reader: a version whose low half is 0 was written big-endian.
    order = ">" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF == 0 else "<"
    cursor = _Cursor(path, data, order)
    cursor.pos = 8
    tensors, alignment = _walk_header(cursor)
    _check_tensor_data(cursor, tensors, alignment)


def _walk_header(cursor: _Cursor) -> tuple[list[tuple[str, list[int], int, int]], int]:
  """(name, dims, type, offset) per tensor, and the data alignment; the cursor ends
  after the tensor descriptions."""
  n_tensors = cursor.number("Q", "the tensor count")
  n_values = cursor.number("Q", "the metadata count")
  rest = len(cursor.data) - cursor.pos
  # A metadata entry takes at least 13 bytes, a tensor description 24.
  if n_values * 13 > rest or n_tensors * 24 > rest:
    raise cursor.fail(f"its header claims {n_tensors:,} tensors and {n_values:,} metadata "
                      f"entries, more than its {len(cursor.data):,} bytes can hold")
  alignment = 32
  for i in range(n_values):
    key = cursor.string(f"metadata entry {i}'s key")
    vtype = cursor.number("I", f"metadata {key!r}")
    if key == "general.alignment" and vtype == _UINT32:
      alignment = cursor.number("I", f"metadata {key!r}")
      if alignment <= 0 or alignment & (alignment - 1):
        raise cursor.fail(f"general.alignment is {alignment}, not a power of two")
    else:
      cursor.value(vtype, f"metadata {key!r}")
  tensors = []
  for i in range(n_tensors):
    name = cursor.string(f"tensor {i}'s name")
    n_dims = cursor.number("I", f"tensor {name!r}")
    if n_dims > _MAX_DIMS:
      raise cursor.fail(f"tensor {name!r} has {n_dims:,} dimensions; GGUF allows {_MAX_DIMS}")
    dims = [cursor.number("Q", f"tensor {name!r}") for _ in range(n_dims)]
    tensors.append((name, dims, cursor.number("I", f"tensor {name!r}"),
                    cursor.number("Q", f"tensor {name!r}")))
  return tensors, alignment


def _check_tensor_data(cursor: _Cursor, tensors: list[tuple[str, list[int], int, int]],
                       alignment: int) -> None:
  """Each tensor's type is known and its data lies within the file."""
  from gguf import constants  # pylint: disable=g-import-not-at-top
  sizes = {int(t): v for t, v in constants.GGML_QUANT_SIZES.items()}
  start = -(-cursor.pos // alignment) * alignment
  for name, dims, ttype, offset in tensors:
    if ttype not in sizes:
      raise cursor.fail(f"tensor {name!r} has type {ttype}, which gguf does not know")
    block, type_bytes = sizes[ttype]
    if dims and dims[0] % block:
      raise cursor.fail(f"tensor {name!r} has rows of {dims[0]:,} values, not a multiple of "
                        f"its type's block of {block}")
    nbytes = math.prod(dims) * type_bytes // block
    if start + offset + nbytes > len(cursor.data):
      raise cursor.fail(f"tensor {name!r} ({nbytes:,} bytes at offset {start + offset:,}) "
                        f"runs past the end of the file ({len(cursor.data):,} bytes): "
                        "truncated or corrupt")


# ---------------------------------------------------------------- config and tensors


def field(path: str, key: str, default: Any = None) -> Any:
  """The metadata value `key` of the GGUF file `path`, or `default` if absent.

  Raises:
    UserError: a missing, corrupt or unreadable file, or an unreadable value.
  """
  return _field(_reader(path), key, default)


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    return default
  try:
    return field.contents()
  except (ValueError, IndexError, TypeError) as e:  # e.g. a string that is not UTF-8.
    raise UserError(f"{reader.data.filename}: GGUF metadata {key} is unreadable: {e}") from e


def _positive_int(path: str, key: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise UserError(f"{path}: GGUF metadata {key} is {value!r}; expected an integer >= 1")
  return value


def _positive_float(path: str, key: str, value: Any) -> float:
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not math.isfinite(value) or value <= 0):
    raise UserError(f"{path}: GGUF metadata {key} is {value!r}; expected a number > 0")
  return float(value)


def _token_id(path: str, key: str, value: Any) -> int | None:
  if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
    raise UserError(f"{path}: GGUF metadata {key} is {value!r}; expected a token id")
  return value


def read_config(path: str) -> transformers.PretrainedConfig:
  """A transformers LlamaConfig from the GGUF metadata.

  Raises:
    UserError: missing or corrupt file, an architecture other than llama, or
      metadata missing or of the wrong type (named).
  """
  reader = _reader(path)
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (llama is)")

  def size(key: str, default: Any = None) -> int:
    return _positive_int(path, f"llama.{key}", _field(reader, f"llama.{key}", default))

  names = {t.name for t in reader.tensors}
  vocab = _field(reader, "llama.vocab_size")
  if vocab is None:
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
      raise UserError(f"{path}: GGUF metadata has neither llama.vocab_size nor "
                      "tokenizer.ggml.tokens")
    vocab = len(tokens)
  hidden, heads = size("embedding_length"), size("attention.head_count")
  kv_heads = size("attention.head_count_kv", heads)
  if hidden % heads or heads % kv_heads:
    raise UserError(f"{path}: GGUF metadata llama.embedding_length {hidden} must be a multiple "
                    f"of llama.attention.head_count {heads}, and that of "
                    f"llama.attention.head_count_kv {kv_heads}")
  token = lambda key: _token_id(path, key, _field(reader, key))
  return transformers.LlamaConfig(
      vocab_size=_positive_int(path, "llama.vocab_size", vocab), hidden_size=hidden,
      intermediate_size=size("feed_forward_length"),
      num_hidden_layers=size("block_count"),
      num_attention_heads=heads, num_key_value_heads=kv_heads,
      rms_norm_eps=_positive_float(path, "llama.attention.layer_norm_rms_epsilon",
                                   _field(reader, "llama.attention.layer_norm_rms_epsilon")),
      rope_theta=_positive_float(path, "llama.rope.freq_base",
                                 _field(reader, "llama.rope.freq_base", 10000.0)),
      max_position_embeddings=size("context_length", 2048),
      tie_word_embeddings="output.weight" not in names,
      bos_token_id=token("tokenizer.ggml.bos_token_id"),
      eos_token_id=token("tokenizer.ggml.eos_token_id"),
      pad_token_id=token("tokenizer.ggml.padding_token_id"))


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's interleaving of the rotary halves of each head's rows."""
  half = weights.shape[0] // heads // 2
  return (weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2)
          .reshape(weights.shape))


def checkpoint(path: str) -> dict[str, Callable[[], np.ndarray]]:
  """transformers key -> a function returning that tensor, dequantized to float32."""
  import gguf  # pylint: disable=g-import-not-at-top
  reader = _reader(path)
  config = read_config(path)
  readers = {}
  for tensor in reader.tensors:
    key = next((re.sub(p, t, tensor.name) for p, t in NAMES if re.fullmatch(p, tensor.name)),
               None)
    if key is None:
      continue  # e.g. rope_freqs: derived from the config instead.
    heads = (config.num_attention_heads if key.endswith("q_proj.weight") else
             config.num_key_value_heads if key.endswith("k_proj.weight") else 0)

    def read(tensor=tensor, heads=heads) -> np.ndarray:
      try:
        w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        w = w.reshape(tuple(int(n) for n in reversed(tensor.shape)))
        return _unpermute(w, heads) if heads else w
      except (ValueError, NotImplementedError) as e:  # A shape or type the data does not fit.
        raise UserError(f"cannot read tensor {tensor.name!r} of GGUF file {path}: {e}") from e
    readers[key] = read
  return readers


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
  """The tokenizer (with its chat template) embedded in the GGUF file."""
  _reader(path)
  try:
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
  except Exception as e:  # transformers' GGUF conversion raises many types for bad metadata.
    raise UserError(f"cannot load the tokenizer embedded in {path}: "
                    f"{type(e).__name__}: {e}") from e
