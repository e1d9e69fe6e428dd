"""Joining the processes of a multi-host run (JAX's distributed runtime), and losing one.

Every process runs the same command. On a multi-worker TPU VM slice and under
SLURM with more than one task, `jax.distributed.initialize()` finds the
coordinator by itself; elsewhere the three flags name it.

A lost process. When a process dies (a host fails, the OOM killer, kill -9),
the others would wait in their next collective forever (or, on CPU, fail in
it: gloo's "Connection reset by peer"). So every process publishes a
heartbeat counter in the coordinator's key-value store (a Python thread,
`_Watchdog`) and reads everyone's. A process whose counter has not moved for
`JAXFT_PEER_TIMEOUT` seconds (default 60; tests use a few) is lost: each
survivor prints one line naming it and the newest checkpoint, then exits with
code 75 (`LOST_PEER_EXIT`, EX_TEMPFAIL: rerunning every process with the same
command resumes from that checkpoint). Bound: `exit_bound`, the timeout plus
two heartbeat intervals of min(timeout / 6, 5 s) (70 s at the default), plus
at most 5 s to list a gs:// workdir; with more than two processes, process 0
(the coordinator: the others' store) waits up to one interval more, for the
others to have gone first.

An uncaught error in one process (its traceback printed) ends the others too,
within about two intervals, with code 1 and a line naming it, instead of
leaving them in a collective; it then skips JAX's shutdown, which would wait
for them.

Why not JAX's own heartbeat alone: it ends the survivor from C++ (LOG(FATAL):
SIGABRT, code 134, a stack trace), and its Python callback hook cannot be used
(jaxlib cannot pass the absl::Status to Python: std::bad_cast, then abort).
It stays as the backstop, with a timeout long enough never to fire first
(`jax_heartbeat_s`): for a process whose Python threads cannot run at all.
When process 0 itself dies, the coordinator goes with it and JAX ends every
survivor at once (under a second, its own message: "Failed to send RPC to
coordination service. Either the leader task ... died"), before this watchdog
could say anything.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import sys
import threading
import time
from typing import Any, Callable

import jax

from jaxft.errors import UserError

PEER_TIMEOUT_ENV = "JAXFT_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT_S = 60.0
# EX_TEMPFAIL (sysexits.h): a temporary failure; running the same command again can succeed.
LOST_PEER_EXIT = 75
_ALIVE = "jaxft/alive/"  # + process index: its heartbeat counter, then how it ended:
_DONE = "done"  # normally (its silence is no loss);
_FAILED = "failed"  # "failed CAUSE": with an error;
_LEFT = "left"  # "left CODE WHY": because of another process.
_LIST_TIMEOUT_S = 5.0  # Most the exit message may wait to name the newest checkpoint.


def _cluster_detected() -> bool:
  """A multi-process environment JAX can configure itself from."""
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
  tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return slurm or tpu_pod


def peer_timeout() -> float:
  """Seconds without a heartbeat after which a process counts as lost ($JAXFT_PEER_TIMEOUT).

  Raises:
    UserError: the variable is not a positive number.
  """
  raw = os.environ.get(PEER_TIMEOUT_ENV, "")
  try:
    value = float(raw) if raw else DEFAULT_PEER_TIMEOUT_S
  except ValueError:
    value = -1.0
  if not value > 0 or math.isinf(value):
    raise UserError(f"{PEER_TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
  return value


def beat_interval(timeout: float) -> float:
  """Seconds between heartbeats: several per timeout, so a late one or two is no loss."""
  return min(timeout / 6, 5.0)


def exit_bound(timeout: float) -> float:
  """Seconds from a peer's death to a survivor's exit, at most (local workdir).

  The survivor last sees the dead peer's counter move at most one interval
  after the death, and notices the timeout at most one interval late.
  """
  return timeout + 2 * beat_interval(timeout)


def jax_heartbeat_s(timeout: float) -> int:
  """JAX's own heartbeat timeout: the backstop, which must never beat the watchdog.

  JAX detects a dead task between half its timeout and its timeout after the
  death (heartbeats every half timeout; measured 6-10.5 s at 10 s), so twice
  the watchdog's bound, plus slack for a loaded machine, keeps it second.
  """
  return int(math.ceil(2 * exit_bound(timeout))) + 10


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, workdir: str | None = None) -> None:
  """Joins the run's other processes, if there are any; a no-op for one process.

  With several, also starts the lost-process watchdog (module docstring);
  `workdir` (train) lets its exit message name the checkpoint a rerun resumes from.

  Raises:
    UserError: only some of the three flags are given, they are out of range,
      or $JAXFT_PEER_TIMEOUT is not a positive number.
  """
  given = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise UserError("multi-process runs need all of --coordinator_address, "
                      "--num_processes and --process_id")
    if not 0 <= process_id < num_processes:
      raise UserError(f"--process_id={process_id} must be in [0, --num_processes="
                      f"{num_processes})")
    if num_processes > 1:
      timeout = peer_timeout()
      jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                 heartbeat_timeout_seconds=jax_heartbeat_s(timeout))
      _watch(timeout, workdir)
  elif _cluster_detected():
    timeout = peer_timeout()
    jax.distributed.initialize(heartbeat_timeout_seconds=jax_heartbeat_s(timeout))
    _watch(timeout, workdir)


def _watch(timeout: float, workdir: str | None) -> None:
  """Starts the watchdog on the client jax.distributed just connected."""
  # JAX has no public handle on its distributed client; without one (a future
  # JAX), its own heartbeat (jax_heartbeat_s) still ends the survivor.
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  state = getattr(jax_distributed, "global_state", None)
  client = getattr(state, "client", None)
  if client is None or state.num_processes < 2:
    return
  watchdog = _Watchdog(client, state.process_id, state.num_processes, timeout, workdir)
  watchdog.start()
  # atexit runs handlers last-registered first: this one before JAX's shutdown
  # (registered when jax was imported), while the client still works.
  atexit.register(watchdog.stop)
  sys.excepthook = _excepthook(watchdog, sys.excepthook)


def _excepthook(watchdog: "_Watchdog", previous: Callable[..., Any]) -> Callable[..., Any]:
  """sys.excepthook of a multi-process run: the traceback, then `_Watchdog.fail`.

  A collective whose peer died can fail instead of hanging (gloo on CPU:
  "Connection reset by peer"): the watchdog then names the lost peer. An error
  of this process's own ends its peers too, instead of leaving them in a
  collective; and it skips JAX's shutdown, which would wait for them.
  """

  def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    previous(kind, value, tb)
    if issubclass(kind, KeyboardInterrupt):  # Ctrl-C: meant, and sent to every process.
      return
    lines = str(value).strip().splitlines()
    watchdog.fail(f"{kind.__name__}: {lines[0] if lines else ''}"[:300].rstrip(":. "))

  return hook


@dataclasses.dataclass
class _Verdict:
  """Why a process must stop: what happened (a clause naming the process) and its exit code."""
  why: str
  code: int


class _Watchdog:
  """This process's heartbeat in the coordinator's key-value store, and its peers' watcher.

  Each process's key holds its heartbeat counter, then how it ended: "done"
  (normally), "failed CAUSE" (an error; it waits for a verdict, below) or
  "left CODE WHY" (it stopped because of another process). A peer is lost
  when two successful reads, more than `timeout` apart, show the same counter:
  measured between reads, a pause of this process itself (its thread starved)
  is never taken for a peer's death.
  """

  def __init__(self, client: Any, me: int, count: int, timeout: float,
               workdir: str | None = None):
    self._client, self.me, self.count, self.timeout = client, me, count, timeout
    self.workdir = workdir
    self._interval = beat_interval(timeout)
    self.cause: str | None = None  # The error ending this process, if one is.
    self._stopped = threading.Event()
    self._leaving = threading.Lock()
    self._thread = threading.Thread(target=self._run, name="jaxft-peer-watchdog", daemon=True)
    now = time.monotonic()
    # Each peer still watched: (last value seen, when it last changed); the start is a change.
    self._peers: dict[int, tuple[str | None, float]] = {
        p: (None, now) for p in range(count) if p != me}

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    """Ends the heartbeats and tells the peers this process ended normally."""
    self._stopped.set()
    self._thread.join(timeout=self._interval + 1)
    self._publish(_DONE)

  def fail(self, cause: str) -> None:
    """This process ends with an error: tells the peers, then ends once they know.

    Within `exit_bound`, a peer found lost meanwhile (perhaps the error's
    reason) is named and the exit code is 75; else the code is 1.
    """
    self.cause = cause
    self._publish(f"{_FAILED} {cause}")
    for stream in (sys.stdout, sys.stderr):  # os._exit ends the process: nothing flushes after.
      try:
        stream.flush()
      except (OSError, ValueError):
        pass
    deadline = time.monotonic() + exit_bound(self.timeout)
    while self._thread.is_alive() and self._peers and time.monotonic() < deadline:
      time.sleep(0.05)  # The thread ends the process on a verdict.
    self.leave(_Verdict(_failed(self.me, self.count, cause), 1), quiet=True)

  def leave(self, verdict: _Verdict, quiet: bool = False) -> None:
    """Says why (unless `quiet`), tells the peers, and ends this process with verdict.code."""
    with self._leaving:  # One exit; a second caller waits here for it.
      if not quiet:
        os.write(2, (_message(self, verdict) + "\n").encode())  # No lock another thread holds.
      self._publish(f"{_LEFT} {verdict.code} {verdict.why}")
      if self.me == 0:  # The coordinator's exit ends the key-value store: the others first.
        self._await_others(self._interval + 1)
      # The main thread may be blocked in a collective that never returns: only
      # os._exit ends the process (sys.exit here would end this thread alone).
      os._exit(verdict.code)  # pylint: disable=protected-access

  def _publish(self, value: str) -> None:
    try:
      self._client.key_value_set(f"{_ALIVE}{self.me}", value, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  # The coordinator is gone: nobody to tell.
      pass

  def _read(self) -> dict[str, str] | None:
    try:
      return dict(self._client.key_value_dir_get(_ALIVE))
    except Exception:  # pylint: disable=broad-except
      return None  # The coordinator is unreachable: JAX's own client ends this process.

  def _run(self) -> None:
    beat = 0
    while not self._stopped.is_set():
      beat += 1
      if not self._leaving.locked():  # Else "left ..." is there, and stays.
        self._publish(str(beat) if self.cause is None else f"{_FAILED} {self.cause}")
      seen = self._read()
      verdict = self._update(seen, time.monotonic()) if seen is not None else None
      if verdict is not None and not self._stopped.is_set():
        # A process that failed itself says nothing more, unless a peer was lost.
        self.leave(verdict, quiet=self.cause is not None and verdict.code != LOST_PEER_EXIT)
      if not self._peers:
        return  # Every peer ended normally.
      self._stopped.wait(self._interval)

  def _update(self, seen: dict[str, str], now: float) -> _Verdict | None:
    """Records one read of the store; returns why to stop, if a peer gives a reason."""
    frozen = []
    for peer, (value, since) in list(self._peers.items()):
      current = seen.get(f"{_ALIVE}{peer}")
      if current == _DONE:
        del self._peers[peer]
      elif current is not None and current.startswith(_FAILED + " "):
        return _Verdict(_failed(peer, self.count, current[len(_FAILED) + 1:]), 1)
      elif current is not None and current.startswith(_LEFT + " "):
        _, code, why = current.split(" ", 2)
        # Whose news it was, unless its own, or passed on already.
        relayed = why.startswith(f"process {peer} ") or "found by" in why
        return _Verdict(why if relayed else f"{why}, found by process {peer}", int(code))
      elif current != value:
        self._peers[peer] = (current, now)
      elif now - since > self.timeout:
        frozen.append(peer)
    if not frozen:
      return None
    who = (f"process {frozen[0]}" if len(frozen) == 1
           else "processes " + ", ".join(map(str, frozen)))
    coordinator = " (it ran the coordinator)" if 0 in frozen else ""
    for peer in frozen:
      del self._peers[peer]  # Nothing to wait for (`_await_others`).
    return _Verdict(f"{who} of {self.count} stopped responding (no heartbeat for "
                    f"{self.timeout:g} s){coordinator}", LOST_PEER_EXIT)

  def _await_others(self, seconds: float) -> None:
    """Waits up to `seconds` until every peer still watched has ended (done, or left)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
      seen = self._read() or {}
      values = [seen.get(f"{_ALIVE}{p}", "") for p in self._peers]
      if all(v == _DONE or v.startswith(_LEFT + " ") for v in values):
        return
      time.sleep(0.05)


