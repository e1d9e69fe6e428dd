"""The folder `jaxft export` writes: built whole aside, then put in place of an earlier export.

An export leaves `jaxft_export.json` (format, step, workdir, the files it
wrote) in OUT. Exporting again into OUT removes exactly the files the old
manifest lists, so no stale file (an adapter beside merged weights) survives,
while files a user added stay. A non-empty OUT without a manifest is refused
unless `overwrite`, which empties it first. Files get the normal mode
(0666 less the umask), whatever the writer used. OUT may be a gs:// URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

from jaxft.errors import UserError
from jaxft.runtime import storage

MANIFEST = "jaxft_export.json"


def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_target(out: str, workdir: str, overwrite: bool) -> None:
  """Raises UserError unless exporting into `out` can lose nothing it should not."""
  names = storage.listdir(out)
  if not names or MANIFEST in names:
    return
  if not overwrite:
    raise UserError(f"{out} is not empty and holds no earlier jaxft export ({MANIFEST}): "
                    "pass --overwrite to replace its contents, or choose another --out")
  if not storage.is_remote(out) and (
      _inside(workdir, out) or os.path.realpath(out) in ("/", os.path.expanduser("~"))):
    raise UserError(f"--overwrite would empty {out}, which holds the workdir {workdir} "
                    "or is a root or home folder; choose another --out")


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
  manifest = storage.join(out, MANIFEST)
  if storage.exists(manifest):
    return json.loads(storage.read_text(manifest))["files"] + [MANIFEST]
  return storage.listdir(out) if overwrite else []


def _remove(out: str, names: list[str]) -> None:
  for name in names:
    path = storage.join(out, *name.split("/"))
    if not storage.is_remote(out) and os.path.isdir(path):
      shutil.rmtree(path)
    else:
      storage.remove(path)


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
  _remove(out, [f for f in old if f != MANIFEST])
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
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
  local = tempfile.mkdtemp(prefix=".jaxft-export-", dir=parent)
  try:
    yield local
    if primary:
      _install(local, out, overwrite, info)
  finally:
    shutil.rmtree(local, ignore_errors=True)
