"""`jaxft inspect`: what a run will cost, before paying for it.

Builds the model abstractly (shapes only: no weights or tokenizer read,
nothing initialised: a model folder with only config.json will do), resolves
the rules, then lowers and compiles one train step for the configured batch
and reports parameter and optimizer bytes, the step's FLOPs (XLA cost
analysis) and its memory (XLA memory analysis).

With a TPU topology (`--topology=v5p-128`), the same step (the function
training jits, with its shardings) is compiled by the TPU compiler for that
slice's chips, on this machine: the figures are per chip, with the chip's HBM,
a verdict, the collectives and a roofline estimate of step time and MFU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxft import config as config_lib
from jaxft import mfu
from jaxft import run
from jaxft import sharding
from jaxft import tasks
from jaxft.aot import collectives
from jaxft.aot import roofline
from jaxft.aot import topology as topology_lib
from jaxft.formats import hub
from jaxft.models import stack
from jaxft.tuning import optimizer
from jaxft.tuning import param_paths
from jaxft.tuning import rules
from jaxft.tuning import trainable


def tree_bytes(tree: Any) -> int:
  """Bytes of every array (or abstract array) leaf of `tree`."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def tree_size(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def compiled_costs(compiled: Any) -> tuple[float, int]:
  """(FLOPs, peak bytes per device) of a compiled computation.

  On a mesh, XLA reports both per device (the SPMD program each one runs).

  Peak memory is arguments + outputs - donated (aliased) + temporaries: what
  XLA's buffer assignment must hold at once at most.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per computation.
    cost = cost[0]
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  return float(cost.get("flops", 0.0)), int(peak)


def compile_step(config: ml_collections.ConfigDict, split: trainable.Split,
                 batch: dict[str, jax.ShapeDtypeStruct], task: tasks.Task,
                 mesh: jax.sharding.Mesh | None = None, hlo_dir: str | None = None
                 ) -> tuple[Any, Any, jax.sharding.Mesh]:
  """(compiled train step for `batch`'s shapes, its abstract sharded state, the mesh).

  Nothing runs: the step is lowered and compiled from shapes alone, for the
  devices of `mesh` (default: config.mesh over this process's devices). With
  `hlo_dir`, the compiler writes its optimized HLO there (`hlo_text` reads it).
  """
  mesh = mesh or sharding.make_mesh(config)
  state, where, tx = abstract_state(config, split, mesh)
  batch = sharding.with_shardings(batch, jax.tree.map(lambda _: where.batch, batch))
  step_fn = run.make_step_fn(config, split, tx, where, task.objective)
  # A dump changes nothing compiled; `pass_re` matching no pass keeps it to
  # the module before and after optimization.
  options = ({"xla_dump_to": hlo_dir, "xla_dump_hlo_as_text": True, "xla_dump_hlo_pass_re": "^$"}
             if hlo_dir else None)
  compiled = step_fn.lower(state, batch).compile(compiler_options=options)
  return compiled, state, mesh


def hlo_text(hlo_dir: str) -> str:
  """The optimized HLO module `compile_step(..., hlo_dir=)` wrote.

  Read from the compiler's dump rather than `compiled.as_text()`: with libtpu
  newer than jaxlib, jaxlib cannot parse back some TPU steps' HLO (async
  collectives' updates), while the compiler's own text is always complete.
  """
  [path] = glob.glob(os.path.join(hlo_dir, "*.after_optimizations.txt"))
  with open(path, encoding="utf-8") as f:
    return f.read()


def abstract_state(config: ml_collections.ConfigDict, split: trainable.Split,
                   mesh: jax.sharding.Mesh) -> tuple[Any, sharding.Placement, Any]:
  """(the train state as sharded abstract arrays, its Placement, the optimizer)."""
  tx = optimizer.build(config, split.params, split.assignment)
  state = run.abstract_state(split, tx)
  where = sharding.placement(mesh, sharding.logical_rules(config), state)
  return sharding.with_shardings(state, where.state), where, tx


@dataclasses.dataclass
class Model:
  """What inspect and plan need of a config's model, read once: shapes only."""
  task: tasks.Task
  model_path: str
  hf_config: Any
  split: trainable.Split

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> "Model":
    config_lib.validate(config)
    model_path = hub.resolve_model(config.model.path, weights=False)
    task = tasks.of(config)
    hf_config = task.hf_config(model_path, task.class_names())
    split = trainable.split(trainable.abstract_model(hf_config, config, task.model_kind), config,
                            task.fresh_heads(hf_config))
    return cls(task, model_path, hf_config, split)

  def model_flops(self, config: ml_collections.ConfigDict) -> float:
    """Conventional training FLOPs of one step (mfu.py), all devices together."""
    tokens = config.train.batch_size * self.task.tokens_per_example(self.hf_config)
    return self.task.flops_per_token(self.split.sizes, self.hf_config) * tokens

  def trainable_fraction(self) -> float:
    """The share of matmul weights that get gradients (1: full fine-tune)."""
    trained = {p: int(v.get_value().size)
               for p, v in param_paths.named_variables(self.split.params)}
    total = mfu.matmul_params(self.split.sizes)
    return mfu.matmul_params(trained) / total if total else 1.0


def measure(config: ml_collections.ConfigDict, model: Model,
            topology: topology_lib.Topology | None = None) -> dict[str, Any]:
  """Compiles `config`'s train step (for `topology`'s chips if given) and returns its figures.

  A step the TPU compiler refuses for want of HBM is a verdict, not an
  error: its figures then carry the compiler's count of temporaries.
  """
  devices = topology.devices() if topology else None
  mesh = sharding.make_mesh(config, devices)
  t = config.train
  # The eval batch plays no part in the train step measured here.
  sharding.check_fits(mesh, batch_size=t.batch_size, grad_accum=t.grad_accum,
                      eval_batch_size=None,
                      num_heads=getattr(model.hf_config, "num_attention_heads", None))
  start = time.perf_counter()
  cache = topology_lib.persistent_cache_off() if topology else contextlib.nullcontext()
  try:
    with tempfile.TemporaryDirectory(prefix="jaxft-hlo-") as hlo_dir, cache:
      compiled, state, mesh = compile_step(config, model.split,
                                           model.task.abstract_batch(model.model_path),
                                           model.task, mesh, hlo_dir if topology else None)
      hlo = hlo_text(hlo_dir) if topology else ""
  except jax.errors.JaxRuntimeError as e:
    temp = compiler_hbm_oom(str(e)) if topology else None
    if temp is None:
      raise
    state = abstract_state(config, model.split, mesh)[0]
    out = _state_figures(config, state, mesh, model.split.sizes)
    # Outputs alias the donated state, so arguments + temporaries is the peak.
    peak = out["param_bytes_per_device"] + out["optimizer_state_bytes_per_device"] + temp
    out.update(step_flops=None, peak_memory_bytes=peak, temp_memory_bytes=temp,
               compile_seconds=round(time.perf_counter() - start, 1),
               compiler_error=str(e).splitlines()[0])
    out.update(_on_tpu(config, model, topology, "", peak))
    out["fits"] = False
    return out
  seconds = time.perf_counter() - start
  flops, peak = compiled_costs(compiled)
  out = _state_figures(config, state, mesh, model.split.sizes)
  out.update(step_flops=flops, peak_memory_bytes=peak,
             # Activations (what remat trades for recompute) and XLA's scratch space.
             temp_memory_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
             compile_seconds=round(seconds, 1))
  if topology:
    out.update(_on_tpu(config, model, topology, hlo, peak))
  return out


_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def compiler_hbm_oom(message: str) -> int | None:
  """The temporaries (bytes) a TPU compile refused as too big for HBM, or None.

  The compiler says e.g. "the total memory required for HLO temporaries
  (29.75G) exceeds available HBM (15.75G)", in binary units.
  """
  m = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT]?)(?:i?B)?\)", message)
  return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def _state_figures(config: ml_collections.ConfigDict, state: Any, mesh: jax.sharding.Mesh,
                   sizes: dict[str, int]) -> dict[str, Any]:
  """What the sharded train state says: sizes, bytes (as stored), bytes per device.

  `sizes` (Split.sizes) counts parameters before quantization: a quantized
  kernel (config.model.frozen_dtype int8 / nf4) is as many parameters as
  before, in fewer bytes.
  """
  return {
      "params_total": sum(sizes.values()),
      "params_trainable": tree_size(state["params"]),
      "param_bytes": tree_bytes(state["params"]) + tree_bytes(state["frozen"]),
      "optimizer_state_bytes": tree_bytes(state["opt_state"]),
      "devices": int(mesh.devices.size),
      "mesh": dict(mesh.shape),
      "param_bytes_per_device": sharding.bytes_per_device([state["params"], state["frozen"]]),
      "optimizer_state_bytes_per_device": sharding.bytes_per_device(state["opt_state"]),
      "batch_size": config.train.batch_size,
      "max_length": config.data.max_length,
  }


