"""jaxft against a plain PyTorch + transformers loop, same data and hyperparameters.

Runs `bench/torch_classify.py` and `jaxft train` one after the other (never at
the same time: they share the CPU cores) for each seed, then prints one
markdown row per seed and one for the mean: both accuracies, the accuracy gap
and the wall-time ratio. Seed noise on small tasks is about a point, so judge
the gap on the mean over several seeds.

  .venv/bin/python bench/data_prep.py        # the held-out task: party of convention speakers
  .venv/bin/python bench/compare_classify.py \\
      --train bench/.cache/political/train.jsonl --eval bench/.cache/political/test.jsonl \
      --seeds 0 1 2

Both sides: AdamW (no decay on biases / LayerNorm), lr 1e-4 with 10% linear
warmup then linear decay, clipping at 1.0, batch 32, max length 64, seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _last_json(stdout: str) -> dict:
  return json.loads(stdout.strip().splitlines()[-1])


def run_torch(args: argparse.Namespace, seed: int) -> dict:
  cmd = [sys.executable, str(ROOT / "bench" / "torch_classify.py"), "--train", args.train,
         "--eval", args.eval, "--num_steps", str(args.num_steps), "--batch_size",
         str(args.batch_size), "--max_length", str(args.max_length), "--lr", str(args.lr),
         "--seed", str(seed), "--threads", str(args.threads)]
  t0 = time.perf_counter()
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return {**_last_json(out.stdout), "wall_seconds": time.perf_counter() - t0}


def run_jaxft(args: argparse.Namespace, seed: int, workdir: str) -> dict:
  cmd = [sys.executable, "-m", "jaxft.cli", "train", f"--config={ROOT / 'configs' / 'classify.py'}",
         f"--workdir={workdir}", f"--config.data.train={args.train}",
         f"--config.data.eval={args.eval}", f"--config.train.num_steps={args.num_steps}",
         f"--config.train.batch_size={args.batch_size}",
         f"--config.data.max_length={args.max_length}", f"--config.optim.lr={args.lr}",
         f"--config.train.seed={seed}", "--config.checkpoint.every=0",
         "--config.train.log_every=10"]
  t0 = time.perf_counter()
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
  result = {**_last_json(out.stdout), "wall_seconds": time.perf_counter() - t0}
  train_lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))
                 if '"split": "train"' in l]
  result["examples_per_sec"] = train_lines[-1]["examples_per_sec"]
  return result


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--train", required=True)
  p.add_argument("--eval", required=True)
  p.add_argument("--num_steps", type=int, default=339)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--max_length", type=int, default=64)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--threads", type=int, default=2)
  args = p.parse_args()
  print("| task | seed | steps | PyTorch acc | jaxft acc | gap (points) | PyTorch wall s "
        "| jaxft wall s | speed ratio (torch/jaxft) |\n|---|---|---|---|---|---|---|---|---|")
  rows = []
  for seed in args.seeds:
    torch_result = run_torch(args, seed)
    with tempfile.TemporaryDirectory() as workdir:
      jax_result = run_jaxft(args, seed, workdir)
    print(json.dumps({"seed": seed, "torch": torch_result, "jaxft": jax_result}), file=sys.stderr)
    rows.append((torch_result["accuracy"], jax_result["accuracy"],
                 torch_result["wall_seconds"], jax_result["wall_seconds"]))
    _row(args, str(seed), *rows[-1])
  if len(rows) > 1:
    _row(args, "mean", *(sum(col) / len(rows) for col in zip(*rows)))


def _row(args: argparse.Namespace, seed: str, torch_acc: float, jax_acc: float,
         torch_s: float, jax_s: float) -> None:
  print(f"| {Path(args.train).parent.name} | {seed} | {args.num_steps} | {torch_acc:.4f} | "
        f"{jax_acc:.4f} | {100 * (jax_acc - torch_acc):+.2f} | {torch_s:.0f} | {jax_s:.0f} | "
        f"{torch_s / jax_s:.2f} |", flush=True)


if __name__ == "__main__":
  main()
