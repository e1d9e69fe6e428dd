"""Derives this folder's train/eval files from the HH-RLHF pairs (deterministic; rerun to check).

  python data/hh-rlhf-harmless/make_splits.py [PAIRS.jsonl.gz]

PAIRS (default ../shared/data/hh-rlhf-harmless/pairs.jsonl.gz from the
checkout) holds 2,000 {"chosen", "rejected"} transcripts of Anthropic's
HH-RLHF harmless-base test split. The 10% of pairs with the lowest SHA-256
of their prompt (the chosen transcript up to its last "\\n\\nAssistant:")
go to eval.jsonl, the rest to train.jsonl, each in the source order. Hashing
the prompt, not the whole pair, keeps pairs that share a prompt in one split.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE.parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"
EVAL_FRACTION = 0.1


def _prompt_hash(pair: dict) -> str:
  chosen = pair["chosen"]
  return hashlib.sha256(chosen[:chosen.rfind("\n\nAssistant:")].encode("utf-8")).hexdigest()


def main() -> None:
  source = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE
  with gzip.open(source, "rt", encoding="utf-8") as f:
    pairs = [json.loads(line) for line in f if line.strip()]
  hashes = [_prompt_hash(p) for p in pairs]
  cutoff = sorted(hashes)[int(len(pairs) * EVAL_FRACTION)]
  for split, keep in (("train", lambda h: h >= cutoff), ("eval", lambda h: h < cutoff)):
    with open(HERE / f"{split}.jsonl", "w", encoding="utf-8") as f:
      for pair, h in zip(pairs, hashes):
        if keep(h):
          f.write(json.dumps({"chosen": pair["chosen"], "rejected": pair["rejected"]},
                             ensure_ascii=False) + "\n")


if __name__ == "__main__":
  main()
