"""QLoRA against LoRA on a bfloat16 base: SmolLM2-135M chat SFT (configs/sft.py), two arms.

Both arms run the `configs/sft.py` recipe (60 steps of 8 packed rows x 256
tokens on the bundled chitchat conversations, cosine schedule, seed 0) with
the same LoRA: rank 16, alpha 16, on every Linear of the blocks (q/k/v/o,
gate/up/down), lr 1e-3 (chosen once, before any run; not tuned on the
held-out loss). They differ only in config.model.frozen_dtype: `bfloat16`
(the base stored in bf16) or `nf4` (the base's Linear kernels in NF4 with a
float32 scale per 64 inputs, the rest in bf16; see jaxft/tuning/quantize.py).

Per arm, in its own process: the held-out assistant-token loss of the
pretrained model under that storage (`jaxft eval` on a fresh workdir) and
after the 60 steps, `param_bytes` as `jaxft inspect` reports it, the wall
time of `jaxft train` and the process's peak RSS. Prints a markdown table and
the nf4 / bf16 loss ratio; writes bench/.cache/qlora/results.json.

  .venv/bin/python -m bench.qlora [--arms bfloat16 nf4] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "bench", ".cache", "qlora")
TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LR = 1e-3


def config(frozen_dtype: str, steps: int):
  """configs/sft.py with the LoRA both arms share, the base stored as `frozen_dtype`."""
  from jaxft import defaults  # pylint: disable=g-import-not-at-top
  c = defaults.recipe("sft")
  c.lora.update(rank=16, alpha=16.0, targets=TARGETS)
  c.optim.lr = LR
  c.model.frozen_dtype = frozen_dtype
  c.train.num_steps = steps
  c.eval.num_samples = 0  # Sample replies cost minutes and are not compared here.
  c.checkpoint.every = 0
  return c


def param_bytes(c) -> int:
  """Bytes of every stored parameter, trained and frozen (`jaxft inspect`'s param_bytes)."""
  from jaxft import inspect, sharding  # pylint: disable=g-import-not-at-top
  state = inspect.abstract_state(c, inspect.Model.of(c).split, sharding.make_mesh(c))[0]
  return inspect.tree_bytes(state["params"]) + inspect.tree_bytes(state["frozen"])


def run_arm(frozen_dtype: str, steps: int) -> dict:
  """One arm, in this process: eval before, train, figures."""
  from jaxft import commands, train  # pylint: disable=g-import-not-at-top
  c = config(frozen_dtype, steps)
  workdir = os.path.join(CACHE, frozen_dtype)
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir + "-pretrained", exist_ok=True)
  before = commands.eval_command(c, workdir + "-pretrained")
  shutil.rmtree(workdir + "-pretrained", ignore_errors=True)
  start = time.perf_counter()
  after = train.train(c, workdir)
  seconds = time.perf_counter() - start
  return {"frozen_dtype": frozen_dtype, "steps": steps, "loss_before": before["loss"],
          "loss_after": after["loss"], "tokens": after["tokens"],
          "param_bytes": param_bytes(c), "train_seconds": round(seconds, 1),
          "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--arms", nargs="+", default=["bfloat16", "nf4"])
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--arm", help=argparse.SUPPRESS)  # Internal: run one arm, print its JSON.
  args = p.parse_args()
  if args.arm:
    print("RESULT " + json.dumps(run_arm(args.arm, args.steps)), flush=True)
    return
  os.makedirs(CACHE, exist_ok=True)
  results = []
  for arm in args.arms:
    out = subprocess.run([sys.executable, "-m", "bench.qlora", f"--arm={arm}",
                          f"--steps={args.steps}"], cwd=ROOT, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    results.append(json.loads(out.rsplit("RESULT ", 1)[1]))
    print(f"{arm}: {results[-1]}", flush=True)
  print("| frozen_dtype | held-out loss, pretrained | after "
        f"{args.steps} steps | param_bytes | train wall time | peak RSS |")
  print("|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r['frozen_dtype']} | {r['loss_before']:.4f} | {r['loss_after']:.4f} | "
          f"{r['param_bytes'] / 1e6:.1f} MB | {r['train_seconds'] / 60:.1f} min | "
          f"{r['peak_rss_gb']:.1f} GB |")
  by = {r["frozen_dtype"]: r for r in results}
  if {"bfloat16", "nf4"} <= set(by):
    ratio = by["nf4"]["loss_after"] / by["bfloat16"]["loss_after"]
    print(f"nf4 / bf16 held-out loss after training: {ratio:.4f}; param_bytes "
          f"{by['nf4']['param_bytes'] / by['bfloat16']['param_bytes']:.3f}x")
  with open(os.path.join(CACHE, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
