"""Derives the repo's HumanEval files from HumanEval.jsonl.gz (deterministic; rerun to check).

  python data/humaneval/make_splits.py

- data/humaneval/{train,test}.jsonl: prompt (signature + docstring),
  completion (the canonical solution), test, entry_point, task_id. Problems
  whose number is a multiple of 4 are the test split (41), the rest train (123).
- data/code-summaries/{train,test}.jsonl: a code-summarization set from the
  same problems and split: prompt = the function without its docstring and an
  instruction, completion = the docstring's first sentence.
"""

import ast
import gzip
import json
import pathlib
import re

HERE = pathlib.Path(__file__).resolve().parent
SUMMARIES = HERE.parent / "code-summaries"
INSTRUCTION = "Summarize in one sentence what this Python function does.\n\n"


def _without_docstring(source: str, name: str) -> tuple[str, str]:
  """(the source with `name`'s docstring removed, that docstring)."""
  tree = ast.parse(source)
  fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
  doc = ast.get_docstring(fn)
  first = fn.body[0]
  lines = source.splitlines()
  del lines[first.lineno - 1:first.end_lineno]
  return "\n".join(lines).strip() + "\n", doc


def _first_sentence(doc: str) -> str:
  text = " ".join(doc.split(">>>")[0].split())
  text = re.split(r"(?i)\b(?:for example|example)s?\b", text)[0].strip()
  match = re.match(r"(.+?[.!?])(\s|$)", text)
  return (match.group(1) if match else text).strip()


def main() -> None:
  rows = [json.loads(l) for l in gzip.open(HERE / "HumanEval.jsonl.gz", "rt", encoding="utf-8")]
  SUMMARIES.mkdir(exist_ok=True)
  for split in ("train", "test"):
    keep = [r for r in rows if (int(r["task_id"].split("/")[1]) % 4 == 0) == (split == "test")]
    with open(HERE / f"{split}.jsonl", "w", encoding="utf-8") as f:
      for r in keep:
        f.write(json.dumps({"task_id": r["task_id"], "prompt": r["prompt"],
                            "completion": r["canonical_solution"], "test": r["test"],
                            "entry_point": r["entry_point"]}) + "\n")
    with open(SUMMARIES / f"{split}.jsonl", "w", encoding="utf-8") as f:
      for r in keep:
        code, doc = _without_docstring(r["prompt"] + r["canonical_solution"], r["entry_point"])
        if not doc:
          continue
        f.write(json.dumps({"task_id": r["task_id"],
                            "prompt": f"{INSTRUCTION}{code}\nSummary:",
                            "completion": " " + _first_sentence(doc)}) + "\n")


if __name__ == "__main__":
  main()