def _on_tpu(config: ml_collections.ConfigDict, model: Model, topology: topology_lib.Topology,
            hlo: str, peak: int) -> dict[str, Any]:
  """The per-chip verdict, collectives and roofline estimate of a TPU compile."""
  found = collectives.summary(collectives.parse(hlo))
  model_flops = model.model_flops(config)
  est = roofline.estimate(model_flops=model_flops,
                          trainable_fraction=model.trainable_fraction(),
                          remat=config.model.remat,
                          collective_bytes=sum(c["bytes"] for c in found.values()),
                          topology=topology)
  usable = topology.hbm_usable_bytes
  return {
      "topology": topology.name,
      "num_slices": topology.num_slices,
      "chip": f"TPU {topology.chip.generation}",
      "hbm_bytes_per_device": topology.chip.hbm_bytes,
      "hbm_usable_bytes_per_device": usable,
      "headroom": topology_lib.HEADROOM,
      "fits": peak <= usable,
      "margin_bytes": usable - peak,
      "collectives": found,
      "model_flops_per_step": model_flops,
      "hardware_flops_per_step": est.hardware_flops,
      "estimated_step_seconds": est.step_seconds,
      "estimated_mfu": est.mfu,
      "estimate_bound_by": est.bound,
  }


def verdict(figures: dict[str, Any]) -> str:
  """One line: does the step fit in a chip's HBM, and by how much."""
  gib = lambda b: f"{b / topology_lib.GiB:.1f} GiB"
  peak, usable = figures["peak_memory_bytes"], figures["hbm_usable_bytes_per_device"]
  head = (f"{figures['topology']}: peak {gib(peak)} per chip of {gib(figures['hbm_bytes_per_device'])}"
          f" HBM ({gib(usable)} usable, {figures['headroom']:.0%} kept as headroom)")
  if figures["fits"]:
    return f"FITS  {head}; {gib(usable - peak)} to spare"
  refused = ("; the TPU compiler refused it: " + figures["compiler_error"]
             if figures.get("compiler_error") else "")
  return f"DOES NOT FIT  {head}; {gib(peak - usable)} over{refused}"


