"""The training loop: `jaxft train`.

Steps a run from its current step to `train.num_steps`: batches built ahead
on a thread, one jitted step each, train metrics every `log_every` steps,
evals, checkpoints (and the best one), early stopping, a JAX trace on
request, and a clean stop (saved, exit 128 + N) on SIGTERM / SIGINT at any
moment. The math is in `steps.py` and the task's module; opening and
resuming a run is `run.py`. A step whose loss or gradient norm is not finite
(or a loss spike, `train.skip_spikes`) is skipped inside the step and counted
(`skipped_steps` in metrics.jsonl); `train.max_skipped_steps` in a row stop
the run, saved, with exit 2 (`_check_skipped`).

Rerunning a run: at `num_steps` (or stopped early) it is a no-op that prints
the recorded final eval; with a larger `num_steps` it trains on, and the
learning-rate schedule becomes the one the new `num_steps` gives from step 0
(logged with the rate at the resumed step); a checkpoint past `num_steps` is
an error. Each rerun's config changes are kept (`runtime/run_record.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxft import checkpoint
from jaxft import metrics as metrics_lib
from jaxft import mfu
from jaxft import run as run_lib
from jaxft import sharding
from jaxft import steps
from jaxft.runtime import storage
from jaxft.data import prefetch
from jaxft.errors import UserError
from jaxft.runtime import host_memory
from jaxft.runtime import preemption
from jaxft.runtime import dashboards
from jaxft.runtime import profiling
from jaxft.runtime import report
from jaxft.runtime import run_record
from jaxft.tasks import Data
from jaxft.tuning import optimizer

log = metrics_lib.log
# Seconds to sleep after each step: tests slow a tiny run down so that a signal
# sent at a chosen moment lands mid-training without burning CPU.
STEP_DELAY_ENV = "JAXFT_TEST_STEP_DELAY"
# Steps whose batch is poisoned, e.g. "3" or "3,4,5": tests make the loss and every
# gradient of those steps NaN through the data, as a bad batch would (`_poison`).
NAN_STEPS_ENV = "JAXFT_TEST_NAN_STEPS"


def train(config: ml_collections.ConfigDict, workdir: str,
          profile_steps: int = 0) -> dict[str, float]:
  """Trains (or resumes) to `train.num_steps`; returns the step and the final eval metrics.

  `profile_steps` > 0 writes a JAX trace of that many steps to DIR/profile.
  A run already at `num_steps` (or stopped early) is a no-op that returns its
  recorded final eval; a checkpoint past `num_steps` is a UserError. Metrics also go
  to DIR/tensorboard/ (config.log), and the loss and headline curves to DIR/plots/.
  """
  run = None
  try:
    dashboards.check(config)  # A missing wandb package fails now, not after loading.
    # Before anything starts JAX's backend: its threads must not have allocated yet.
    host_memory.apply(config.train.get("host_memory", "auto"))
    profiling.use_compilation_cache(config.train.get("compilation_cache", ""))
    model_path, task, data = run_lib.prepare(config, workdir, need_train=True)
    preemption.check()  # One the handler could not raise: stop before the slow part.
    storage.makedirs(workdir)
    storage.check_shared(workdir)
    run = run_lib.open_run(config, workdir, model_path, data.labels, task=task,
                           move_damaged=True)
    result = _finished(config, workdir, run, data, model_path)
    if result is None:
      task.before_run(run, data, model_path)
      _record_start(config, workdir, run, data)
      preemption.check()
      result = _loop(config, workdir, run, data, profile_steps)
  except preemption.Interrupted as e:
    if e.detail:
      raise
    at = f"before step {run.step + 1}" if run is not None else "before any step"
    raise preemption.Interrupted(e.signum, f"during start-up, {at}: nothing new to save; "
                                 "rerun the same command to go on") from None
  finally:
    metrics_lib.close_board(workdir)  # However the run ends, the event file is complete.
    if run is not None:
      run.checkpointer.close()  # Waits for a pending async save.
  # Last, once the run is saved: `jaxft report` redraws the curves on demand.
  written = report.write_plots(workdir, config) if metrics_lib.is_primary() else []
  if written:
    log(f"plots: {', '.join(written)}")
  return result


def _finished(config: ml_collections.ConfigDict, workdir: str, run: run_lib.Run,
              data: Data, model_path: str) -> dict[str, float] | None:
  """The result of a run with nothing left to train, else None; UserError past num_steps."""
  t = config.train
  if run.step > t.num_steps:
    raise UserError(
        f"the checkpoint in {workdir} is at step {run.step}, past config.train.num_steps="
        f"{t.num_steps}: a run cannot go back; set num_steps >= {run.step} to train on, "
        "export an earlier kept step (jaxft export --step=N), or use a new --workdir")
  patience = _Patience.of(config, run.meta)
  if run.step < t.num_steps and not patience.exhausted:
    return None
  why = (f"stopped early at step {run.step} ({patience})" if run.step < t.num_steps
         else f"is at config.train.num_steps={t.num_steps}")
  fix = ("raise config.train.early_stop_patience (or set it to 0)" if patience.exhausted
         else "raise config.train.num_steps")
  log(f"nothing to train: {workdir} {why}; {fix} to train on")
  result = metrics_lib.recorded_eval(workdir, run.step)
  if result is None and data.eval is not None:  # Killed between the last save and its eval.
    run.task.before_run(run, data, model_path)
    writer = metrics_lib.JsonlWriter(workdir, config)  # First: the eval's figures log to it.
    result = run.task.evaluate(run, data, workdir)
    writer.write(run.step, "eval", result)
  return {"step": run.step, **(result or {})}


def _record_start(config: ml_collections.ConfigDict, workdir: str, run: run_lib.Run,
                  data: Data) -> None:
  """Writes config.json (never over an earlier one), labels.json and the resume record."""
  was, changed = None, {}
  if metrics_lib.is_primary():
    # Other processes may read these meanwhile: storage writes are never half-done.
    was, changed = run_record.record_start(workdir, config, run.step)
    if data.labels is not None:
      storage.write_text(run_lib.labels_file(workdir), json.dumps(data.labels))
  log(f"{run.task.describe(data)}; step {run.step} -> {config.train.num_steps}")
  if was is None:
    return
  log(f"resuming {workdir} at step {run.step}" + ("; config changes: " + ", ".join(
      f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) if changed else ""))
  old, new = (optimizer.schedule(optimizer.Schedule.of(c)) for c in (was, config))
  if float(old(run.step)) != float(new(run.step)):
    # The schedule is a function of num_steps (and optim.*): a longer run decays over
    # the new total from step 0, so the rate at the resumed step changes.
    log(f"learning-rate schedule recomputed for {config.train.num_steps} steps: lr at step "
        f"{run.step + 1} is {float(new(run.step)):.3g} (the old schedule gave "
        f"{float(old(run.step)):.3g})")


class _Patience:
  """The best eval value of the tracked metric so far and the evals since (early stopping).

  The metric is config.checkpoint.best_metric, else the eval loss; the state
  travels in each checkpoint's metadata, so a resumed run counts on exactly.
  """

  def __init__(self, metric: str, mode: str, limit: int, state: dict):
    self.metric, self.mode, self.limit = metric, mode, limit
    self.best = state.get("value")
    self.best_step = state.get("step")
    self.evals_since = state.get("evals_since", 0) if state.get("metric") == metric else 0
    if state.get("metric") != metric:
      self.best = self.best_step = None

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, meta: dict) -> "_Patience":
    metric = config.checkpoint.get("best_metric", "") or "loss"
    mode = checkpoint.best_mode(metric, config.checkpoint.get("best_mode", "auto"))
    return cls(metric, mode, config.train.get("early_stop_patience", 0), meta.get("best", {}))

  @property
  def exhausted(self) -> bool:
    return self.limit > 0 and self.evals_since >= self.limit

  def update(self, step: int, result: dict[str, float], required: bool) -> None:
    """Counts one eval; `required`: a missing metric is a UserError, not skipped."""
    if self.metric not in result:
      if not required:
        return
      raise UserError(f"config.checkpoint.best_metric={self.metric!r} is not an eval metric; "
                      f"eval reports {sorted(result)}")
    value = float(result[self.metric])
    better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
    if better:
      self.best, self.best_step, self.evals_since = value, step, 0
    else:
      self.evals_since += 1

  def meta(self) -> dict:
    return {"best": {"metric": self.metric, "value": self.best, "step": self.best_step,
                     "evals_since": self.evals_since}}

  def __str__(self) -> str:
    return (f"best {self.metric} {self.best:.4f} at step {self.best_step}, "
            f"then {self.evals_since} evals without improvement")


def _loop(config: ml_collections.ConfigDict, workdir: str, run: run_lib.Run, data: Data,
          profile_steps: int = 0) -> dict[str, float]:
  t = config.train
  nan_steps = {int(s) for s in os.environ.get(NAN_STEPS_ENV, "").split(",") if s.strip()}
  objective = _poison(run.task.objective) if nan_steps else run.task.objective
  step_fn = run_lib.make_step_fn(config, run.split, run.tx, run.placement, objective)
  source = run.task.train_batches(run, data)
  if nan_steps:
    source = _with_nan_column(source, nan_steps)
  writer = metrics_lib.JsonlWriter(workdir, config)
  lr = optimizer.schedule(optimizer.Schedule.of(config))
  group_lrs = _group_schedules(config, run) if writer.board is not None else {}
  progress = metrics_lib.Progress(run.step, t.num_steps, t.batch_size, t.log_every)
  trace = profiling.StepTrace(workdir, run.step, profile_steps)
  tokens = run.task.tokens_per_example(run.hf_config)
  flops_per_example = tokens * run.task.flops_per_token(run.split.sizes, run.hf_config)
  peak = _total_peak() if t.log_every else 0.0  # Measured on CPU: only when it is logged.
  patience = _Patience.of(config, run.meta)
  best_metric = config.checkpoint.get("best_metric", "")
  result: dict[str, float] = {}
  delay = float(os.environ.get(STEP_DELAY_ENV) or 0)
  skipped = 0  # Steps skipped so far, as last read from the device.

  make_batch = lambda step: sharding.global_batch(source(step), run.placement.batch)
  ahead = 0 if run.task.online else t.get("prefetch", 0)
  with preemption.StopRequest() as stop, prefetch.Prefetch(
      make_batch, run.step + 1, t.num_steps, ahead) as upcoming:
    for step in range(run.step + 1, t.num_steps + 1):
      batch = upcoming.get(step)
      # Between log steps nothing waits for the device: dispatch runs ahead of it.
      with jax.transfer_guard_device_to_host("disallow"):
        trace.before(step)
        run.state, m = step_fn(run.state, batch)
        trace.after(step, run.state)
      if delay:
        time.sleep(delay)
      loss = None
      if t.log_every and step % t.log_every == 0:
        m = {k: v.item() for k, v in jax.device_get(m).items()}  # skipped_steps stays an int.
        rate = progress.examples_per_sec(step)
        # Row tokens, padding included: a packed LM batch is nearly all real tokens.
        writer.write(step, "train", {**m, "lr": float(lr(step - 1)), "examples_per_sec": rate,
                                     "tokens_per_sec": rate * tokens,
                                     "mfu": rate * flops_per_example / peak})
        if group_lrs:  # Dashboards only: metrics.jsonl keeps one lr per line.
          writer.write_board(step, "train", {"lr": {k: float(f(step - 1))
                                                    for k, f in group_lrs.items()}})
        loss = m["loss"]
      progress.update(step, loss)
      last, stopping = step == t.num_steps, stop.signum is not None
      save = last or stopping or run.checkpointer.should_save(step)
      # A stop request skips the eval (a rerun at num_steps evaluates).
      evaluate = data.eval is not None and not stopping and (
          last or (t.eval_every and step % t.eval_every == 0))
      if save or evaluate or loss is not None:  # Where the loop waits for the device anyway.
        skipped = _check_skipped(run, step, t.get("max_skipped_steps", 10), skipped,
                                 patience.meta(), progress)
      # The best checkpoint and early stopping keep eval results with the checkpoint, so
      # those evaluate first; otherwise the save comes first, and a kill mid-eval loses
      # no training.
      ranked = bool(best_metric or patience.limit)
      first = ranked or run.task.evaluates_before_save
      if save and not (evaluate and first):
        run.save(step, meta=patience.meta())
      if evaluate:
        result = run.task.evaluate(run, data, workdir)
        writer.write(step, "eval", result)
        patience.update(step, result, required=ranked)
        if (ranked and (best_metric or patience.exhausted)) or (save and first):
          meta = {**patience.meta(), **run.task.checkpoint_meta(step, result)}
          run.save(step, metrics=result, meta=meta)
      if stop.signum is not None:
        progress.close()
        raise preemption.Interrupted(stop.signum, f"at step {step}; checkpoint saved, rerun the "
                                     "same command to resume")
      if patience.exhausted:
        log(f"early stop at step {step}: {patience}")
        break
  progress.close()
  trace.stop(run.state)  # A run shorter than the trace still gets one.
  if result:
    log(f"held-out eval at step {run.step}: {metrics_lib.summary(result)}")
  return {"step": run.step, **result}


def _check_skipped(run: run_lib.Run, step: int, limit: int, seen: int, meta: dict,
                   progress: metrics_lib.Progress) -> int:
  """The steps skipped so far (logged when more than `seen`); after `limit` in a row, saves
  and stops with a UserError (exit 2) that names them.

  Reading the counters waits for the device, so the loop calls this only where it
  waits anyway (log, eval and save steps), never every step: the stop may come a
  few steps after the streak, which the step latched where it happened
  (steps.init_skip's limit_step), so the message still names its exact steps. Every
  save is preceded by this check, so no checkpoint holds a latch unreported; the
  stop's own clears it, and a rerun goes on from there with `limit` fresh tries.
  """
  skip = jax.device_get(run.state["skip"])
  total, end = int(skip["total"]), int(skip["limit_step"])
  if total > seen:
    log(f"step {step}: {total} steps skipped so far (their updates not applied), "
        f"{int(skip['in_row'])} in a row now")
  if not end:
    return total
  loss, norm = float(skip["limit_loss"]), float(skip["limit_grad_norm"])
  why = (f"loss {loss:.4g}, gradient norm {norm:.4g}: not finite" if not np.isfinite(loss + norm)
         else f"loss {loss:.4g} above config.train.skip_spikes x its running median")
  run.state = steps.clear_limit(run.state)
  run.save(step, meta=meta)
  progress.close()
  raise UserError(
      f"{limit} steps in a row were skipped (steps {end - limit + 1}..{end}; at step {end} "
      f"{why}); checkpoint saved at step {step}, with the weights of the last applied step; "
      "lower config.optim.lr (or raise optim.warmup_steps), check the data of those steps, "
      "or raise config.train.max_skipped_steps (0: never stop); rerun the same command to "
      "go on from the checkpoint")


def _poison(objective: steps.Objective) -> steps.Objective:
  """Test-only (NAN_STEPS_ENV): `objective` with its summed loss times 1 + the sum of the
  batch's `_nan` column (0 on a clean batch: the loss is exactly the same)."""
  def loss_sums(outputs, batch):
    total, sums = objective.loss_sums(outputs, batch)
    return total * (1 + jnp.sum(batch["_nan"])), sums
  return dataclasses.replace(objective, loss_sums=loss_sums)


def _with_nan_column(source, nan_steps: set[int]):
  """Test-only (NAN_STEPS_ENV): `source` whose batches have a `_nan` column, NaN in the
  first row at `nan_steps` and 0 elsewhere (every batch has it: one compiled step)."""
  def batch(step: int) -> dict:
    rows = source(step)
    column = np.zeros(next(iter(rows.values())).shape[0], np.float32)
    column[0] = np.nan if step in nan_steps else 0.0
    return {**rows, "_nan": column}
  return batch


def _group_schedules(config: ml_collections.ConfigDict, run: run_lib.Run
                     ) -> dict[str, optax.Schedule]:
  """{"origin pattern": schedule} of each trainable rule group whose rate is not the run's
  own (an lr_mult, its own schedule, warmup or start step): `train/lr/...` on the dashboards."""
  assignment = run.split.assignment
  spec = optimizer.Schedule.of(config)
  used = set(assignment.of.values())
  plain = lambda r: (r.lr_mult, r.schedule, r.warmup_steps, r.start_step) == (1.0, None, None, 0)
  return {f"{r.origin} {r.pattern}": optimizer.schedule(spec, r)
          for i, r in enumerate(assignment.rules) if i in used and r.trainable and not plain(r)}


def _total_peak() -> float:
  """Peak FLOP/s of all devices; CPU "devices" share one host, measured once."""
  if jax.devices()[0].platform == "cpu":
    return mfu.peak_flops() * jax.process_count()
  return mfu.peak_flops() * jax.device_count()


