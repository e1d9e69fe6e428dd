"""Open a dataset split from a local file or a hub dataset name."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import mmap
import os
import re
from typing import Iterator, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jaxft.runtime import storage
from jaxft.errors import UserError

# File extension -> the `datasets` builder that reads it.
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _looks_like_path(spec: str) -> bool:
  return spec.startswith((".", "/", "~")) or os.path.splitext(spec)[1].lower() in _BUILDERS


# `datasets`' readers that log an error before raising it: we report the exception.
_READER_LOGGERS = ("datasets.packaged_modules.json.json", "datasets.packaged_modules.csv.csv")


@contextlib.contextmanager
def _no_error_logs(*names: str) -> Iterator[None]:
  """Silences loggers `names` below CRITICAL: their errors come back as the exception we
  report."""
  loggers = [logging.getLogger(name) for name in names]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
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
    with _no_error_logs(*_READER_LOGGERS):
      return datasets.load_dataset(*args, **kwargs)
  except Exception as e:  # datasets and the hub raise many types; all mean "cannot use this".
    if "corresponds to no data" in str(e):
      raise UserError(f"dataset {what} is empty") from e
    raise UserError(f"cannot load dataset {what}: {_detail(e)}") from e


def _is_blank(path: str) -> bool:
  """Whether the file holds nothing but whitespace (read until the first other byte)."""
  with open(path, "rb") as f:
    return not any(chunk.strip() for chunk in iter(lambda: f.read(1 << 16), b""))


def _utf8_problem(spec: str, data: bytes) -> str | None:
  """`FILE line N: not UTF-8 ...` for the first byte that is not UTF-8, or None."""
  try:
    data.decode("utf-8")
    return None
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return f"{spec} line {line}: not UTF-8 text ({e.reason} at column {column})"


def _json_problem(spec: str, path: str) -> str | None:
  """`FILE line N: <problem>` for the first line of a JSON / JSON Lines file that is not
  UTF-8, that json.loads rejects or (JSON Lines) that is not an object; None when it
  finds none.

  `datasets` names the row only in a log line, and not for every error.
  """
  with open(path, "rb") as f:
    data = f.read()
  problem = _utf8_problem(spec, data)
  if problem:
    return problem
  text = data.decode("utf-8")
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
    if not line.strip():
      continue
    try:
      value = json.loads(line)
    except json.JSONDecodeError as e:
      return f"{spec} line {n}: {e.msg} (column {e.colno})"
    if not isinstance(value, dict):
      return f"{spec} line {n}: expected a JSON object, got {_json_kind(value)}"
  return None


def _json_kind(value: object) -> str:
  """What a JSON value is, in JSON's words."""
  return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
          type(None): "null"}.get(type(value), "a number")


# pyarrow's JSON reader (26.0) segfaults on a block of JSON Lines that starts with a
# top-level null, which `datasets` also makes of a null record in a JSON array: such
# records are found before it runs. (A line `null` in JSON Lines; an array item null.)
_NULL_LINE = re.compile(rb"^[ \t]*null", re.MULTILINE)
_NULL_ITEM = re.compile(rb"[\[,]\s*null\s*[,\]]")


def _null_record(spec: str, path: str) -> str | None:
  """`FILE line N: ...` (JSON Lines) or `FILE record N: ...` (a JSON array) for the first
  record that is null, or None."""
  with open(path, "rb") as f:
    head = f.read(1 << 16)
  first = head.lstrip()
  if first[:1] == b"[":
    return _null_item(spec, path)
  try:
    json.loads(first.split(b"\n", 1)[0])
  except ValueError:
    return None  # Not JSON Lines: a pretty-printed document has lines of its own.
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
    match = _NULL_LINE.search(data)
    if match is None:
      return None
    line = data[:match.start()].count(b"\n") + 1
  return f"{spec} line {line}: expected a JSON object, got null"


def _null_item(spec: str, path: str) -> str | None:
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
    if not _NULL_ITEM.search(data):
      return None
    try:
      records = json.loads(data[:])
    except ValueError:
      return None  # Not JSON: `datasets` says so, without reaching its JSON Lines reader.
  row = next((i for i, r in enumerate(records) if r is None), None) if isinstance(
      records, list) else None
  return None if row is None else f"{spec} record {row + 1}: expected a JSON object, got null"


# ---------------------------------------------------------------- rows with a value missing


def _row_lines(path: str, ext: str) -> Iterator[int]:
  """The line each row of a local JSON Lines or CSV file starts on, in row order."""
  if _BUILDERS[ext] == "json":
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
      for n, line in enumerate(f, 1):
        if line.strip():  # `datasets` skips blank lines.
          yield n
    return
  with open(path, encoding="utf-8", errors="replace", newline="") as f:
    reader = csv.reader(f, delimiter="\t" if ext == ".tsv" else ",")
    start = 1
    for i, record in enumerate(reader):
      if record and i > 0:  # Row 0 is the header; pandas skips blank lines.
        yield start
      start = reader.line_num + 1


def _where(spec: str, path: str | None, row: int) -> str:
  """`FILE line N` for row `row` (0-based) of a JSON Lines or CSV file, else `FILE row N`."""
  ext = os.path.splitext(path or "")[1].lower()
  if path and _BUILDERS.get(ext) in ("json", "csv") and not _is_json_array(path):
    for i, line in enumerate(_row_lines(path, ext)):
      if i == row:
        return f"{spec} line {line}"
  return f"{spec} row {row}"


def _is_json_array(path: str) -> bool:
  """Whether a JSON file is one array of records (whose rows have no lines of their own)."""
  with open(path, "rb") as f:
    return f.read(4096).lstrip()[:1] == b"["


