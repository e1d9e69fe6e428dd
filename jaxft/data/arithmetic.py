"""Grade-school arithmetic word problems, generated from a seed: a verifiable RL task.

Each problem is {"question": str, "answer": int}: one or two operations (+, -,
or * by a small number) on small whole numbers, in a few templates with varied
names and objects. They are meant for GRPO on a tiny chat model
(SmolLM2-135M-Instruct): easy enough that some sampled answers are right, so
rewards differ within a group, and hard enough to leave room to improve.
`rewards.numeric_match` scores a completion against "answer"; nothing is
downloaded. Measured on 100 eval problems, SmolLM2-135M-Instruct (Q4_1 GGUF,
64 new tokens) answers 38% greedily and 8% of temperature-1 samples; the
two-step template is the hardest (8% greedy), the product one the easiest.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from typing import Callable, Iterator

from jaxft.errors import UserError

# (name, subject pronoun)
_PEOPLE = (("Sam", "He"), ("Mia", "She"), ("Tom", "He"), ("Lily", "She"), ("Ben", "He"),
           ("Ava", "She"), ("Max", "He"), ("Zoe", "She"), ("Leo", "He"), ("Emma", "She"),
           ("Noah", "He"), ("Lucy", "She"), ("Jack", "He"), ("Nora", "She"))
_THINGS = ("apples", "pencils", "marbles", "stickers", "cookies", "books", "balloons",
           "cards", "shells", "stamps", "crayons", "oranges")
_CONTAINERS = ("boxes", "bags", "jars", "baskets")

_Person = tuple[str, str]
# (rng, person, another person, object) -> (question, answer).
_Template = Callable[[random.Random, _Person, _Person, str], tuple[str, int]]


def _buys(rng: random.Random, person: _Person, friend: _Person,
          thing: str) -> tuple[str, int]:
  del friend
  a, b = rng.randint(2, 20), rng.randint(2, 20)
  name, he = person
  return (f"{name} has {a} {thing}. {he} buys {b} more. "
          f"How many {thing} does {name} have now?", a + b)


def _gives(rng: random.Random, person: _Person, friend: _Person,
           thing: str) -> tuple[str, int]:
  a = rng.randint(5, 20)
  b = rng.randint(2, a - 1)
  name, he = person
  return (f"{name} has {a} {thing}. {he} gives {b} {thing} to {friend[0]}. "
          f"How many {thing} does {name} have left?", a - b)


def _together(rng: random.Random, person: _Person, friend: _Person,
              thing: str) -> tuple[str, int]:
  a, b = rng.randint(2, 20), rng.randint(2, 20)
  return (f"{person[0]} has {a} {thing} and {friend[0]} has {b} {thing}. "
          f"How many {thing} do they have together?", a + b)


def _groups(rng: random.Random, person: _Person, friend: _Person,
            thing: str) -> tuple[str, int]:
  del friend
  a, b = rng.randint(3, 6), rng.randint(4, 12)
  container = rng.choice(_CONTAINERS)
  return (f"{person[0]} has {a} {container}. Each one holds {b} {thing}. "
          f"How many {thing} does {person[0]} have in all?", a * b)


def _buys_then_gives(rng: random.Random, person: _Person, friend: _Person,
                     thing: str) -> tuple[str, int]:
  a, b = rng.randint(2, 12), rng.randint(2, 12)
  c = rng.randint(2, a + b - 1)
  name, he = person
  return (f"{name} has {a} {thing}. {he} buys {b} more, then gives {c} to {friend[0]}. "
          f"How many {thing} does {name} have now?", a + b - c)


_TEMPLATES: tuple[_Template, ...] = (_buys, _gives, _together, _groups, _buys_then_gives)


def _stream(seed: int) -> Iterator[dict]:
  """An endless, seed-determined sequence of problems."""
  rng = random.Random(seed)
  while True:
    template = rng.choice(_TEMPLATES)
    person, friend = rng.sample(_PEOPLE, 2)
    question, answer = template(rng, person, friend, rng.choice(_THINGS))
    yield {"question": question, "answer": answer}


def problems(seed: int, count: int) -> list[dict]:
  """`count` problems [{"question": str, "answer": int}], the same for the same seed.

  Questions may repeat within a list (the template space is finite).
  """
  return list(itertools.islice(_stream(seed), count))


# pylint: disable-next=redefined-builtin
def write_splits(folder: str, train: int = 2000, eval: int = 200, seed: int = 0) -> None:
  """FOLDER/train.jsonl and FOLDER/eval.jsonl, no question in both.

  Rows are {"messages": the chat prompt (`prompt_messages`), "question", "answer"}.

  Eval holds `problems(seed + 1, eval)`; train the first `train` problems of
  seed `seed` whose question is not an eval question (so the two seeds of
  neighbouring `seed` values overlap: pick seeds two apart for unrelated sets).

  Raises:
    UserError: too few distinct non-eval questions for `train`.
  """
  evaluation = problems(seed + 1, eval)
  held_out = {p["question"] for p in evaluation}
  # Bounded, so that a template space too small for `train` fails instead of looping.
  candidates = itertools.islice(_stream(seed), 100 * (train + 1))
  training = list(itertools.islice((p for p in candidates if p["question"] not in held_out),
                                   train))
  if len(training) < train:
    raise UserError(f"cannot find {train} arithmetic problems outside the eval split")
  os.makedirs(folder, exist_ok=True)
  for name, rows in (("train", training), ("eval", evaluation)):
    with open(os.path.join(folder, f"{name}.jsonl"), "w", encoding="utf-8") as f:
      f.writelines(json.dumps({"messages": prompt_messages(r["question"]), **r}) + "\n"
                   for r in rows)


INSTRUCTION = "Answer briefly, in one or two sentences, and end with the final answer as a number."


def prompt_messages(question: str) -> list[dict]:
  """The chat prompt of a question: one user message, asking for the number at the end."""
  return [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]


if __name__ == "__main__":
  # python -m jaxft.data.arithmetic FOLDER: the files configs/grpo.py reads.
  import sys  # pylint: disable=g-import-not-at-top
  write_splits(sys.argv[1])
