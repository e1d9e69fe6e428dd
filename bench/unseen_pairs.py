"""The train rows a run never drew: a held-out set larger than the eval split.

  python -m bench.unseen_pairs --recipe dpo --steps 45 --out unseen.jsonl \\
      [--set KEY=VALUE ...]

Batch `i` of training is a pure function of (train.seed, i) (data/batches.py),
so the rows of batches 0..STEPS (one more than trained, to be safe) are known
without the run. Writes the other lines of config.data.train, in order. Row
numbers are the train file's lines only when no pair was dropped in
tokenizing: check that the run's log says nothing was dropped.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench import rows as bench_rows
from jaxft import defaults
from jaxft.data import batches


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--recipe", default="dpo", help="a recipe name in configs/")
  p.add_argument("--steps", type=int, required=True, help="train.num_steps of the run")
  p.add_argument("--out", required=True)
  p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
  args = p.parse_args(argv)
  config = defaults.recipe(args.recipe)
  for item in args.set:
    bench_rows.assign(config, *bench_rows.parse_set(item))
  with open(config.data.train, encoding="utf-8") as f:
    lines = [l for l in f.read().splitlines() if l.strip()]
  order = batches.TrainBatches({"row": np.arange(len(lines))}, config.train.batch_size,
                               config.train.seed)
  seen = set(np.concatenate([order[s]["row"] for s in range(args.steps + 1)]).tolist())
  unseen = [l for i, l in enumerate(lines) if i not in seen]
  with open(args.out, "w", encoding="utf-8") as f:
    f.write("\n".join(unseen) + "\n")
  print(f"{len(seen)} rows drawn by batches 0-{args.steps}; {len(unseen)} written to {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
