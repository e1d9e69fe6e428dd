"""Open a dataset split from a local file or a hub dataset name."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Iterator

import datasets

from jaxft.runtime import storage
from jaxft.errors import UserError

# File extension -> the `datasets` builder that reads it.
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _looks_like_path(spec: str) -> bool:
  return spec.startswith((".", "/", "~")) or os.path.splitext(spec)[1].lower() in _BUILDERS


@contextlib.contextmanager
def _no_error_logs(name: str) -> Iterator[None]:
  """Silences logger `name` below CRITICAL: its errors come back as the exception we report."""
  logger = logging.getLogger(name)
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _detail(error: BaseException) -> str:
  """The first line of what `error` says, or of its cause where it says nothing useful.

  `datasets` wraps the reader's error (the one that says what is wrong) in a
  generic "An error occurred while generating the dataset", or in an empty one.
  """
  messages, seen, e = [], set(), error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if str(e).strip():
      messages.append(str(e).strip())
    e = e.__cause__ or e.__context__
  if not messages:
    return type(error).__name__
  top = messages[0]
  if "error occurred while generating" in top:
    top = messages[-1]
  return top.splitlines()[0]


def _load(what: str, *args, **kwargs) -> datasets.Dataset:
  try:
    with _no_error_logs("datasets.packaged_modules.json.json"):
      return datasets.load_dataset(*args, **kwargs)
  except Exception as e:  # datasets and the hub raise many types; all mean "cannot use this".
    if "corresponds to no data" in str(e):
      raise UserError(f"dataset {what} is empty") from e
    raise UserError(f"cannot load dataset {what}: {_detail(e)}") from e


def _is_blank(path: str) -> bool:
  """Whether the file holds nothing but whitespace (read until the first other byte)."""
  with open(path, "rb") as f:
    return not any(chunk.strip() for chunk in iter(lambda: f.read(1 << 16), b""))


def _json_problem(spec: str, path: str) -> str | None:
  """`FILE line N: <json error>` for the first line of a JSON / JSON Lines file that
  json.loads rejects, or None when it finds none.

  `datasets` names the row only in a log line, and not for every error.
  """
  with open(path, encoding="utf-8", errors="replace") as f:
    text = f.read()
  try:
    json.loads(text)
    return None  # One JSON document: the problem is not its syntax.
  except json.JSONDecodeError as whole:
    first = text.lstrip().split("\n", 1)[0]
    try:
      json.loads(first)
    except json.JSONDecodeError:  # Not JSON Lines (or line 1 is bad): the document's error.
      return f"{spec} line {whole.lineno}: {whole.msg} (column {whole.colno})"
  for n, line in enumerate(text.split("\n"), 1):  # Not splitlines: JSON strings may hold U+2028.
    try:
      if line.strip():
        json.loads(line)
    except json.JSONDecodeError as e:
      return f"{spec} line {n}: {e.msg} (column {e.colno})"
  return None


def load_split(spec: str, split: str) -> datasets.Dataset:
  """Returns one split: `spec` is a csv/json/jsonl/parquet file (local or gs://) or a hub
  dataset name.

  Raises:
    UserError: the file is missing, empty, of an unknown type or (JSON) not
      well formed (naming the line), the hub dataset cannot be read, or the
      split is empty.
  """
  datasets.disable_progress_bars()
  path = os.path.expanduser(storage.local_copy(spec))
  if os.path.isfile(path):
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
      raise UserError(f"cannot read {spec!r}: expected one of {sorted(_BUILDERS)}")
    if _is_blank(path):  # `datasets` fails on it with an empty message.
      raise UserError(f"data file {spec} is empty")
    kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
    try:
      ds = _load(spec, _BUILDERS[ext], data_files=path, split="train", **kwargs)
    except UserError as e:
      problem = _json_problem(spec, path) if _BUILDERS[ext] == "json" else None
      if problem:
        raise UserError(problem) from e
      raise
  elif _looks_like_path(spec):
    raise UserError(f"data file not found: {spec}")
  else:
    ds = _load(f"{spec} (split {split!r})", spec, split=split)
  if len(ds) == 0:
    raise UserError(f"dataset {spec!r} is empty")
  return ds
