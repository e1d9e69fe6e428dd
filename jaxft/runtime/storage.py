"""The files of a run, on a local disk or in Cloud Storage (`gs://BUCKET/PATH`).

A pod's workers each have their own disk and share a bucket, so the workdir
(metrics, config, labels, samples, exports) and the model and data paths may
be `gs://` URLs. Orbax and tensorstore write checkpoints there themselves;
everything else goes through `etils.epath` (gcsfs underneath), so no FUSE
mount is needed. Model checkpoints and data files on Cloud Storage are copied
to a local cache once (safetensors are read through a memory map, which needs
a local file). With the standard `STORAGE_EMULATOR_HOST` set, every client
talks to that emulator instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil

from etils import epath

from jaxft.errors import UserError

_REMOTE_SCHEMES = ("gs://",)
CACHE_ENV = "JAXFT_GCS_CACHE"  # Where remote models and data are copied (default ~/.cache/jaxft/gcs).


def is_remote(path: str) -> bool:
  """Whether `path` is a Cloud Storage URL rather than a local path."""
  return str(path).startswith(_REMOTE_SCHEMES)


def _use_emulator() -> None:
  """Points tensorstore (Orbax's writer) at the emulator gcsfs already follows."""
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if host:
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    # Against an emulator there are no credentials to find; gcsfs warns on every call.
    logging.getLogger("gcsfs").setLevel(logging.ERROR)


def resolve(path: str) -> str:
  """`path` made absolute (local) or normalised (a URL without a trailing slash)."""
  if is_remote(path):
    _use_emulator()
    return str(path).rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def join(base: str, *names: str) -> str:
  """`base`/`names`, for local paths and URLs alike."""
  if is_remote(base):
    return "/".join([base.rstrip("/"), *names])
  return os.path.join(base, *names)


def _path(path: str) -> epath.Path:
  if is_remote(path):
    _use_emulator()
  return epath.Path(path)


def _io_error(action: str, path: str, e: Exception) -> UserError:
  return UserError(f"cannot {action} {path}: {e}")


def exists(path: str) -> bool:
  """Whether a file or folder exists at `path`."""
  try:
    return _path(path).exists()
  except Exception as e:  # gcsfs raises many types for a bucket it cannot reach.
    raise _io_error("reach", path, e) from e


def read_text(path: str) -> str:
  try:
    return _path(path).read_text(encoding="utf-8")
  except FileNotFoundError:
    raise
  except Exception as e:
    raise _io_error("read", path, e) from e


def write_text(path: str, text: str) -> None:
  """Writes `path` whole, as UTF-8; a reader never sees half of it (`write_bytes`)."""
  write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
  """Writes `path` whole; a reader never sees half of it.

  A Cloud Storage object appears only when its upload completes; a local file
  is written beside and renamed over.
  """
  if is_remote(path):
    _path(path).write_bytes(data)
    return
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def append_text(path: str, text: str) -> None:
  """Appends `text` to `path` (created if missing).

  Cloud Storage objects cannot grow, so a remote file is rewritten whole:
  fine for metrics.jsonl, which gets a line per logged step.
  """
  if not is_remote(path):
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)
    return
  p = _path(path)
  old = p.read_text(encoding="utf-8") if p.exists() else ""
  p.write_text(old + text, encoding="utf-8")


def makedirs(path: str) -> None:
  """Creates the folder `path` (a no-op for Cloud Storage, which has no folders)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names directly under the folder `path` ([] if it does not exist)."""
  try:
    p = _path(path)
    names = sorted(c.name for c in p.iterdir()) if p.exists() else []
  except Exception as e:  # gcsfs raises many types for a bucket it cannot reach.
    raise _io_error("list", path, e) from e
  if is_remote(path):
    _forget_listings(path)
  return names


