"""Joining the processes of a multi-host run (JAX's distributed runtime).

Every process runs the same command. On a multi-worker TPU VM slice and under
SLURM with more than one task, `jax.distributed.initialize()` finds the
coordinator by itself; elsewhere the three flags name it.
"""

from __future__ import annotations

import os

import jax

from jaxft.errors import UserError


def _cluster_detected() -> bool:
  """A multi-process environment JAX can configure itself from."""
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
  tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return slurm or tpu_pod


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> None:
  """Joins the run's other processes, if there are any; a no-op for one process.

  Raises:
    UserError: only some of the three flags are given, or they are out of range.
  """
  given = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise UserError("multi-process runs need all of --coordinator_address, "
                      "--num_processes and --process_id")
    if not 0 <= process_id < num_processes:
      raise UserError(f"--process_id={process_id} must be in [0, --num_processes="
                      f"{num_processes})")
    if num_processes > 1:
      jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _cluster_detected():
    jax.distributed.initialize()
