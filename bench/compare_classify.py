"""jaxft against a plain PyTorch + transformers loop, same data and hyperparameters.

Runs `bench/torch_classify.py` and `jaxft train` one after the other (never at
the same time: they share the CPU cores), then prints one markdown row with
both accuracies, the accuracy gap and the training-time ratio.

  .venv/bin/python bench/data_prep.py        # the held-out task: party of convention speakers
  .venv/bin/python bench/compare_classify.py \\
      --train bench/.cache/political/train.jsonl --eval bench/.cache/political/test.jsonl

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


def run_torch(args: argparse.Namespace) -> dict:
  cmd = [sys.executable, str(ROOT / "bench" / "torch_classify.py"), "--train", args.train,
         "--eval", args.eval, "--num_steps", str(args.num_steps), "--batch_size",
         str(args.batch_size), "--max_length", str(args.max_length), "--lr", str(args.lr),
         "--seed", str(args.seed), "--threads", str(args.threads)]
  t0 = time.perf_counter()
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return {**_last_json(out.stdout), "wall_seconds": time.perf_counter() - t0}


def run_jaxft(args: argparse.Namespace, workdir: str) -> dict:
  cmd = [sys.executable, "-m", "jaxft.cli", "train", f"--config={ROOT / 'configs' / 'classify.py'}",
         f"--workdir={workdir}", f"--config.data.train={args.train}",
         f"--config.data.eval={args.eval}", f"--config.train.num_steps={args.num_steps}",
         f"--config.train.batch_size={args.batch_size}",
         f"--config.data.max_length={args.max_length}", f"--config.optim.lr={args.lr}",
         f"--config.train.seed={args.seed}", "--config.checkpoint.every=0",
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
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=2)
  args = p.parse_args()
  torch_result = run_torch(args)
  with tempfile.TemporaryDirectory() as workdir:
    jax_result = run_jaxft(args, workdir)
  gap = 100 * (jax_result["accuracy"] - torch_result["accuracy"])
  ratio = torch_result["wall_seconds"] / jax_result["wall_seconds"]
  print(json.dumps({"torch": torch_result, "jaxft": jax_result}))
  print("| task | steps | PyTorch acc | jaxft acc | gap (points) | PyTorch wall s | jaxft wall s "
        "| speed ratio (torch/jaxft) |")
  print(f"| {Path(args.train).parent.name} | {args.num_steps} | "
        f"{torch_result['accuracy']:.4f} | {jax_result['accuracy']:.4f} | {gap:+.2f} | "
        f"{torch_result['wall_seconds']:.0f} | {jax_result['wall_seconds']:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
  main()
