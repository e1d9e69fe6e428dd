"""Trains or restores the tiny setup on meshes, in its own process, for test_sharding.

  python -m tests.mesh_worker ROOT STEPS WORKDIR:DATAxFSDPxTENSOR [...] [COORD NPROC PID]

The caller sets XLA_FLAGS=--xla_force_host_platform_device_count=N. For each
WORKDIR:MESH in turn (one process for several meshes: start-up is paid once),
trains to STEPS (resuming whatever WORKDIR holds; STEPS=0 only restores),
then writes WORKDIR/dump-<mesh>-p<process>.npz with every state leaf
gathered, and prints one JSON line: losses by step, and bytes of params and
optimizer state in total and on the fullest device. With COORD NPROC PID,
this process is one of NPROC joined by jax.distributed.
"""

import json
import pathlib
import sys

import jax
import numpy as np

from jaxft import run as run_lib


def run_job(root: pathlib.Path, workdir: str, mesh: tuple[int, int, int], steps: int) -> dict:
  from jaxft import inspect
  from jaxft import sharding
  from jaxft import train
  from tests.helpers import tiny_config
  data, fsdp, tensor = mesh
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
  return {
      "step": run.step,
      "losses": {e["step"]: e["loss"] for e in events if e["split"] == "train"},
      "param_bytes": inspect.tree_bytes(params),
      "param_bytes_per_device": sharding.bytes_per_device(params),
      "opt_bytes": inspect.tree_bytes(run.state["opt_state"]),
      "opt_bytes_per_device": sharding.bytes_per_device(run.state["opt_state"]),
      "devices": jax.device_count(),
      "dump": name,
  }


def main(argv):
  root, steps = pathlib.Path(argv[1]), int(argv[2])
  jobs = [a for a in argv[3:] if ":" in a and "x" in a.rsplit(":", 1)[1]]
  dist = argv[3 + len(jobs):]
  if dist:
    from jaxft.runtime import distributed
    distributed.initialize(dist[0], int(dist[1]), int(dist[2]))
  for job in jobs:
    workdir, mesh = job.rsplit(":", 1)
    print(json.dumps(run_job(root, workdir, tuple(map(int, mesh.split("x"))), steps)),
          flush=True)


if __name__ == "__main__":
  main(sys.argv)