def _first_null(column: pa.ChunkedArray) -> int | None:
  if not column.null_count:
    return None
  return int(np.argmax(pc.is_null(column).to_numpy(zero_copy_only=False)))


# The first character of a value's JSON text -> what it is, for columns of mixed types
# (`datasets` stores those as JSON text).
_JSON_KINDS = {'"': "a string", "[": "an array", "{": "an object", "t": "a boolean",
               "f": "a boolean", "n": "null"}


def _first_other_kind(column: pa.ChunkedArray) -> tuple[int, str, str] | None:
  """(row, its kind, row 0's kind) of the first value of a JSON-typed column whose JSON
  kind differs from row 0's; None if all agree or the column holds no JSON text."""
  storage = [c.storage if isinstance(c, pa.ExtensionArray) else c for c in column.chunks]
  if not storage or not all(pa.types.is_string(c.type) or pa.types.is_large_string(c.type)
                            for c in storage):
    return None
  heads = [h for c in storage for h in pc.utf8_slice_codeunits(c, 0, 1).to_pylist()]
  kinds = [_JSON_KINDS.get(h or "n", "a number") for h in heads]
  row = next((i for i, k in enumerate(kinds) if k != kinds[0]), None)
  return None if row is None else (row, kinds[row], kinds[0])


def _is_json_column(ds: datasets.Dataset, key: str) -> bool:
  return type(ds.features[key]).__name__ == "Json"


def check_values(ds: datasets.Dataset, keys: Sequence[str], spec: str,
                 path: str | None = None) -> None:
  """UserError unless every row of `ds` has a value of one kind in each of `keys`.

  A row without one (a JSON Lines record missing the key, or null; an empty CSV
  cell) or, in a column `datasets` could give no single type, a value of
  another JSON kind than the first row's, is named by its line in `path` (the
  local JSON Lines or CSV file `ds` was read from), else by its row.
  """
  for key in keys:
    if key not in ds.column_names:
      raise UserError(f"{spec} has no column {key!r}; columns are {ds.column_names}")
    column = ds.with_format("arrow")[key]  # Arrow: no Python object per value.
    row = _first_null(column)
    if row is not None:
      raise UserError(f"{_where(spec, path, row)}: no value for {key!r} (every row needs one)")
    other = _first_other_kind(column) if _is_json_column(ds, key) else None
    if other:
      row, kind, first = other
      what = "no value" if kind == "null" else f"{key!r} is {kind}"
      raise UserError(f"{_where(spec, path, row)}: {what}, but the first row's {key!r} is "
                      f"{first}")


def load_split(spec: str, split: str, *, required: Sequence[str] = ()) -> datasets.Dataset:
  """Returns one split: `spec` is a csv/json/jsonl/parquet file (local or gs://) or a hub
  dataset name.

  `required`: columns every row must have a value in, of one kind (`check_values`).

  Raises:
    UserError: the file is missing, empty, of an unknown type or (JSON) not
      well formed (naming the line), the hub dataset cannot be read, the
      split is empty, or a row lacks a `required` value (naming its line).
  """
  datasets.disable_progress_bars()
  path = os.path.expanduser(storage.local_copy(spec))
  local = os.path.isfile(path)
  if local:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
      raise UserError(f"cannot read {spec!r}: expected one of {sorted(_BUILDERS)}")
    if _is_blank(path):  # `datasets` fails on it with an empty message.
      raise UserError(f"data file {spec} is empty")
    kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
    problem = _null_record(spec, path) if _BUILDERS[ext] == "json" else None
    if problem:
      raise UserError(problem)
    try:
      ds = _load(spec, _BUILDERS[ext], data_files=path, split="train", **kwargs)
    except UserError as e:
      problem = _file_problem(spec, path, _BUILDERS[ext], e)
      if problem:
        raise UserError(problem) from e
      raise
  elif _looks_like_path(spec):
    raise UserError(f"data file not found: {spec}")
  else:
    ds = _load(f"{spec} (split {split!r})", spec, split=split)
  if len(ds) == 0:
    raise UserError(f"dataset {spec!r} is empty")
  if local:
    _check_text(ds, spec, path)
  check_values(ds, required, spec, path if local else None)
  return ds


def _check_text(ds: datasets.Dataset, spec: str, path: str) -> None:
  """UserError naming the line where `datasets` kept bytes that are not UTF-8 as text.

  Its JSON reader stores them as they are, and every later read of the row
  fails deep in pyarrow.
  """
  try:
    ds.data.table.validate(full=True)
  except pa.ArrowInvalid as e:
    with open(path, "rb") as f:
      problem = _utf8_problem(spec, f.read())
    raise UserError(problem or f"cannot load dataset {spec}: {e}") from e


def _file_problem(spec: str, path: str, builder: str, error: UserError) -> str | None:
  """What is wrong with a local file `datasets` failed on, by line, where we can tell."""
  if builder == "json":
    return _json_problem(spec, path)
  if builder == "csv":
    with open(path, "rb") as f:
      return _utf8_problem(spec, f.read()) or _csv_problem(spec, str(error))
  return None


# pandas' C parser's errors (its "row" counts lines from 0), as `FILE line N: ...`.
_CSV_ERRORS = (
    (re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)"),
     lambda m: (int(m[2]), f"expected {m[1]} fields, found {m[3]}")),
    (re.compile(r"EOF inside string starting at row (\d+)"),
     lambda m: (int(m[1]) + 1, "a quoted field starts here and never ends")),
)


def _csv_problem(spec: str, message: str) -> str | None:
  """`FILE line N: ...` for a pandas CSV parser error that names its line, or None."""
  for pattern, describe in _CSV_ERRORS:
    match = pattern.search(message)
    if match:
      line, what = describe(match)
      return f"{spec} line {line}: {what}"
  return None
