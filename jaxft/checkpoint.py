"""Orbax checkpoints under DIR/checkpoints: train state plus a JSON of metadata.

Orbax writes each step to a temporary folder and renames it when complete, so
a crash or SIGKILL mid-save leaves the previous checkpoint intact; unfinished
temporaries are ignored on restore. Once a save has finished, process 0 seals
it with a checksum manifest (`runtime/integrity.py`), so a checkpoint damaged
later (truncated, a file missing, bytes flipped) is named in one line before
any array is read; a training run then resumes from the newest intact one
(config.checkpoint.on_corrupt). A failed save (a full disk, any write error)
ends the run with a clear message and never costs an earlier checkpoint:
Orbax prunes old steps only after a save completes. DIR may be a gs:// URL
(tensorstore writes there directly). What goes into the state is the run's
business (`run.Run.save`: a LoRA run leaves its frozen base out).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxft.errors import UserError
from jaxft.runtime import integrity
from jaxft.runtime import storage

CORRUPT_DIR = "checkpoints_corrupt"  # Beside checkpoints/: where a training run moves damaged ones.
# TensorStore's I/O errors end '"FILE": Failed to write N bytes ...: REASON [os_error_code=...'.
_OS_ERROR = re.compile(r'"([^"]+)": Failed to [^:"]*: ([^\[\n]+?) \[os_error_code')


class _QuietOrbaxErrors(logging.Filter):
  """Drops Orbax's own ERROR logs (a page of traceback per failed write and thread):
  the failure reaches the user once, as the UserError `save` or `close` raises."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


logging.getLogger("absl").addFilter(_QuietOrbaxErrors())


def best_mode(metric: str, mode: str) -> str:
  """config.checkpoint.best_mode resolved: "auto" minimises losses and errors, maximises the rest."""
  if mode != "auto":
    return mode
  return "min" if any(w in metric for w in ("loss", "perplexity", "error")) else "max"


