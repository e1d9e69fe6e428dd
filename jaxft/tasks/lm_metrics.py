"""Task metrics on generated text: pass@1 of code (tests run in a subprocess) and ROUGE-L.

Running generated code is what pass@1 means; each program runs in its own
Python subprocess, in an empty temporary folder, with a wall-clock timeout,
and only when a recipe asks for `config.eval.metric = "pass@1"`.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import tempfile
from typing import Sequence

# Where a function-level completion ends (the HumanEval convention).
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def program(problem: dict, completion: str) -> str:
  """The HumanEval program: prompt, completion, the tests, then check(entry point)."""
  return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
          f"check({problem['entry_point']})\n")


def passes(source: str, timeout: float) -> bool:
  """Whether `source` exits 0 within `timeout` seconds in a fresh interpreter."""
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "program.py")
    with open(path, "w", encoding="utf-8") as f:
      f.write(source)
    try:
      done = subprocess.run([sys.executable, "-I", path], cwd=folder, timeout=timeout,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
      return False
  return done.returncode == 0


def pass_at_1(problems: Sequence[dict], completions: Sequence[str], *,
              timeout: float = 10.0, workers: int = 4) -> float:
  """Fraction of problems whose (one, greedy) completion passes its tests."""
  sources = [program(p, c) for p, c in zip(problems, completions, strict=True)]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = list(pool.map(lambda s: passes(s, timeout), sources))
  return sum(results) / max(len(results), 1)


def rouge_l(references: Sequence[str], predictions: Sequence[str]) -> float:
  """Mean ROUGE-L F1 (with stemming), as the `rouge-score` package computes it."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  scores = [scorer.score(r, p)["rougeL"].fmeasure
            for r, p in zip(references, predictions, strict=True)]
  return sum(scores) / max(len(scores), 1)
