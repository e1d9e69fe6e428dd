"""Attention memory on TPU: per-chip temporaries of a real train step from 4k to 16k tokens.

Compiles (on this CPU, with the TPU compiler) Llama-3.1-8B's train step with
LoRA r16 for a TPU slice at each sequence length, once with the splash
kernel (`model.attention=splash`, what `auto` picks on TPU) and once with
XLA's einsum attention (`jaxft`), at a fixed number of tokens per chip row;
prints temporaries per chip and their growth over the shortest length
(linear would be lengths[-1] / lengths[0]).

  .venv/bin/python bench/tpu_attention.py [--topology v5p-16] [--lengths 4096 16384]
"""

from __future__ import annotations

import argparse
import contextlib
import io

from bench.tpu_plans import config
from jaxft import inspect
from jaxft.aot import topology

GiB = topology.GiB


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--topology", default="v5p-16")
  p.add_argument("--model", default="8b")
  p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
  p.add_argument("--attention", nargs="+", default=["splash", "jaxft"])
  args = p.parse_args()
  slice_ = topology.parse(args.topology)
  print(f"{args.model} LoRA r16, remat full, one sequence per chip, {slice_.describe()}")
  print("| attention | tokens | temporaries per chip | peak per chip | growth vs shortest | "
        "compile |")
  print("|---|---|---|---|---|---|")
  for attention in args.attention:
    base = None
    for length in args.lengths:
      c = config(args.model, lora=True, batch=slice_.chips, length=length)
      c.model.remat = "full"
      c.model.attention = attention
      with contextlib.redirect_stdout(io.StringIO()):
        out = inspect.measure(c, inspect.Model.of(c), slice_)
      temp = out["temp_memory_bytes"]
      base = base or temp
      print(f"| {attention} | {length} | {temp / GiB:.2f} GiB | "
            f"{out['peak_memory_bytes'] / GiB:.2f} GiB | {temp / base:.2f}x | "
            f"{out['compile_seconds']:.0f} s |", flush=True)


if __name__ == "__main__":
  main()