class Checkpointer:
  """Saves every `every` steps (and on demand), keeps the last `keep`.

  With `best_metric` (an eval metric saved with a checkpoint, `save(metrics=)`),
  also keeps the checkpoint where it was best (`best_mode` max or min) beside
  the last `keep`: Orbax's preservation policies, LatestN or BestN.
  """

  def __init__(self, workdir: str, *, keep: int = 2, every: int = 0, best_metric: str = "",
               best_mode: str = "max", on_corrupt: str = "fallback"):
    self.directory = storage.join(storage.resolve(workdir), "checkpoints")
    self.every = every
    self.best_metric = best_metric
    self.on_corrupt = on_corrupt
    self._unsealed: list[int] = []  # Steps this process saved, sealed once finished.
    self._sealer: threading.Thread | None = None
    if best_metric:
      value = lambda metrics: float(metrics[best_metric])
      policy = pp.AnyPreservationPolicy([pp.LatestN(n=keep), pp.BestN(
          get_metric_fn=value, reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False)])
      options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=value,
                                             best_mode=best_mode, create=False)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  @classmethod
  def of(cls, workdir: str, config: ml_collections.ConfigDict) -> "Checkpointer":
    """The checkpointer config.checkpoint describes."""
    c = config.checkpoint
    metric = c.get("best_metric", "")
    return cls(workdir, keep=c.keep, every=c.every, best_metric=metric,
               best_mode=best_mode(metric, c.get("best_mode", "auto")),
               on_corrupt=c.get("on_corrupt", "fallback"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps kept, oldest first."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step whose `best_metric` is best; None without a best_metric or any eval."""
    if not self.best_metric:
      return None
    return self._manager.best_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: Any, meta: dict,
           metrics: dict[str, float] | None = None) -> None:
    """Starts an async save; arrays are copied off the device before it returns.

    `metrics` (eval results at `step`) rank it for `best_step`.
    """
    storage.makedirs(self.directory)
    self._finish()  # Orbax would wait for the previous save here anyway.
    # The caller checked that eval reports best_metric (train._Patience.update).
    metrics = ({self.best_metric: float(metrics[self.best_metric])}
               if metrics is not None and self.best_metric else None)
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), metrics=metrics,
                         force=True)
    except Exception as e:  # A write error (a full disk) can surface here or when it finishes.
      raise self._save_failed(step, e) from e
    self._unsealed.append(step)

  def _finish(self) -> None:
    """Waits for a pending save, then seals what this process saved and has finished."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(self._unsealed[-1] if self._unsealed else None, e) from e
    pending, self._unsealed = self._unsealed, []
    self._join_sealer()
    if jax.process_index() != 0 or not pending:
      return
    # Hashing reads the whole checkpoint: on a thread, so training goes on meanwhile. A kill
    # before it ends leaves the checkpoint unsealed, which reads as before sealing existed.
    folders = [self.step_dir(s) for s in sorted(set(pending) & set(self._manager.all_steps()))]
    self._sealer = threading.Thread(target=_seal_all, args=(folders,), name="jaxft-seal",
                                    daemon=True)
    self._sealer.start()

  def _join_sealer(self) -> None:
    if self._sealer is not None:
      self._sealer.join()
      self._sealer = None

  def _save_failed(self, step: int | None, e: Exception) -> UserError:
    # From the disk: Orbax's own list may already count the failed step.
    kept = sorted(int(n) for n in storage.listdir(self.directory) if n.isdigit() and
                  int(n) != step)
    return UserError(
        f"saving checkpoint {step} in {self.directory} failed: {_first_line(e)}; "
        + (f"the checkpoints at steps {', '.join(map(str, kept))} are intact: free space "
           "(or fix the error) and rerun the same command to resume" if kept else
           "no earlier checkpoint: fix the error and rerun"))

  def step_dir(self, step: int) -> str:
    return storage.join(self.directory, str(step))

  def damage(self, step: int) -> str | None:
    """Why checkpoint `step` is unreadable ("FILE: why"), or None when it reads.

    Checks the checksum manifest of a sealed checkpoint and the metadata JSON;
    an unsealed one (saved before sealing existed, or killed in between) shows
    its damage only when restored.
    """
    why = integrity.damage(self.step_dir(step))
    if why is not None:
      return why
    try:
      self.meta(step)
    except UserError as e:
      return str(e)
    return None

  def newest_intact(self, *, move_aside: bool = False) -> tuple[int | None, list[str]]:
    """(the newest kept step that reads, one line per damaged newer step).

    With on_corrupt="fallback" a damaged checkpoint is skipped, and with
    `move_aside` (a training run, which will save those steps again) moved to
    DIR/checkpoints_corrupt/; nothing is deleted. None when there is no
    checkpoint at all.

    Raises:
      UserError: a damaged checkpoint with on_corrupt="error", or no intact one left.
    """
    skipped = []
    candidates = list(reversed(self.all_steps()))
    for step in candidates:
      why = self.damage(step)
      if why is None:
        return step, skipped
      line = f"checkpoint {step} in {self.directory} is unreadable: {why}"
      older = [s for s in candidates if s < step]
      if self.on_corrupt == "error":
        raise UserError(line + (f"; config.checkpoint.on_corrupt=fallback resumes from an "
                                f"older one (steps {', '.join(map(str, older))})"
                                if older else ""))
      # Process 0 moves (a shared folder); Cloud Storage has no folder to rename.
      if move_aside and jax.process_index() == 0 and not storage.is_remote(self.directory):
        line += f"; moved to {self._move_aside(step)}"
      skipped.append(line)
    if skipped:
      raise UserError("no intact checkpoint left: " + "; ".join(skipped))
    return None, skipped

  def _move_aside(self, step: int) -> str:
    """Moves a damaged step out of Orbax's sight (kept for a post-mortem); returns where."""
    target = storage.join(os.path.dirname(self.directory), CORRUPT_DIR, str(step))
    n = 1
    while storage.exists(target):
      target, n = storage.join(os.path.dirname(self.directory), CORRUPT_DIR, f"{step}.{n}"), n + 1
    storage.makedirs(os.path.dirname(target))
    os.replace(self.step_dir(step), target)
    self._manager.reload()
    return target

  def meta(self, step: int) -> dict:
    """The JSON metadata saved with `step`, without reading any array."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # Orbax raises many types for unreadable files.
      raise UserError(f"cannot read checkpoint {step} in {self.directory}: "
                      f"{_first_line(e)}") from e

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` (default: latest) onto `abstract_state`'s structure."""
    step = self.latest_step() if step is None else step
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for unreadable or mismatched files.
      raise UserError(f"cannot restore checkpoint {step} in {self.directory}: "
                      f"{_first_line(e)}") from e
    return restored["state"], restored["meta"]

  def close(self) -> None:
    """Waits for a pending async save (sealing it), then releases Orbax's threads."""
    try:
      self._finish()
    finally:
      self._join_sealer()
      self._manager.close()


def _seal_all(folders: list[str]) -> None:
  for folder in folders:
    # Keep-last-K pruning may delete an older step meanwhile: nothing left to seal then.
    with contextlib.suppress(OSError):
      integrity.seal(folder)


def _first_line(e: Exception) -> str:
  """An exception in a line: TensorStore errors append a page-long spec, and an I/O
  error's reason comes last in a long line: "REASON writing FILE" then."""
  io_error = _OS_ERROR.search(str(e))
  if io_error:
    return f"{io_error.group(2).strip()} writing {io_error.group(1)}"
  text = str(e).strip().splitlines()
  line = text[0] if text else type(e).__name__
  return line if len(line) <= 300 else line[:300] + "..."
