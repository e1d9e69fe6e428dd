"""The identity of a base checkpoint, cheap enough to check on every resume.

A LoRA or partly frozen run saves only what it trains; its frozen weights are
re-read from the base checkpoint when it resumes. The checkpoint records the
base's fingerprint, the size of every weight file and one hash over their
indexes (the safetensors headers and index json: every tensor's name, dtype,
shape and offsets; a GGUF's or other file's first MiB, where its tensor table
is) and config.json, so resuming from a different or re-written base fails
instead of training on the wrong frozen weights. Reading the headers costs
milliseconds even for a 70B checkpoint; hashing every byte would not.
"""

from __future__ import annotations

import hashlib
import os
import struct

_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".msgpack", ".bin", ".index.json")
_HEAD_BYTES = 1 << 20  # Of a file that is not safetensors: where its tensor table is.


def _files(model_path: str) -> list[str]:
  if os.path.isfile(model_path):
    return [model_path]
  names = sorted(n for n in os.listdir(model_path)
                 if n.endswith(_WEIGHT_SUFFIXES) or n == "config.json")
  return [os.path.join(model_path, n) for n in names]


def _index_bytes(path: str) -> bytes:
  """The part of a weight file that says which tensors it holds and where."""
  with open(path, "rb") as f:
    if path.endswith(".safetensors"):
      (length,) = struct.unpack("<Q", f.read(8))
      return f.read(min(length, 1 << 27))  # A corrupt length must not read the file.
    if path.endswith(".json"):
      return f.read()
    return f.read(_HEAD_BYTES)


def of(model_path: str) -> dict:
  """{"sizes": {file name: bytes}, "index_sha256": hex} of a local checkpoint folder or file."""
  digest = hashlib.sha256()
  sizes = {}
  for path in _files(model_path):
    name = os.path.basename(path)
    sizes[name] = os.path.getsize(path)
    digest.update(name.encode() + b"\0" + _index_bytes(path))
  return {"sizes": sizes, "index_sha256": digest.hexdigest()}


def differences(saved: dict, now: dict) -> list[str]:
  """What differs between two fingerprints, in words (empty if they match)."""
  out = []
  a, b = saved.get("sizes", {}), now.get("sizes", {})
  for name in sorted(set(a) | set(b)):
    if a.get(name) != b.get(name):
      out.append(f"{name}: {a.get(name, 'absent')} -> {b.get(name, 'absent')} bytes")
  if not out and saved.get("index_sha256") != now.get("index_sha256"):
    out.append("same file sizes, different tensor index or config.json")
  return out
