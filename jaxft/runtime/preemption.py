"""SIGTERM / SIGINT end a run cleanly at any moment: start-up, compile, steps, eval.

Cloud schedulers (TPU maintenance, spot VMs, SLURM) send SIGTERM some seconds
before killing a job; a user presses Ctrl-C. Inside the training loop
(`StopRequest`) the signal only sets a flag: the loop finishes the step in
flight, saves, and raises `Interrupted`, so that rerunning the command
resumes; a second signal there stops at once. Anywhere else the handler
raises `Interrupted` at once.

Python runs a handler between bytecodes of the main thread, and an exception
raised while a finaliser or gc callback runs (JAX's `_xla_gc_callback`) is
printed as "Exception ignored" and dropped; an exception raised while a C
extension initialises (jaxlib, tensorstore) comes out as a bare ImportError
or worse, a crash. So in both places the handler only remembers the signal,
and `check()` (called where a run changes phase, and by the CLI after each
command) raises it: no signal is lost. `Interrupted` is a
KeyboardInterrupt, which `except Exception` does not catch.
"""

from __future__ import annotations

import gc
import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_pending: int | None = None  # The first stop signal received, until `reset`.
_deferring = 0  # How many StopRequest contexts are open.


class Interrupted(KeyboardInterrupt):
  """The run stopped on a signal; `str(e)` says what was saved and how to go on."""

  def __init__(self, signum: int, detail: str = ""):
    name = signal.Signals(signum).name
    super().__init__(f"stopped by {name}" + (f" {detail}" if detail else ""))
    self.signum = signum
    self.detail = detail


def _cannot_raise(frame: FrameType | None) -> bool:
  """Whether the stack runs a finaliser or an import: what is raised there is dropped or mangled.

  A gc callback's or __del__'s exception is printed and dropped; a module's
  import runs under importlib's frames, and a C extension initialising there
  (jaxlib, tensorstore) turns it into a bare ImportError, or crashes.
  """
  callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
  while frame is not None:
    code = frame.f_code
    if (code in callbacks or code.co_name == "__del__"
        or code.co_filename.startswith("<frozen importlib")):
      return True
    frame = frame.f_back
  return False


def _handle(signum: int, frame: FrameType | None) -> None:
  global _pending
  first = _pending is None
  _pending = signum
  if (_deferring and first) or _cannot_raise(frame):
    return  # The loop saves and stops after the step in flight; or `check` raises it.
  raise Interrupted(signum)


def install() -> dict:
  """Routes SIGTERM and SIGINT here (main thread only: Python's rule); returns the old handlers."""
  if threading.current_thread() is not threading.main_thread():
    return {}
  return {s: signal.signal(s, _handle) for s in SIGNALS}


def restore(handlers: dict) -> None:
  """Puts back handlers `install` returned."""
  for s, handler in handlers.items():
    signal.signal(s, handler)


def check(detail: str = "") -> None:
  """Raises Interrupted if a stop signal arrived (even one whose exception was dropped)."""
  if _pending is not None:
    raise Interrupted(_pending, detail)


def pending() -> int | None:
  """The stop signal received since `reset`, if any."""
  return _pending


def reset() -> None:
  """Forgets a received signal (a new command in the same process starts afresh)."""
  global _pending
  _pending = None


class StopRequest:
  """While open, a stop signal sets `signum` instead of raising; the loop polls it."""

  def __init__(self):
    self._previous = {}

  @property
  def signum(self) -> int | None:
    return _pending

  def __enter__(self) -> "StopRequest":
    global _deferring
    self._previous = install()  # The CLI's already; a library caller's back on exit.
    _deferring += 1
    return self

  def __exit__(self, *exc) -> None:
    global _deferring
    _deferring -= 1
    restore(self._previous)
