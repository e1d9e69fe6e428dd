"""pass@1 runs code against HumanEval's tests in a subprocess; ROUGE-L scores summaries."""

import json
import pathlib

import pytest

from jaxft.tasks import lm_metrics

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


def _problems(n):
  lines = (DATA / "humaneval" / "test.jsonl").read_text().splitlines()[:n]
  return [json.loads(l) for l in lines]


def test_canonical_solutions_pass_and_wrong_ones_fail():
  problems = _problems(4)
  assert lm_metrics.pass_at_1(problems, [p["completion"] for p in problems]) == 1.0
  wrong = ["    return None\n"] * 3 + [problems[3]["completion"]]
  assert lm_metrics.pass_at_1(problems, wrong) == 0.25


def test_a_program_that_hangs_fails_at_the_timeout():
  [problem] = _problems(1)
  assert not lm_metrics.passes(lm_metrics.program(problem, "    while True: pass\n"),
                               timeout=1.0)


def test_programs_run_in_an_empty_folder_not_the_callers(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "secret.txt").write_text("x")
  assert not lm_metrics.passes("import os\nassert os.path.exists('secret.txt')\n", timeout=10)
  assert lm_metrics.passes("import os\nassert os.listdir('.') == ['program.py']\n", timeout=10)


def test_rouge_l_is_one_for_equal_texts_and_lower_for_partial_overlap():
  assert lm_metrics.rouge_l(["return the sum of a list"], ["return the sum of a list"]) == 1.0
  partial = lm_metrics.rouge_l(["return the sum of a list"], ["return the list"])
  assert 0.0 < partial < 1.0
  assert partial == pytest.approx(2 * (3 / 3) * (3 / 6) / (3 / 3 + 3 / 6))


def test_derived_data_files_are_what_make_splits_writes(tmp_path, monkeypatch):
  import importlib.util
  import shutil
  for folder in ("humaneval", "code-summaries"):
    shutil.copytree(DATA / folder, tmp_path / folder)
  script = tmp_path / "humaneval" / "make_splits.py"
  for f in list((tmp_path / "humaneval").glob("*.jsonl")) + list(
      (tmp_path / "code-summaries").glob("*.jsonl")):
    f.unlink()
  spec = importlib.util.spec_from_file_location("make_splits", script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main()
  for rel in ("humaneval/train.jsonl", "humaneval/test.jsonl", "code-summaries/train.jsonl",
              "code-summaries/test.jsonl"):
    assert (tmp_path / rel).read_text() == (DATA / rel).read_text(), rel
