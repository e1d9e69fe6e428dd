"""A checksum manifest for a finished folder (a checkpoint): size and CRC32 per file.

Orbax makes a save atomic (written aside, renamed when complete) but cannot
tell a checkpoint whose bytes changed afterwards (a flipped bit on disk, a
file truncated or deleted by hand or by a full disk): it may fail deep in
TensorStore, or, for flipped bytes in an uncompressed chunk, restore other
numbers without a word. The manifest, written once the folder is complete,
lets a reader name the first file that differs in one line before reading
any array.

Local folders only: Cloud Storage keeps its own CRC32C per object.
"""

from __future__ import annotations

import json
import os
import zlib

from jaxft.runtime import storage

MANIFEST = "jaxft_manifest.json"
_CHUNK = 1 << 22


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(folder: str) -> list[str]:
  """Paths under `folder`, relative to it, sorted; the manifest itself left out."""
  found = []
  for root, _, names in os.walk(folder):
    found += [os.path.relpath(os.path.join(root, n), folder) for n in names]
  return sorted(f for f in found if f != MANIFEST)


def seal(folder: str) -> None:
  """Writes `folder`'s manifest (atomically); a no-op for Cloud Storage."""
  if storage.is_remote(folder):
    return
  entries = {f: [os.path.getsize(os.path.join(folder, f)), _crc32(os.path.join(folder, f))]
             for f in _files(folder)}
  storage.write_text(os.path.join(folder, MANIFEST), json.dumps({"files": entries}))


def is_sealed(folder: str) -> bool:
  return not storage.is_remote(folder) and os.path.exists(os.path.join(folder, MANIFEST))


def damage(folder: str) -> str | None:
  """What differs from `folder`'s manifest ("FILE: why"), or None: intact or unsealed.

  An unreadable manifest is damage too: it was written whole (renamed over).
  """
  if not is_sealed(folder):
    return None
  try:
    with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
      entries = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{MANIFEST}: unreadable ({type(e).__name__})"
  for name, (size, crc) in sorted(entries.items()):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      return f"{name}: missing"
    actual = os.path.getsize(path)
    if actual != size:
      return f"{name}: {actual} bytes, {size} when saved (truncated or overwritten)"
    if _crc32(path) != crc:
      return f"{name}: bytes changed since the save (CRC32 differs)"
  return None
