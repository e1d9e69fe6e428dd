"""Step time and MFU estimates from analytic FLOPs, a chip's peak and its ICI bandwidth.

Estimates for ranking plans before a pod exists, not predictions of a run:

- compute: the step's hardware FLOPs per chip at the chip's bf16 peak. The
  hardware FLOPs are the model FLOPs (mfu.py: 6 N + attention, per token)
  rescaled for what the step really does: forward 2, activation gradients 2,
  weight gradients 2 x the trainable share, and with full remat a second
  forward 2 (`dots` keeps matmul outputs, so recomputes no matmul).
- collectives: the compiled step's bytes sent per chip (collectives.py, ring
  traffic, loops counted by trip count) over the chip's ICI bandwidth.
- the step takes the two one after the other. XLA overlaps much of an
  FSDP step's collectives with its matmuls, which would make it shorter;
  memory-bound work (norms, softmax, optimizer update) and the matmuls'
  own efficiency below peak, which no FLOP count sees, make it longer. For
  calibration: MaxText's published Llama2-70B recipe on v6e-256 measures
  46% MFU. Read the MFU here as an optimistic figure, and the ranking of
  candidates as what it is for.

XLA's own cost analysis cannot serve: it counts a scanned loop body once.
"""

from __future__ import annotations

import dataclasses

from jaxft.aot import topology as topology_lib


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Seconds per step (estimates), the FLOPs they are for, and the MFU they imply."""
  hardware_flops: float
  compute_seconds: float
  collective_seconds: float
  step_seconds: float
  mfu: float

  @property
  def bound(self) -> str:
    """Which of the two takes longer."""
    return "compute" if self.compute_seconds >= self.collective_seconds else "collectives"


def hardware_flops(model_flops: float, *, trainable_fraction: float, remat: str) -> float:
  """The FLOPs a step executes for `model_flops` of conventional (6 N) work."""
  per_token = 2 + 2 + 2 * trainable_fraction + (2 if remat == "full" else 0)
  return model_flops * per_token / 6


def estimate(*, model_flops: float, trainable_fraction: float, remat: str,
             collective_bytes: float, topology: topology_lib.Topology) -> Estimate:
  """The Estimate of one step over every chip of `topology`.

  Args:
    model_flops: the step's conventional training FLOPs (6 N + attention per
      token), all chips together.
    trainable_fraction: the share of matmul weights that get gradients.
    remat: config.model.remat.
    collective_bytes: bytes one chip sends per step.
    topology: the slice.

  The MFU counts the FLOPs the step must do: remat's recompute is overhead,
  and frozen weights (LoRA) need no weight gradients, so it stays <= 100%
  where mfu.py's 6 N convention would pass it for a LoRA step.
  """
  chip = topology.chip
  work = hardware_flops(model_flops, trainable_fraction=trainable_fraction, remat=remat)
  needed = hardware_flops(model_flops, trainable_fraction=trainable_fraction, remat="none")
  compute = work / topology.chips / chip.peak_flops
  comm = collective_bytes / chip.ici_bytes_per_s
  step = compute + comm
  mfu = needed / topology.chips / chip.peak_flops / step if step else 0.0
  return Estimate(work, compute, comm, step, mfu)
