"""`jaxft plan`: the mesh, remat and micro-batch that fit a TPU slice, found by compiling.

For the configured global batch and length, candidates vary the mesh shape
(data x fsdp x tensor), `config.model.remat` and `config.train.grad_accum`.
Each is compiled by the TPU compiler for the slice (inspect.measure, the
train step training jits); the compiler's per-chip peak decides whether it
fits, a roofline estimate (roofline.py) ranks those that do.

The search is bounded (`max_compiles`) and ordered so few compiles settle it:
per mesh shape, full remat at the fewest micro-batches first (the most likely
to fit). If it does not fit, the smallest gradient accumulation its peak
predicts will (activations shrink with the micro-batch; the state does not).
If it fits, no remat (the least compute), then `dots` if that does not. A
mesh whose parameters and optimizer state alone overflow a chip is ruled out
without compiling.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import ml_collections

from jaxft import inspect as inspect_lib
from jaxft import sharding
from jaxft.aot import topology as topology_lib
from jaxft.errors import UserError

GiB = topology_lib.GiB


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One point of the search: a mesh shape, a remat policy, a micro-batch count."""
  data: int
  fsdp: int
  tensor: int
  remat: str
  grad_accum: int

  def overrides(self) -> dict[str, Any]:
    """config keys -> values, as `--config.KEY=VALUE` flags set them."""
    return {"mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor,
            "model.remat": self.remat, "train.grad_accum": self.grad_accum}

  def apply(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    out = config.copy_and_resolve_references()
    for key, value in self.overrides().items():
      section, name = key.split(".")
      out[section][name] = value
    return out

  def label(self) -> str:
    return (f"{self.data}x{self.fsdp}x{self.tensor} remat={self.remat} "
            f"accum={self.grad_accum}")


@dataclasses.dataclass
class Row:
  """A candidate and what became of it: compiled figures, or why it was not compiled."""
  candidate: Candidate
  figures: dict[str, Any] | None = None
  skipped: str = ""
  state_bytes: int = 0  # Parameters + optimizer state per chip, when ruled out by them.

  @property
  def fits(self) -> bool:
    return bool(self.figures and self.figures["fits"])


def mesh_shapes(topology: topology_lib.Topology, heads: int, kv_heads: int) -> list[tuple]:
  """(data, fsdp, tensor) shapes worth trying, most promising first.

  Data parallelism spans the slices (the data-center network carries only
  gradient reductions); inside a slice, fsdp over every chip first, then
  tensor parallelism of 2, 4, 8 where the attention heads split evenly.
  """
  per_slice = topology.chips_per_slice
  shapes = []
  for tensor in (1, 2, 4, 8):
    if per_slice % tensor or heads % tensor or kv_heads % tensor:
      continue
    shapes.append((topology.num_slices, per_slice // tensor, tensor))
  return shapes


def grad_accums(batch_size: int, rows_split: int) -> list[int]:
  """Micro-batch counts that leave every micro-batch splittable over `rows_split` devices."""
  return [g for g in range(1, batch_size + 1)
          if batch_size % g == 0 and (batch_size // g) % rows_split == 0]


class Search:
  """Compiles candidates for one config and slice, within a budget of compiles."""

  def __init__(self, config: ml_collections.ConfigDict, topology: topology_lib.Topology,
               max_compiles: int, log: Callable[[str], None] = print):
    self.config = config
    self.topology = topology
    self.max_compiles = max_compiles
    self.log = log
    self.rows: list[Row] = []
    self._models: dict[str, inspect_lib.Model] = {}

  @property
  def compiles(self) -> int:
    return sum(r.figures is not None for r in self.rows)

  def model(self, remat: str) -> inspect_lib.Model:
    """The abstract model under `remat` (remat is part of the model's graph)."""
    if remat not in self._models:
      c = self.config.copy_and_resolve_references()
      c.model.remat = remat
      self._models[remat] = inspect_lib.Model.of(c)
    return self._models[remat]

  def run(self) -> list[Row]:
    hf = self.model("none").hf_config
    heads = hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    shapes = mesh_shapes(self.topology, heads, kv_heads)
    if not shapes:
      raise UserError(f"no mesh of {self.topology.name} splits {heads} attention heads")
    for shape in shapes:
      if self.compiles >= self.max_compiles:
        break
      self._search_mesh(*shape)
    return self.rows

  def _search_mesh(self, data: int, fsdp: int, tensor: int) -> None:
    accums = grad_accums(self.config.train.batch_size, data * fsdp)
    if not accums:
      self.rows.append(Row(Candidate(data, fsdp, tensor, "none", 1),
                           skipped=f"batch {self.config.train.batch_size} does not split "
                                   f"over data x fsdp = {data * fsdp}"))
      return
    first = Candidate(data, fsdp, tensor, "none", accums[0])
    state = self._state_bytes(first)
    if state > self.topology.hbm_usable_bytes:
      self.rows.append(Row(first, skipped=f"parameters + optimizer state alone need "
                                          f"{state / GiB:.1f} GiB per chip",
                           state_bytes=state))
      return
    full = self._try(dataclasses.replace(first, remat="full"))
    if full.figures is None:
      return
    if not full.fits:
      for accum in self._accums_to_try(full, accums):
        if self._try(dataclasses.replace(full.candidate, grad_accum=accum)).fits:
          return
      return
    # Full remat fits: less recompute may too (none, then dots in between).
    if not self._try(first).fits:
      self._try(dataclasses.replace(first, remat="dots"))

  def _accums_to_try(self, full: Row, accums: list[int]) -> list[int]:
    """Larger micro-batch counts, from the smallest the activations predict will fit."""
    f = full.figures
    state = f["peak_memory_bytes"] - f["temp_memory_bytes"]
    room = self.topology.hbm_usable_bytes - state
    if room <= 0:
      return []
    done = full.candidate.grad_accum
    need = done * math.ceil(f["temp_memory_bytes"] / room)
    more = [a for a in accums if a > done]
    return [a for a in more if a >= need] or more[-1:]

  def _state_bytes(self, candidate: Candidate) -> int:
    """Parameters + optimizer state on the fullest chip, from shardings alone."""
    config = candidate.apply(self.config)
    mesh = sharding.make_mesh(config, self.topology.devices())
    state, _, _ = inspect_lib.abstract_state(config, self.model(candidate.remat).split, mesh)
    return sharding.bytes_per_device(state)

  def _try(self, candidate: Candidate) -> Row:
    if self.compiles >= self.max_compiles:
      return Row(candidate, skipped="compile budget spent")
    row = Row(candidate)
    self.log(f"compiling {candidate.label()} ...")
    config = candidate.apply(self.config)
    row.figures = inspect_lib.measure(config, self.model(candidate.remat), self.topology)
    self.rows.append(row)
    f = row.figures
    self.log(f"  peak {f['peak_memory_bytes'] / GiB:.1f} GiB per chip, "
             f"{'fits' if f['fits'] else 'does not fit'} ({f['compile_seconds']:.0f} s)")
    return row


def best(rows: list[Row]) -> Row | None:
  """The fastest (estimated) candidate that fits; else the one closest to fitting."""
  compiled = [r for r in rows if r.figures]
  if not compiled:
    return None
  fitting = [r for r in compiled if r.fits]
  if fitting:
    return min(fitting, key=lambda r: (r.figures["estimated_step_seconds"],
                                       r.figures["peak_memory_bytes"]))
  return min(compiled, key=lambda r: r.figures["peak_memory_bytes"])


def table(rows: list[Row]) -> str:
  """The candidates, one line each; estimates are labelled as such."""
  head = (f"{'candidate (data x fsdp x tensor)':<40} {'peak/chip':>10} {'fits':>5} "
          f"{'est. step':>10} {'est. MFU':>9} {'coll. GB':>9} {'compile':>8}")
  lines = [head]
  for r in rows:
    if r.figures is None:
      lines.append(f"{r.candidate.label():<40} skipped: {r.skipped}")
      continue
    f = r.figures
    head = (f"{r.candidate.label():<40} {f['peak_memory_bytes'] / GiB:>6.1f} GiB "
            f"{'yes' if f['fits'] else 'no':>5}")
    if f.get("compiler_error"):  # Refused for want of HBM: no program to estimate.
      lines.append(f"{head} {'-':>10} {'-':>9} {'-':>9} {f['compile_seconds']:>7.0f}s")
      continue
    coll = sum(c["bytes"] for c in f["collectives"].values()) / 1e9
    lines.append(f"{head} {f['estimated_step_seconds']:>9.2f}s {f['estimated_mfu']:>8.1%} "
                 f"{coll:>9.1f} {f['compile_seconds']:>7.0f}s")
  lines.append("est.: analytic FLOPs at the chip's bf16 peak + collective bytes at its ICI "
               "bandwidth, not overlapped; an optimistic ceiling (jaxft/aot/roofline.py)")
  return "\n".join(lines)


def plan(config: ml_collections.ConfigDict, topology: topology_lib.Topology,
         max_compiles: int = 6) -> dict[str, Any]:
  """Searches, prints the table and the chosen flags; returns the chosen candidate's figures."""
  print(topology.describe())
  start = time.perf_counter()
  search = Search(config, topology, max_compiles)
  rows = search.run()
  print(table(rows))
  chosen = best(rows)
  if chosen is None:
    return _state_verdict(rows, topology)
  f = chosen.figures
  print(inspect_lib.verdict(f))
  flags = " ".join(f"--config.{k}={v}" for k, v in chosen.candidate.overrides().items())
  print(f"chosen: {flags}")
  return {
      "overrides": chosen.candidate.overrides(),
      "peak_memory_bytes": f["peak_memory_bytes"],
      "fits": f["fits"],
      "margin_bytes": f["margin_bytes"],
      "hbm_bytes_per_device": f["hbm_bytes_per_device"],
      "estimated_step_seconds": f["estimated_step_seconds"],
      "estimated_mfu": f["estimated_mfu"],
      "topology": topology.name,
      "devices": f["devices"],
      "param_bytes": f["param_bytes"],
      "param_bytes_per_device": f["param_bytes_per_device"],
      "optimizer_state_bytes_per_device": f["optimizer_state_bytes_per_device"],
      "temp_memory_bytes": f["temp_memory_bytes"],
      "compiles": search.compiles,
      "search_seconds": round(time.perf_counter() - start, 1),
  }


def _state_verdict(rows: list[Row], topology: topology_lib.Topology) -> dict[str, Any]:
  """The answer when no candidate was worth compiling: by how much the state alone overflows."""
  ruled_out = [r for r in rows if r.state_bytes]
  if not ruled_out:
    raise UserError(f"no candidate could be compiled for {topology.name}: "
                    + "; ".join(sorted({r.skipped for r in rows})))
  r = min(ruled_out, key=lambda r: r.state_bytes)
  usable = topology.hbm_usable_bytes
  print(f"DOES NOT FIT  {topology.name}: parameters + optimizer state alone need "
        f"{r.state_bytes / GiB:.1f} GiB per chip, {usable / GiB:.1f} GiB usable: "
        f"{(r.state_bytes - usable) / GiB:.1f} GiB over before any activation")
  return {"overrides": r.candidate.overrides(), "peak_memory_bytes": r.state_bytes,
          "peak_is_lower_bound": True, "fits": False, "margin_bytes": usable - r.state_bytes,
          "hbm_bytes_per_device": topology.chip.hbm_bytes, "topology": topology.name,
          "devices": topology.chips, "compiles": 0}
