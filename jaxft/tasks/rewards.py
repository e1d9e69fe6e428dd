"""Reward functions for RL fine-tuning (GRPO): a score per sampled completion.

A reward function is `fn(prompts, completions, records) -> list[float]`, one
number per completion. The three lists have the same length: `prompts[i]` is
the prompt text `completions[i]` continues and `records[i]` the data row it
came from (e.g. {"question", "answer"} or a HumanEval problem), each repeated
for every completion of a group, so a function can check a completion
against anything its row holds. The built-in ones are named in
`BUILT_IN`; `resolve("package.module:function")` imports a user's own, which
then runs inside the trainer's process with its privileges (unlike the
programs `unit_tests` runs: each in its own subprocess, in an empty folder,
with a timeout; that limits accidents, it is no security sandbox). `score` calls a
function and checks what it returns.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import math
import numbers
import os
import re
import sys
from typing import Any, Callable, Sequence

import numpy as np

from jaxft.errors import UserError
from jaxft.tasks import lm_metrics

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[dict]], Sequence[float]]

# A number as written in an answer: an optional minus sign (not one joining two
# words or numbers, as in "10-3"), an optional "$", digits in thousands groups
# ("1,234") or plain, an optional decimal part. "7." is 7: a period without
# digits after it ends the sentence.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def last_number(text: str) -> float | None:
  """The value of the last number in `text` (see `numeric_match`), or None if it has none."""
  found = _NUMBER.findall(text)
  if not found:
    return None
  return float(found[-1].replace("$", "").replace(",", ""))


def _answer(record: dict) -> float:
  if "answer" not in record:
    raise UserError(f"numeric_match needs an 'answer' in every data row; this one has "
                    f"{sorted(record)}")
  try:
    return float(str(record["answer"]).replace(",", ""))
  except ValueError:
    raise UserError(f"numeric_match: the answer {record['answer']!r} is not a number") from None


def numeric_match(prompts: Sequence[str], completions: Sequence[str],
                  records: Sequence[dict]) -> list[float]:
  """1.0 where the last number of the completion equals the row's "answer", else 0.0.

  The rule: the last number written in the completion, digits with an
  optional leading "-" and "$", thousands commas ("1,234") and a decimal part
  ("3.50"); a sentence's final period is not a decimal point. It must equal
  float(record["answer"]) (within 1e-9); a completion without a number scores
  0. Numbers written as words ("seven") do not count.

  Raises:
    UserError: a row without an "answer", or one that is not a number.
  """
  del prompts
  out = []
  for completion, record in zip(completions, records, strict=True):
    value = last_number(completion)
    answer = _answer(record)
    out.append(float(value is not None and math.isclose(value, answer, rel_tol=1e-9,
                                                         abs_tol=1e-9)))
  return out


_PROBLEM_KEYS = ("prompt", "test", "entry_point")


def unit_tests(prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict], *,
               timeout: float = 10.0, workers: int = 4) -> list[float]:
  """1.0 where prompt + completion passes the row's HumanEval tests, else 0.0.

  Each row is a HumanEval problem ("prompt", "test", "entry_point"); the
  program is `lm_metrics.program(record, completion)`, run as pass@1 runs it:
  its own subprocess in an empty folder, `timeout` seconds at most, `workers`
  at a time.

  Raises:
    UserError: a row that is not a HumanEval problem.
  """
  del prompts
  for record in records:
    missing = [k for k in _PROBLEM_KEYS if k not in record]
    if missing:
      raise UserError(f"unit_tests needs HumanEval rows with {list(_PROBLEM_KEYS)}; one lacks "
                      f"{missing}")
  sources = [lm_metrics.program(r, c) for r, c in zip(records, completions, strict=True)]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return [float(ok) for ok in pool.map(lambda s: lm_metrics.passes(s, timeout), sources)]


BUILT_IN: dict[str, RewardFn] = {"numeric_match": numeric_match, "unit_tests": unit_tests}


def resolve(spec: str) -> RewardFn:
  """The reward function `spec` names: a `BUILT_IN` name or "package.module:function".

  A "module:function" spec imports the module (from the current folder or
  sys.path, as `python -m` would) and its
  attribute (dots reach into it, "module:Class.method"); that code runs in
  the trainer's own process, with its access to files and network.

  Raises:
    UserError: an unknown name, a module that fails to import, or an
      attribute that is missing or not callable.
  """
  if spec in BUILT_IN:
    return BUILT_IN[spec]
  module_name, sep, attr = spec.partition(":")
  if not sep or not module_name or not attr:
    raise UserError(f"unknown reward function {spec!r}: use one of {sorted(BUILT_IN)} or "
                    f"'package.module:function' (your own code, run in the trainer's process)")
  try:
    module = _import_here(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      raise UserError(f"reward function {spec!r}: no module named {e.name!r} (is its folder on "
                      f"PYTHONPATH?)") from e
    raise UserError(f"reward function {spec!r}: importing {module_name!r} failed: {e}") from e
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"reward function {spec!r}: importing {module_name!r} failed: "
                    f"{type(e).__name__}: {e}") from e
  fn: Any = module
  for part in attr.split("."):
    if not hasattr(fn, part):
      raise UserError(f"reward function {spec!r}: {module_name!r} has no attribute {attr!r}")
    fn = getattr(fn, part)
  if not callable(fn):
    raise UserError(f"reward function {spec!r}: {attr!r} is a {type(fn).__name__}, not a "
                    "function")
  return fn


def _import_here(name: str) -> Any:
  """`importlib.import_module(name)`, the current folder searched first (the `jaxft`
  script, unlike `python -m`, does not put it on sys.path)."""
  here = os.getcwd()
  added = here not in sys.path
  if added:
    sys.path.insert(0, here)
  try:
    return importlib.import_module(name)
  finally:
    if added:
      sys.path.remove(here)


def _preview(text: str, limit: int = 200) -> str:
  return repr(text if len(text) <= limit else text[:limit] + "...")


def score(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
          records: Sequence[dict], name: str) -> np.ndarray:
  """fn's rewards as float32 [len(completions)], checked: one finite number each.

  Raises:
    UserError: fn raised (wrapped, with the first prompt), or returned the
      wrong number of values, or a value that is not a finite real number.
  """
  try:
    values = fn(list(prompts), list(completions), list(records))
  except Exception as e:  # pylint: disable=broad-except
    first = _preview(prompts[0]) if len(prompts) else "none"
    raise UserError(f"reward function {name} raised {type(e).__name__}: {e} "
                    f"(first prompt: {first})") from e
  if isinstance(values, np.ndarray):
    values = values.tolist()
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
    raise UserError(f"reward function {name} returned a {type(values).__name__}, not a list "
                    f"of {len(completions)} numbers")
  if len(values) != len(completions):
    raise UserError(f"reward function {name} returned {len(values)} values for "
                    f"{len(completions)} completions")
  for i, v in enumerate(values):
    if not isinstance(v, numbers.Real):
      raise UserError(f"reward function {name} returned {v!r} ({type(v).__name__}) at index "
                      f"{i}: rewards must be numbers")
    if not math.isfinite(v):
      raise UserError(f"reward function {name} returned {v!r} at index {i}: rewards must be "
                      "finite")
  wide = np.asarray(values, np.float64)
  for i in np.flatnonzero(np.abs(wide) > np.finfo(np.float32).max):
    raise UserError(f"reward function {name} returned {values[i]!r} at index {i}: beyond "
                    "float32's range")
  return wide.astype(np.float32)