def inspect(config: ml_collections.ConfigDict, show_params: bool = False,
            topology: topology_lib.Topology | None = None) -> dict[str, Any]:
  """Prints the rules table (and with `show_params` every parameter); returns the figures.

  With `topology`, compiles for that TPU slice and prints the verdict too.
  """
  model = Model.of(config)
  split = model.split
  decay = config.optim.weight_decay
  if show_params:
    shapes = {p: tuple(v.get_value().shape)
              for p, v in param_paths.named_variables(split.params)
              + param_paths.named_variables(split.frozen)}
    # Under scan_layers a stacked param (`.../stacked/...`) has the rule of its layer 0.
    of = {p: split.assignment.of[stack.layer_path(p)] for p in shapes}
    print(rules.listing(dataclasses.replace(split.assignment, of=of),
                        dict(sorted(shapes.items())), decay))
    print()
  print(rules.table(split.assignment, split.sizes, decay))
  if topology:
    print(topology.describe())
  figures = measure(config, model, topology)
  if topology:
    print(collectives_table(figures["collectives"]))
    print(verdict(figures))
  return figures


def collectives_table(found: dict[str, dict[str, int]]) -> str:
  """The compiled step's collectives, one line per kind, per chip per step."""
  lines = ["collective            ops/step   bytes sent per chip"]
  for kind, c in found.items():
    lines.append(f"{kind:<20} {c['count']:>9}   {c['bytes'] / 1e9:>10.2f} GB")
  return "\n".join(lines)
