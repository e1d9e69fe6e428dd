"""Orbax checkpoints under DIR/checkpoints: train state plus a JSON of metadata.

Orbax writes each step to a temporary folder and renames it when complete, so
a crash or SIGKILL mid-save leaves the previous checkpoint intact; unfinished
temporaries are ignored on restore. DIR may be a gs:// URL (tensorstore
writes there directly). What goes into the state is the run's business
(`run.Run.save`: a LoRA run leaves its frozen base out).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxft.runtime import storage
from jaxft.errors import UserError


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
               best_mode: str = "max"):
    self.directory = storage.join(storage.resolve(workdir), "checkpoints")
    self.every = every
    self.best_metric = best_metric
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
               best_mode=best_mode(metric, c.get("best_mode", "auto")))

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
    # The caller checked that eval reports best_metric (train._Patience.update).
    metrics = ({self.best_metric: float(metrics[self.best_metric])}
               if metrics is not None and self.best_metric else None)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), metrics=metrics,
                       force=True)

  def meta(self, step: int) -> dict:
    """The JSON metadata saved with `step`, without reading any array."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # Orbax raises many types for unreadable files.
      raise UserError(f"cannot read checkpoint {step} in {self.directory}: {e}") from e

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` (default: latest) onto `abstract_state`'s structure."""
    step = self.latest_step() if step is None else step
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for unreadable or mismatched files.
      raise UserError(f"cannot restore checkpoint {step} in {self.directory}: {e}") from e
    return restored["state"], restored["meta"]

  def close(self) -> None:
    """Waits for a pending async save, then releases Orbax's threads."""
    self._manager.close()