def _forget_listings(path: str) -> None:
  """Drops gcsfs's cached listings: reading a file another host wrote since a listing
  would otherwise fail as missing (check_shared's token)."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  backend.fsspec_backend.fs(path).invalidate_cache()


def remove(path: str) -> None:
  """Deletes the file `path` if it exists."""
  with contextlib.suppress(FileNotFoundError):
    _path(path).unlink()


def remove_tree(path: str) -> None:
  """Deletes the file or folder `path` and all it holds, if there; a link goes, not its target."""
  if is_remote(path):
    p = _path(path)
    if p.is_dir():
      p.rmtree()
    else:
      remove(path)
  elif os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  else:
    remove(path)


def _cache_root() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "jaxft",
                                                   "gcs")


def _download(src: epath.Path, dst: str) -> None:
  """Copies one object to `dst` unless a file of the same size is there already."""
  size = src.stat().length
  if os.path.exists(dst) and os.path.getsize(dst) == size:
    return
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  tmp = f"{dst}.part{os.getpid()}"
  with src.open("rb") as fin, open(tmp, "wb") as fout:
    shutil.copyfileobj(fin, fout, length=16 << 20)
  os.replace(tmp, dst)


def _files_under(folder: epath.Path) -> list[epath.Path]:
  """Every file below `folder` (epath's rglob refuses `**` on Cloud Storage)."""
  out = []
  for child in folder.iterdir():
    out.extend(_files_under(child) if child.is_dir() else [child])
  return out


def local_copy(path: str, skip: tuple[str, ...] = ()) -> str:
  """A local path for `path`: itself if local, else a cached copy of the file or folder.

  Each process copies into its own cache (JAXFT_GCS_CACHE, default
  ~/.cache/jaxft/gcs/BUCKET/PATH); a file already there with the object's
  size is not fetched again. Files of a folder whose names end with one of
  `skip` are left out (weights, where only the config is needed).

  Raises:
    UserError: nothing at the URL, or the bucket cannot be read.
  """
  if not is_remote(path):
    return path
  url = resolve(path)
  local = os.path.join(_cache_root(), url.split("://", 1)[1])
  try:
    src = _path(url)
    if src.is_dir():
      files = [f for f in _files_under(src) if not f.name.endswith(skip)]
      for f in files:
        _download(f, os.path.join(local, os.path.relpath(str(f), url)))
      if not files:
        raise UserError(f"{url} is empty")
    elif src.exists():
      _download(src, local)
    else:
      raise UserError(f"{url} does not exist")
  except UserError:
    raise
  except Exception as e:  # gcsfs raises many types for a bucket it cannot reach.
    raise _io_error("read", url, e) from e
  return local


def upload_tree(local: str, url: str) -> None:
  """Copies every file under the folder `local` to the same names under `url`."""
  for root, _, files in os.walk(local):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), local)
      with open(os.path.join(root, name), "rb") as f:
        _path(join(resolve(url), *rel.split(os.sep))).write_bytes(f.read())


def _process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def check_shared(workdir: str) -> None:
  """Fails fast unless every process of a multi-host run sees the same `workdir`.

  Process 0 writes a random token into the workdir; every other process must
  read it back. Without this, processes given different local folders would
  each wait for the others' checkpoint files, forever. A no-op for one process.

  Raises:
    UserError: some process cannot see process 0's file (named in the message).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return
  token = secrets.token_hex(8) if jax.process_index() == 0 else "0" * 16
  # Every process learns process 0's token, then looks for its file.
  token = bytes(multihost_utils.broadcast_one_to_all(
      np.frombuffer(token.encode(), np.uint8))).decode()
  path = join(workdir, f".jaxft-shared-{token}")
  if jax.process_index() == 0:
    makedirs(workdir)
    write_text(path, token)
  multihost_utils.sync_global_devices("jaxft: shared-workdir token written")
  if is_remote(workdir):
    _forget_listings(workdir)
  try:
    seen = read_text(path) == token
  except (FileNotFoundError, UserError):
    seen = False
  flags = np.asarray(multihost_utils.process_allgather(np.asarray([seen]))).reshape(-1)
  multihost_utils.sync_global_devices("jaxft: shared-workdir token read")
  if jax.process_index() == 0:
    remove(path)
  blind = [i for i, ok in enumerate(flags) if not ok]
  if blind:
    raise UserError(
        f"process(es) {', '.join(map(str, blind))} of {jax.process_count()} cannot see the "
        f"files process 0 writes in --workdir={workdir}: every process must be given the same "
        "folder on storage they all share (a gs://BUCKET/PATH URL, or an NFS / Filestore "
        "mount), not a path on each host's own disk")
