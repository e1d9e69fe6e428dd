"""Open a dataset split from a local file or a hub dataset name."""

from __future__ import annotations

import os

import datasets

from jaxft.runtime import storage
from jaxft.errors import UserError

# File extension -> the `datasets` builder that reads it.
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _looks_like_path(spec: str) -> bool:
  return spec.startswith((".", "/", "~")) or os.path.splitext(spec)[1].lower() in _BUILDERS


def _load(what: str, *args, **kwargs) -> datasets.Dataset:
  try:
    return datasets.load_dataset(*args, **kwargs)
  except Exception as e:  # datasets and the hub raise many types; all mean "cannot use this".
    if "corresponds to no data" in str(e):
      raise UserError(f"dataset {what} is empty") from e
    raise UserError(f"cannot load dataset {what}: {e}") from e


def load_split(spec: str, split: str) -> datasets.Dataset:
  """Returns one split: `spec` is a csv/json/jsonl/parquet file (local or gs://) or a hub
  dataset name.

  Raises:
    UserError: the file is missing or of an unknown type, the hub dataset
      cannot be read, or the split is empty.
  """
  datasets.disable_progress_bars()
  path = os.path.expanduser(storage.local_copy(spec))
  if os.path.isfile(path):
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
      raise UserError(f"cannot read {spec!r}: expected one of {sorted(_BUILDERS)}")
    kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
    ds = _load(spec, _BUILDERS[ext], data_files=path, split="train", **kwargs)
  elif _looks_like_path(spec):
    raise UserError(f"data file not found: {spec}")
  else:
    ds = _load(f"{spec} (split {split!r})", spec, split=split)
  if len(ds) == 0:
    raise UserError(f"dataset {spec!r} is empty")
  return ds