def _failed(process: int, count: int, cause: str) -> str:
  return f"process {process} of {count} failed ({cause}; its log has the traceback)"


def _message(watchdog: _Watchdog, verdict: _Verdict) -> str:
  """The line a survivor prints: what happened, and how to go on."""
  me = watchdog.me
  if verdict.code != LOST_PEER_EXIT:
    return f"jaxft: error: {verdict.why}; process {me} stops too"
  after = f" (the error that followed here: {watchdog.cause})" if watchdog.cause else ""
  resume = _newest_checkpoint(watchdog.workdir) if watchdog.workdir else None
  where = (f"; training resumes from the newest checkpoint in {watchdog.workdir} (step {resume})"
           if resume is not None else "")
  return (f"jaxft: error: {verdict.why}; process {me} stops instead of waiting for it in a "
          f"collective{after}. Rerun all {watchdog.count} processes with the same command{where}")


def _newest_checkpoint(workdir: str) -> int | None:
  """The newest step folder under WORKDIR/checkpoints, or None (none, or listing took too long)."""
  found: list[int] = []

  def scan() -> None:
    from jaxft.runtime import storage  # pylint: disable=g-import-not-at-top
    try:
      names = storage.listdir(storage.join(storage.resolve(workdir), "checkpoints"))
    except UserError:
      return
    found.extend(int(n) for n in names if n.isdigit())  # Not Orbax's *.orbax-checkpoint-tmp-*.

  lister = threading.Thread(target=scan, daemon=True)
  lister.start()
  lister.join(_LIST_TIMEOUT_S)  # A gs:// workdir could be slow; the exit must not wait long.
  return max(found) if found else None
