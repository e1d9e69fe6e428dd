"""Will it fit? `jaxft plan` for Llama-3.1-8B / 70B on TPU slices, compiled on this CPU.

Each row is one `plan.plan` run: bf16 compute, fp32 master weights, AdamW,
packed sequences of 4,096 tokens, global batch 64, layers scanned; full
fine-tune, LoRA r16 on attention + MLP (frozen base stored in bf16), or
QLoRA: the same adapters over a base whose Linear kernels are stored in NF4
(config.model.frozen_dtype=nf4; embeddings and norms in bf16). The per-chip
peak is the TPU compiler's; MFU and step time are roofline estimates
(jaxft/aot/roofline.py).

  .venv/bin/python bench/tpu_plans.py [--models 8b 70b] [--topologies v5litepod-8 ...]
      [--modes full lora qlora] [--max_compiles 3] [--out bench/.cache/tpu_plans.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time

from jaxft import defaults
from jaxft.aot import plan
from jaxft.aot import topology
from jaxft.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"8b": "configs/models/llama-3.1-8b", "70b": "configs/models/llama-3.1-70b"}
LORA_TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


# config.model.frozen_dtype of each adapter mode's base.
FROZEN = {"lora": "bfloat16", "qlora": "nf4"}


def config(model: str, mode: str, batch: int, length: int):
  """`mode`: full | lora | qlora (see the module docstring)."""
  c = defaults.recipe("sft")
  c.model.path = os.path.join(ROOT, MODELS[model])
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.data.max_length = length
  c.data.packing = True
  c.train.batch_size = batch
  c.train.eval_batch_size = batch
  if mode in FROZEN:
    c.lora.rank = 16
    c.lora.targets = LORA_TARGETS
    c.model.frozen_dtype = FROZEN[mode]
  return c


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--models", nargs="+", default=["8b", "70b"])
  p.add_argument("--topologies", nargs="+", default=["v5litepod-8", "v5p-128", "v6e-64"])
  p.add_argument("--modes", nargs="+", default=["full", "lora"],
                 choices=["full", *FROZEN])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--length", type=int, default=4096)
  p.add_argument("--max_compiles", type=int, default=3)
  p.add_argument("--out", default=os.path.join(ROOT, "bench", ".cache", "tpu_plans.jsonl"))
  args = p.parse_args()
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  print("| model | tuning | topology | chosen mesh (data x fsdp x tensor) / remat / accum | "
        "peak per chip | fits | est. MFU | compiles | plan time |")
  print("|---|---|---|---|---|---|---|---|---|")
  for model in args.models:
    for mode in args.modes:
      for name in args.topologies:
        start = time.perf_counter()
        log = io.StringIO()
        try:
          with contextlib.redirect_stdout(log):
            out = plan.plan(config(model, mode, args.batch, args.length),
                            topology.parse(name), max_compiles=args.max_compiles)
        except UserError as e:
          out = {"error": str(e)}
        out.update(model=model, mode=mode, topology=name, table=log.getvalue(),
                   wall_seconds=round(time.perf_counter() - start, 1))
        with open(args.out, "a", encoding="utf-8") as f:
          f.write(json.dumps(out) + "\n")
        print(row(out), flush=True)


def row(out: dict) -> str:
  head = f"| {out['model']} | {out['mode']} | {out['topology']} |"
  if "error" in out:
    return f"{head} {out['error']} | | | | | | |"
  o = out["overrides"]
  gib = topology.GiB
  fit = "yes" if out["fits"] else f"no ({-out['margin_bytes'] / gib:.1f} GiB over)"
  bound = " (state alone: at least)" if out.get("peak_is_lower_bound") else ""
  mfu = f"{out['estimated_mfu']:.0%}" if out["fits"] else "-"  # No program to estimate.
  return (f"{head} {o['mesh.data']}x{o['mesh.fsdp']}x{o['mesh.tensor']} / {o['model.remat']} / "
          f"{o['train.grad_accum']} | {out['peak_memory_bytes'] / gib:.1f} GiB of "
          f"{out['hbm_bytes_per_device'] / gib:.0f}{bound} | {fit} | {mfu} | "
          f"{out['compiles']} | {out['wall_seconds']:.0f} s |")


if __name__ == "__main__":
  main()
