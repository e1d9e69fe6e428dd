"""Trains or restores the tiny setup on a mesh, in its own process, for test_sharding.

  python -m tests.mesh_worker ROOT WORKDIR DATA FSDP TENSOR STEPS [COORD NPROC PID]

The caller sets XLA_FLAGS=--xla_force_host_platform_device_count=N. Trains to
STEPS (resuming whatever WORKDIR holds; STEPS=0 only restores), then writes
WORKDIR/dump-<mesh>-p<process>.npz with every state leaf gathered, and prints one
JSON line: losses by step, and bytes of params and optimizer state in total
and on the fullest device.
"""

import json
import pathlib
import sys

import jax
import numpy as np
from jaxft import run as run_lib


def main(argv):
  root, workdir = pathlib.Path(argv[1]), argv[2]
  data, fsdp, tensor, steps = map(int, argv[3:7])
  from jaxft.runtime import distributed
  if len(argv) > 7:
    distributed.initialize(argv[7], int(argv[8]), int(argv[9]))
  from jaxft import inspect
  from jaxft import sharding
  from jaxft import train
  from tests.helpers import tiny_config
  config = tiny_config(root, num_steps=max(steps, 1), log_every=1)
  config.train.eval_batch_size = 16
  config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  config.checkpoint.update(every=5, keep=5)
  if steps:
    train.train(config, workdir)
  labels = run_lib.read_labels(workdir)
  run = run_lib.open_run(config, workdir, config.model.path, labels, quiet=True)
  run.checkpointer.close()
  leaves = jax.tree_util.tree_flatten_with_path(run.state)[0]
  arrays = {jax.tree_util.keystr(k): sharding.to_host(v) for k, v in leaves}
  name = f"dump-{data}x{fsdp}x{tensor}-p{jax.process_index()}.npz"
  np.savez(pathlib.Path(workdir) / name, **arrays)
  params = [run.state["params"], run.state["frozen"]]
  events = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
            .splitlines()] if steps else []
  print(json.dumps({
      "step": run.step,
      "losses": {e["step"]: e["loss"] for e in events if e["split"] == "train"},
      "param_bytes": inspect.tree_bytes(params),
      "param_bytes_per_device": sharding.bytes_per_device(params),
      "opt_bytes": inspect.tree_bytes(run.state["opt_state"]),
      "opt_bytes_per_device": sharding.bytes_per_device(run.state["opt_state"]),
      "devices": jax.device_count(),
      "dump": name,
  }))


if __name__ == "__main__":
  main(sys.argv)
