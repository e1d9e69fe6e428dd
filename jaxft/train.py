"""The training loop: `jaxft train`.

Steps a run from its current step to `train.num_steps`: batches built ahead
on a thread, one jitted step each, train metrics every `log_every` steps,
evals, checkpoints, a JAX trace on request, and a clean stop (saved, exit
128 + N) on SIGTERM / SIGINT. The math is in `steps.py` and the task's
module; opening and resuming a run is `run.py`.
"""

from __future__ import annotations

import json

import jax
import ml_collections

from jaxft import config as config_lib
from jaxft import metrics as metrics_lib
from jaxft import mfu
from jaxft import run as run_lib
from jaxft import sharding
from jaxft.runtime import storage
from jaxft.data import batches as batches_lib
from jaxft.data import prefetch
from jaxft.runtime import host_memory
from jaxft.runtime import preemption
from jaxft.runtime import profiling
from jaxft.tasks import Data
from jaxft.tuning import optimizer

log = metrics_lib.log


def train(config: ml_collections.ConfigDict, workdir: str,
          profile_steps: int = 0) -> dict[str, float] | None:
  """Trains (or resumes) to `train.num_steps`; returns the final eval metrics if any.

  `profile_steps` > 0 writes a JAX trace of that many steps to DIR/profile.
  """
  # Before anything starts JAX's backend: its threads must not have allocated yet.
  host_memory.apply(config.train.get("host_memory", "auto"))
  profiling.use_compilation_cache(config.train.get("compilation_cache", ""))
  model_path, task, data = run_lib.prepare(config, workdir, need_train=True)
  storage.makedirs(workdir)
  storage.check_shared(workdir)
  run = run_lib.open_run(config, workdir, model_path, data.labels, task=task)
  if metrics_lib.is_primary():
    # Other processes may read these meanwhile: storage writes are never half-done.
    storage.write_text(run_lib.config_file(workdir), config_lib.to_json(config))
    if data.labels is not None:
      storage.write_text(run_lib.labels_file(workdir), json.dumps(data.labels))
  log(f"{task.describe(data)}; step {run.step} -> {config.train.num_steps}")
  try:
    return _loop(config, workdir, run, data, profile_steps)
  finally:
    run.checkpointer.close()  # Waits for a pending async save.


def _loop(config: ml_collections.ConfigDict, workdir: str, run: run_lib.Run, data: Data,
          profile_steps: int = 0) -> dict[str, float] | None:
  t = config.train
  step_fn = run_lib.make_step_fn(config, run.split, run.tx, run.placement, run.task.objective)
  batches = batches_lib.TrainBatches(data.train, t.batch_size, t.seed)
  writer = metrics_lib.JsonlWriter(workdir)
  lr = optimizer.schedule(optimizer.Schedule.of(config))
  progress = metrics_lib.Progress(run.step, t.num_steps, t.batch_size, t.log_every)
  trace = profiling.StepTrace(workdir, run.step, profile_steps)
  tokens = run.task.tokens_per_example(run.hf_config)
  flops_per_example = tokens * run.task.flops_per_token(run.split.sizes, run.hf_config)
  peak = _total_peak() if t.log_every else 0.0  # Measured on CPU: only when it is logged.

  def run_eval() -> dict[str, float]:
    result = run.task.evaluate(run, data, workdir)
    writer.write(run.step, "eval", result)
    return result

  make_batch = lambda step: sharding.global_batch(batches.lazy(step - 1), run.placement.batch)
  with preemption.StopRequest() as stop, prefetch.Prefetch(
      make_batch, run.step + 1, t.num_steps, t.get("prefetch", 0)) as upcoming:
    for step in range(run.step + 1, t.num_steps + 1):
      batch = upcoming.get(step)
      # Between log steps nothing waits for the device: dispatch runs ahead of it.
      with jax.transfer_guard_device_to_host("disallow"):
        trace.before(step)
        run.state, m = step_fn(run.state, batch)
        trace.after(step, run.state)
      loss = None
      if t.log_every and step % t.log_every == 0:
        m = {k: float(v) for k, v in m.items()}
        rate = progress.examples_per_sec(step)
        # Row tokens, padding included: a packed LM batch is nearly all real tokens.
        writer.write(step, "train", {**m, "lr": float(lr(step - 1)), "examples_per_sec": rate,
                                     "tokens_per_sec": rate * tokens,
                                     "mfu": rate * flops_per_example / peak})
        loss = m["loss"]
      progress.update(step, loss)
      if step == t.num_steps:
        break
      if data.eval is not None and t.eval_every and step % t.eval_every == 0:
        run_eval()
      if run.checkpointer.should_save(step) or stop.signum is not None:
        run.save(step)
      if stop.signum is not None:
        progress.close()
        raise preemption.Interrupted(stop.signum, step)
  progress.close()
  trace.stop(run.state)  # A run shorter than the trace still gets one.
  if run.checkpointer.latest_step() != run.step:
    run.save(run.step)
  if data.eval is None:
    return None
  result = run_eval()
  log(f"held-out eval at step {run.step}: " + ", ".join(
      f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, (int, float))))
  return result


def _total_peak() -> float:
  """Peak FLOP/s of all devices; CPU "devices" share one host, measured once."""
  if jax.devices()[0].platform == "cpu":
    return mfu.peak_flops() * jax.process_count()
  return mfu.peak_flops() * jax.device_count()


