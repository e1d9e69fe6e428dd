"""Orbax checkpoints under DIR/checkpoints: train state plus a JSON of metadata.

Orbax writes each step to a temporary folder and renames it when complete, so
a crash or SIGKILL mid-save leaves the previous checkpoint intact; unfinished
temporaries are ignored on restore. DIR may be a gs:// URL (tensorstore
writes there directly). What goes into the state is the run's business
(`run.Run.save`: a LoRA run leaves its frozen base out).
"""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp

from jaxft.runtime import storage
from jaxft.errors import UserError


class Checkpointer:
  """Saves every `every` steps (and on demand), keeps the last `keep`."""

  def __init__(self, workdir: str, *, keep: int = 2, every: int = 0):
    self.directory = storage.join(storage.resolve(workdir), "checkpoints")
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an async save; arrays are copied off the device before it returns."""
    storage.makedirs(self.directory)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

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
