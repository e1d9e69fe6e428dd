"""Reward functions for GRPO, their checks, and the generated arithmetic task."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

from jaxft.data import arithmetic
from jaxft.errors import UserError
from jaxft.tasks import rewards

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("text, value", [
    ("So the answer is 42.", 42.0),
    ("3 + 4 = 7", 7.0),
    ("He has 1,234 apples", 1234.0),
    ("It costs $5.50.", 5.5),
    ("The total is -3", -3.0),
    ("The total is -$12", -12.0),
    ("10-3 = 7. Then 7-2", 2.0),  # A hyphen between numbers is not a minus sign.
    ("Counted 12,34 and 1,2345", 2345.0),  # Not thousands groups: separate numbers.
    ("#### 27\nThe answer is 27.\n", 27.0),
    ("seven", None),
    ("", None),
])
def test_last_number(text, value):
  assert rewards.last_number(text) == value


def test_numeric_match_scores_the_last_number_against_the_answer():
  completions = ["3 + 4 = 7", "7 apples, wait, 8", "The answer is 1,000.", "none", "-2"]
  records = [{"answer": 7}, {"answer": 7}, {"answer": "1000"}, {"answer": 0}, {"answer": -2}]
  assert rewards.numeric_match([""] * 5, completions, records) == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_numeric_match_needs_a_numeric_answer():
  with pytest.raises(UserError, match="'answer'.*\\['question'\\]"):
    rewards.numeric_match(["q"], ["7"], [{"question": "q"}])
  with pytest.raises(UserError, match="not a number"):
    rewards.numeric_match(["q"], ["7"], [{"answer": "seven"}])


def test_unit_tests_pass_canonical_solutions_and_fail_wrong_ones():
  problems = [json.loads(l) for l in (DATA / "humaneval" / "train.jsonl").read_text()
              .splitlines()[:2]]
  completions = [problems[0]["completion"], "    return None\n",
                 "    return None\n", problems[1]["completion"]]
  records = [problems[0], problems[0], problems[1], problems[1]]
  got = rewards.score(rewards.resolve("unit_tests"), [r["prompt"] for r in records],
                      completions, records, "unit_tests")
  np.testing.assert_array_equal(got, [1.0, 0.0, 0.0, 1.0])
  with pytest.raises(UserError, match="lacks \\['test', 'entry_point'\\]"):
    rewards.unit_tests(["p"], ["c"], [{"prompt": "p"}])


def test_resolve_a_user_function(tmp_path, monkeypatch):
  (tmp_path / "my_rewards.py").write_text(
      "def length(prompts, completions, records):\n"
      "  return [float(len(c)) for c in completions]\n"
      "NOT_A_FUNCTION = 3\n"
      "class Holder:\n"
      "  @staticmethod\n"
      "  def one(prompts, completions, records):\n"
      "    return [1] * len(completions)\n")
  (tmp_path / "broken_rewards.py").write_text("import no_such_dependency_xyz\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  fn = rewards.resolve("my_rewards:length")
  np.testing.assert_array_equal(rewards.score(fn, ["a", "b"], ["xy", "xyz"], [{}, {}], "length"),
                                [2.0, 3.0])
  assert rewards.resolve("my_rewards:Holder.one")([], ["a"], [{}]) == [1]
  assert rewards.resolve("numeric_match") is rewards.numeric_match
  for spec, message in [("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
                        ("broken_rewards:f", "importing 'broken_rewards' failed"),
                        ("my_rewards:missing", "has no attribute 'missing'"),
                        ("my_rewards:NOT_A_FUNCTION", "is a int, not a function"),
                        ("exact_match", "use one of \\['numeric_match', 'unit_tests'\\]")]:
    with pytest.raises(UserError, match=message):
      rewards.resolve(spec)


def _returning(values):
  return lambda prompts, completions, records: values


def _raising(prompts, completions, records):
  raise KeyError("label")


@pytest.mark.parametrize("fn, message", [
    (_raising, "reward function mine raised KeyError: 'label' \\(first prompt: 'What is 2\\+2\\?'"),
    (_returning([1.0]), "returned 1 values for 2 completions"),
    (_returning([1.0, math.nan]), "returned nan at index 1: rewards must be finite"),
    (_returning(np.array([math.inf, 0.0])), "returned inf at index 0"),
    (_returning([1.0, "1"]), "returned '1' \\(str\\) at index 1"),
    (_returning([None, 1.0]), "returned None \\(NoneType\\) at index 0"),
    (_returning([1e300, 1.0]), "index 0: beyond float32's range"),
    (_returning(1.0), "returned a float, not a list of 2 numbers"),
])
def test_score_rejects_bad_reward_functions(fn, message):
  with pytest.raises(UserError, match=message):
    rewards.score(fn, ["What is 2+2?", "x"], ["4", "5"], [{}, {}], "mine")


def test_score_accepts_numpy_and_bool_values():
  got = rewards.score(_returning(np.array([1, 0])), ["a", "b"], ["", ""], [{}, {}], "f")
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, [1.0, 0.0])
  np.testing.assert_array_equal(
      rewards.score(_returning([True, np.float32(0.5)]), ["a", "b"], ["", ""], [{}, {}], "f"),
      [1.0, 0.5])


def test_arithmetic_problems_are_deterministic_and_correct():
  first = arithmetic.problems(3, 50)
  assert first == arithmetic.problems(3, 50)
  assert first != arithmetic.problems(4, 50)
  assert arithmetic.problems(3, 10) == first[:10]
  for p in first:
    assert isinstance(p["answer"], int) and p["answer"] >= 0
    assert rewards.numeric_match([""], [f"The answer is {p['answer']}."], [p]) == [1.0]
  message = arithmetic.prompt_messages(first[0]["question"])
  assert message[0]["role"] == "user" and first[0]["question"] in message[0]["content"]


def test_arithmetic_splits_are_disjoint(tmp_path):
  arithmetic.write_splits(str(tmp_path), train=300, eval=100, seed=5)
  read = lambda name: [json.loads(l) for l in (tmp_path / f"{name}.jsonl").read_text()
                       .splitlines()]
  train, evaluation = read("train"), read("eval")
  assert len(train) == 300 and len(evaluation) == 100
  assert [{k: p[k] for k in ("question", "answer")} for p in evaluation] == (
      arithmetic.problems(6, 100))
  assert all(p["messages"] == arithmetic.prompt_messages(p["question"]) for p in evaluation)
  assert not {p["question"] for p in train} & {p["question"] for p in evaluation}
  other = tmp_path / "again"
  arithmetic.write_splits(str(other), train=300, eval=100, seed=5)
  assert (other / "train.jsonl").read_text() == (tmp_path / "train.jsonl").read_text()


def test_arithmetic_train_skips_eval_questions(tmp_path, monkeypatch):
  # A tiny template space, so that the two seeds' questions collide.
  monkeypatch.setattr(arithmetic, "_PEOPLE", (("Sam", "He"), ("Mia", "She")))
  monkeypatch.setattr(arithmetic, "_THINGS", ("apples",))
  monkeypatch.setattr(arithmetic, "_TEMPLATES", (arithmetic._groups,))
  evaluation = {p["question"] for p in arithmetic.problems(1, 20)}
  assert evaluation & {p["question"] for p in arithmetic.problems(0, 40)}
  arithmetic.write_splits(str(tmp_path), train=40, eval=20, seed=0)
  train = [json.loads(l)["question"] for l in (tmp_path / "train.jsonl").read_text().splitlines()]
  assert len(train) == 40 and not set(train) & evaluation
