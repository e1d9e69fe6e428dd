"""The folder `jaxft export` writes: built whole aside, then put in place of an earlier export.

An export leaves `jaxft_export.json` (format, step, workdir, the files it
wrote) in OUT. Exporting again into OUT removes exactly the files the old
manifest lists, so no stale file (an adapter beside merged weights) survives,
while files a user added stay. A non-empty OUT without a manifest is refused
unless `overwrite`, which empties it first (`check_target` says which folders
never are emptied: the workdir's, a root, home or bucket). A manifest entry
never reaches outside OUT. Files get the normal mode
(0666 less the umask), whatever the writer used. OUT may be a gs:// URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

import safetensors

from jaxft.errors import UserError
from jaxft.runtime import storage

MANIFEST = "jaxft_export.json"


def _contains(folder: str, path: str) -> bool:
  """Whether `path` is `folder` or lies below it (local paths resolved, URLs as written)."""
  if storage.is_remote(folder) != storage.is_remote(path):
    return False
  if storage.is_remote(folder):
    folder, path, sep = storage.resolve(folder), storage.resolve(path), "/"
  else:
    folder, path, sep = os.path.realpath(folder), os.path.realpath(path), os.sep
  return path == folder or path.startswith(folder.rstrip(sep) + sep)


def _is_root(out: str) -> bool:
  """A filesystem root, the home folder, or a whole bucket."""
  if storage.is_remote(out):
    return storage.resolve(out).count("/") <= 2  # gs://BUCKET
  return os.path.realpath(out) in ("/", os.path.realpath(os.path.expanduser("~")))


def _safe_name(name: object) -> bool:
  """A manifest entry names a file below OUT: nothing a hand-edited manifest says escapes it."""
  return (isinstance(name, str) and bool(name) and not name.startswith(("/", "\\"))
          and ".." not in name.split("/") and name != MANIFEST)


def _manifest_files(out: str) -> list[str] | None:
  """The files OUT's earlier export wrote; None without a readable manifest."""
  try:
    files = json.loads(storage.read_text(storage.join(out, MANIFEST)))["files"]
  except (FileNotFoundError, ValueError, KeyError, TypeError):
    return None
  return [f for f in files if _safe_name(f)] if isinstance(files, list) else None


def check_target(out: str, workdir: str, overwrite: bool) -> None:
  """Raises UserError unless exporting into `out` can lose nothing it should not.

  An empty or missing `out`, or one holding an earlier export, is fine. Any
  other folder needs `overwrite`, which empties it, and is refused even then
  if it holds the workdir or lies inside it (checkpoints, metrics) or is a
  root, home folder or whole bucket.
  """
  names = storage.listdir(out)
  if not names or (MANIFEST in names and _manifest_files(out) is not None):
    return
  if not overwrite:
    raise UserError(f"{out} is not empty and holds no earlier jaxft export ({MANIFEST}): "
                    "pass --overwrite to replace its contents, or choose another --out")
  if _contains(out, workdir):
    raise UserError(f"--overwrite would empty {out}, which holds the workdir {workdir}; "
                    "choose another --out")
  if _contains(workdir, out):
    raise UserError(f"--overwrite would empty {out}, inside the workdir {workdir} (its "
                    "checkpoints and records); choose another --out")
  if _is_root(out):
    raise UserError(f"--overwrite would empty {out}, a root, home folder or bucket; "
                    "choose another --out")


def _normal_modes(folder: str) -> None:
  umask = os.umask(0)
  os.umask(umask)
  for root, _, files in os.walk(folder):
    for name in files:
      os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _relative_files(folder: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
                for root, _, files in os.walk(folder) for name in files)


def _old_files(out: str, overwrite: bool) -> list[str]:
  """What must go before the new export goes in: the old manifest's files, or everything."""
  listed = _manifest_files(out)
  if listed is not None:
    return listed + [MANIFEST]
  return storage.listdir(out) if overwrite else []


def _remove(out: str, names: list[str]) -> None:
  for name in names:
    storage.remove_tree(storage.join(out, *name.split("/")))


def _install(local: str, out: str, overwrite: bool, info: dict) -> None:
  """Moves the files of `local` into `out` in place of the earlier export's."""
  _normal_modes(local)
  files = _relative_files(local)
  old = _old_files(out, overwrite)
  storage.makedirs(out)
  # Until the last line, the manifest also lists the old files: a crash half-way leaves a
  # folder that the next export still recognises and cleans.
  pending = sorted(set(files) | set(f for f in old if f != MANIFEST))
  storage.write_text(storage.join(out, MANIFEST), json.dumps({**info, "files": pending}))
  # A file the new export also writes is replaced in one step, never missing in between.
  _remove(out, [f for f in old if f != MANIFEST and f not in files])
  if storage.is_remote(out):
    storage.upload_tree(local, out)
  else:
    for name in files:
      target = os.path.join(out, *name.split("/"))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(os.path.join(local, *name.split("/")), target)
  storage.write_text(storage.join(out, MANIFEST), json.dumps({**info, "files": files}, indent=2))


@contextlib.contextmanager
def staged(out: str, workdir: str, *, overwrite: bool, info: dict,
           primary: bool = True) -> Iterator[str]:
  """A local folder to write the export into; it replaces OUT's earlier export on success.

  Local OUTs are staged beside OUT (same filesystem: files are renamed in).
  `primary`: this process installs the files (process 0 of a multi-host run).
  """
  check_target(out, workdir, overwrite)
  parent = None
  if not storage.is_remote(out):
    # Beside where OUT really is (through a link): files are renamed in, within one filesystem.
    parent = os.path.dirname(os.path.realpath(out))
    os.makedirs(parent, exist_ok=True)
  local = tempfile.mkdtemp(prefix=".jaxft-export-", dir=parent)
  try:
    try:
      yield local
    except (OSError, safetensors.SafetensorError) as e:  # A full disk, a file too large...
      raise UserError(f"writing the export for {out} failed: {e}; {out} is unchanged (an "
                      "export is built aside and put in place only when whole)") from e
    if primary:
      _install(local, out, overwrite, info)
  finally:
    shutil.rmtree(local, ignore_errors=True)
