"""Loads an HF checkpoint onto an fsdp mesh, as one of several processes (test_shard_load).

  python -m tests.load_worker CHECKPOINT OUT COORD NPROC PID MODE [MODE ...]

The caller sets XLA_FLAGS=--xla_force_host_platform_device_count=N. Joins the
NPROC processes by jax.distributed, then for each MODE in turn loads
CHECKPOINT (a causal LM) with config.mesh.fsdp=-1 (every device of every
process), as `run.open_run` does, gathers every param and, in process 0,
writes them to OUT/params-MODE.npz. Prints one JSON line per MODE: the bytes
this process read from the checkpoint, the param bytes in total and on the
fullest device. MODE "slices": as is; "replicas": config.mesh data=4,
fsdp=2 instead, so a process's devices hold some slices twice;
"whole-kernels": TRANSPOSE's slice mapping dropped (in this process, from
then on), so kernels take the whole-tensor path.
"""

import dataclasses
import json
import pathlib
import sys

import numpy as np


def _whole_kernels() -> None:
  """Makes the causal LM layout's transposes unmappable, as a transform without `axes`."""
  from jaxft.models import llama
  rules = llama.CAUSAL_LM_CHECKPOINT.rules
  rules["torch"] = tuple(
      dataclasses.replace(r, transform=dataclasses.replace(r.transform, axes=None))
      if r.transform.axes and r.transform.axes(2) == (1, 0) else r for r in rules["torch"])


def load(checkpoint: str, out: str, mode: str) -> dict:
  """One load of `checkpoint` onto the fsdp mesh; its JSON line's fields."""
  from jaxft import config as config_lib
  from jaxft import sharding
  from jaxft.formats import hf
  from jaxft.tuning import param_paths
  from flax import nnx
  import jax
  if mode == "whole-kernels":
    _whole_kernels()
  config = config_lib.base()
  config.mesh.update(data=4 if mode == "replicas" else 1, fsdp=-1, tensor=1)
  mesh, rules = sharding.make_mesh(config), sharding.logical_rules(config)
  loaded = hf.load(checkpoint, "causal_lm",
                   shardings=lambda s: sharding.tree_shardings(s, mesh, rules))
  named = param_paths.named_variables(nnx.state(loaded.model, nnx.Param))
  # Every process gathers (a collective); process 0 keeps the values.
  gathered = {path: sharding.to_host(var.get_value()) for path, var in named}
  if jax.process_index() == 0:
    np.savez(pathlib.Path(out) / f"params-{mode}.npz", **gathered)
  leaves = [var.get_value() for _, var in named]
  return {"mode": mode, "bytes_read": loaded.report.bytes_read,
          "param_bytes": sum(x.nbytes for x in leaves),
          "param_bytes_per_device": sharding.bytes_per_device(leaves),
          "devices": len(mesh.devices.flat),
          "missing": loaded.report.missing, "unexpected": loaded.report.unexpected}


def main(argv: list[str]) -> None:
  checkpoint, out, coordinator, nproc, pid, *modes = argv[1:]
  from jaxft.runtime import distributed
  distributed.initialize(coordinator, int(nproc), int(pid))
  for mode in modes:
    print(json.dumps(load(checkpoint, out, mode)), flush=True)


if __name__ == "__main__":
  main(sys.argv)
