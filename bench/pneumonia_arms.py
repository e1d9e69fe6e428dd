"""configs/pneumonia.py's arms over seeds and augmentation: the val table of bench/RESULTS.md.

  python -m bench.pneumonia_arms --arms resnet,vit --seeds 0,1,2 --crop off,on \\
      --root runs/pneumonia-arms [--set KEY=VALUE ...]

Each (arm, crop, seed) is one `jaxft train` in a subprocess (its own workdir
under --root; an existing finished run is read back, not retrained). Prints
one markdown row per run (val accuracy, AUC, sensitivity, specificity at the
kept threshold, and AUC at the end; wall seconds) and the mean and sample
standard deviation per (arm, crop). Selection is on val only: the official
test split is not in the repo.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

KEYS = ("accuracy", "auc", "sensitivity", "specificity", "balanced_accuracy")
RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "pneumonia.py")


def final_eval(workdir: str) -> dict | None:
  """The last eval line of a run's metrics.jsonl, or None."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  evals = [json.loads(l) for l in open(path, encoding="utf-8") if '"eval"' in l]
  return evals[-1] if evals else None


def train(arm: str, crop: bool, seed: int, workdir: str, overrides: list[str]) -> float:
  """Runs one arm to completion; its wall seconds."""
  start = time.perf_counter()
  cmd = [sys.executable, "-m", "jaxft.cli", "train", f"--config={RECIPE}:{arm}",
         f"--workdir={workdir}", f"--config.train.seed={seed}",
         f"--config.data.random_resized_crop={crop}", *[f"--config.{o}" for o in overrides]]
  with open(workdir + ".log", "w", encoding="utf-8") as log:
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
  return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--arms", default="resnet")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--crop", default="off", help="off, on, or off,on")
  p.add_argument("--root", required=True)
  p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
  args = p.parse_args(argv)
  os.makedirs(args.root, exist_ok=True)
  print("| arm | crop | seed | " + " | ".join(KEYS) + " | wall s |")
  print("|---" * (len(KEYS) + 4) + "|")
  groups: dict[tuple[str, str], list[dict]] = {}
  for arm in args.arms.split(","):
    for crop in args.crop.split(","):
      for seed in map(int, args.seeds.split(",")):
        workdir = os.path.join(args.root, f"{arm}-crop_{crop}-s{seed}")
        wall = float("nan")
        if final_eval(workdir) is None:
          wall = train(arm, crop == "on", seed, workdir, args.set)
        result = final_eval(workdir)
        groups.setdefault((arm, crop), []).append(result)
        print(f"| {arm} | {crop} | {seed} | " + " | ".join(f"{result[k]:.4f}" for k in KEYS)
              + f" | {wall:.0f} |", flush=True)
  print("\n| arm | crop | runs | " + " | ".join(f"{k} mean ± sd" for k in KEYS) + " |")
  print("|---" * (len(KEYS) + 3) + "|")
  for (arm, crop), results in groups.items():
    cells = []
    for k in KEYS:
      values = [r[k] for r in results]
      sd = statistics.stdev(values) if len(values) > 1 else 0.0
      cells.append(f"{statistics.mean(values):.4f} ± {sd:.4f}")
    print(f"| {arm} | {crop} | {len(results)} | " + " | ".join(cells) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
