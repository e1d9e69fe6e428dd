"""Turn SIGTERM / SIGINT into a request to checkpoint and stop between steps.

Cloud schedulers (TPU maintenance, spot VMs, SLURM) send SIGTERM some seconds
before killing a job; a user presses Ctrl-C. Either way the loop finishes the
step in flight, saves, and exits so that rerunning the command resumes.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
  """Training stopped on a signal after saving a checkpoint."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; "
                     "checkpoint saved, rerun the same command to resume")
    self.signum = signum


class StopRequest:
  """A context manager whose `signum` is set once a stop signal arrives."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    self.signum = signum

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers.
      self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
