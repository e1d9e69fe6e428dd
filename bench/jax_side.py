"""The jaxft side of a bench row: the train step exactly as `jaxft train` builds it.

`open_run` loads the checkpoint and resolves the rules (LoRA, freezing) into
the trainable / frozen split and the optimizer; `run.make_step_fn` is the jitted,
sharded, state-donating step of the training loop. The bench only swaps the
data pipeline for one fixed synthetic batch.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import ml_collections

from bench import rows as rows_lib
from jaxft import inspect
from jaxft import mfu
from jaxft import sharding
from jaxft import tasks
from jaxft import run as run_lib


@dataclasses.dataclass
class JaxSide:
  """A built jaxft step with its state and batch.

  Attributes:
    step_fn: run_lib.make_step_fn's jitted step (state donated).
    state: the current train state, threaded through the steps.
    batch: the fixed global batch.
    compile_s: seconds of `step_fn.lower(state, batch).compile()`.
    trainable: trainable parameter count.
    flops_per_step: analytic training FLOPs of one step (jaxft.mfu's count).
  """
  step_fn: Any
  state: Any
  batch: dict
  compile_s: float
  trainable: int
  flops_per_step: float

  def step(self) -> float:
    """One timed step, `state, metrics = step(state, batch)` as the loop runs it."""
    start = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, self.batch)
    # The whole output: the loss is ready before the optimizer update is.
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - start


def build(row: rows_lib.Row, config: ml_collections.ConfigDict, model_path: str,
          workdir: str) -> JaxSide:
  """Loads the model as `jaxft train` does and compiles its step (timed).

  `workdir` must be empty: open_run would resume a checkpoint found there.
  """
  task = tasks.of(config)
  labels = [f"label_{i}" for i in range(row.num_labels)] if task.has_labels else None
  run = run_lib.open_run(config, workdir, model_path, labels, quiet=True, task=task)
  run.checkpointer.close()  # The bench never saves.
  step_fn = run_lib.make_step_fn(config, run.split, run.tx, run.placement, task.objective)
  hf_config = run.hf_config
  shapes = task.abstract_batch(model_path)
  batch = rows_lib.synthetic_batch(list(shapes), shapes["input_ids"].shape, hf_config.vocab_size,
                                   row.num_labels)
  batch = sharding.global_batch(batch, run.placement.batch)
  start = time.perf_counter()
  step_fn.lower(run.state, batch).compile()
  compile_s = time.perf_counter() - start
  # The task's own count, so the bench's MFU is the one the training logs show.
  tokens = task.tokens_per_example(hf_config)
  flops = task.flops_per_token(run.split.sizes, hf_config) * tokens * config.train.batch_size
  return JaxSide(step_fn, run.state, batch, compile_s, inspect.tree_size(run.state["params"]),
                 flops)


def peak_flops() -> float:
  """Peak FLOP/s of one device: the datasheet on GPU / TPU, the measured matmul on CPU."""
  return mfu.peak_flops()


def peak_source() -> str:
  """Where peak_flops() comes from."""
  return "measured f32 matmul" if jax.devices()[0].platform == "cpu" else "datasheet bf16"


def device() -> str:
  """The default device, in words."""
  d = jax.devices()[0]
  return f"{d.platform} ({getattr(d, 'device_kind', '')})"


def peak_memory_mb() -> float | None:
  """Peak bytes the accelerator allocated (None on CPU, where RSS is the measure)."""
  d = jax.devices()[0]
  if d.platform == "cpu":
    return None
  stats = d.memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 2**20
