"""A dying host: one of two `jaxft train` processes killed mid-run (jaxft/runtime/distributed.py).

The survivor must exit with code 75 and a line naming the lost process (how
fast, against `distributed.exit_bound`, is bench/dying_host.py's figure), and rerunning both must end exactly where an
uninterrupted two-process run ends (here: repeat the killed run's steps
after the checkpoint exactly). bench/dying_host.py repeats the kill
(five tries, for bench/RESULTS.md); here it is one try, plus the watchdog's
rules on a fake key-value store.
"""

import time

import pytest

from bench import dying_host
from jaxft.errors import UserError
from jaxft.runtime import distributed

TIMEOUT_S = 4.0  # JAXFT_PEER_TIMEOUT: the exit bound is then 5.3 s.
STEPS = 10  # Checkpoints at 5 and 10; the kill lands at step 6-8, resumed from 5.


def test_a_killed_process_ends_the_other_named_and_the_rerun_repeats_its_steps_exactly(
    tiny_setup, tmp_path):
  workdir, port = tmp_path / "run", dying_host.free_port()
  pair = dying_host.start_pair(tiny_setup, workdir, port, STEPS, TIMEOUT_S)
  kill = dying_host.kill_mid_run(pair, after_step=6)
  assert kill.code == distributed.LOST_PEER_EXIT, pair.err(0)[-3000:]
  # How fast it exited is a figure of bench/dying_host.py (RESULTS.md), not a test: it
  # depends on the machine's load. The message says the watchdog, not gloo, ended it.
  assert kill.message.startswith("jaxft: error: process 1 of 2 stopped responding (no "
                                 "heartbeat for 4 s)"), kill.message
  assert kill.checkpoint is not None and kill.checkpoint < STEPS, kill  # Mid-run, saved.
  assert kill.message.endswith(f"Rerun all 2 processes with the same command; training "
                               f"resumes from the newest checkpoint in {workdir} "
                               f"(step {kill.checkpoint})")
  assert "Check failure stack trace" not in pair.err(0)  # JAX's own abort did not come first.

  # The same command again (same port). It resumes from the checkpoint and repeats the
  # steps the killed run had logged after it: those must come out the same, bit for bit.
  # (bench/dying_host.py also compares the end with an uninterrupted run's.)
  rerun = dying_host.start_pair(tiny_setup, workdir, port, STEPS, TIMEOUT_S, tag=".rerun")
  assert rerun.wait() == [0, 0], rerun.err(0)[-3000:]
  assert f"resuming {workdir} at step {kill.checkpoint}" in rerun.err(0)
  steps, losses = zip(*dying_host.train_losses(workdir))
  restart = steps.index(kill.checkpoint + 1, kill.checkpoint + 1)  # The rerun's first step.
  assert steps[:restart] == tuple(range(1, restart + 1)) and restart >= kill.at_step
  assert steps[restart:] == tuple(range(kill.checkpoint + 1, STEPS + 1))
  repeated = restart - kill.checkpoint  # Steps both runs took from the same checkpoint.
  assert repeated >= 1
  assert losses[kill.checkpoint:restart] == losses[restart:restart + repeated]


class _FakeClient:
  """The two key-value calls the watchdog makes, on a dict shared by "processes"."""

  def __init__(self, store: dict[str, str]):
    self.store = store

  def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
    self.store[key] = value

  def key_value_dir_get(self, prefix: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in self.store.items() if k.startswith(prefix)]


class _Recorded(distributed._Watchdog):
  """A watchdog whose exit is recorded, not taken."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.verdicts = []

  def leave(self, verdict, quiet=False):
    self.verdicts.append((verdict, quiet))
    self._stopped.set()


def _watchdogs(timeout: float, count: int = 2) -> list[_Recorded]:
  store = {}
  return [_Recorded(_FakeClient(store), me, count, timeout) for me in range(count)]


def _wait_for(condition, seconds: float = 60.0) -> None:
  """Waits until `condition()`; the bound is only there so a broken watchdog cannot hang."""
  deadline = time.monotonic() + seconds
  while not condition() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert condition()


def test_the_rules_name_a_silent_peer_and_neither_a_beating_nor_a_finished_one():
  """On explicit clock readings: nothing here depends on how fast threads run."""
  watcher = _watchdogs(timeout=4.0, count=3)[0]
  for now, beats in enumerate(("1", "2", "3", "4", "5", "6"), start=100):
    assert watcher._update({"jaxft/alive/1": beats, "jaxft/alive/2": beats}, now) is None
  assert watcher._update({"jaxft/alive/1": "done", "jaxft/alive/2": "7"}, 106.0) is None
  assert list(watcher._peers) == [2]  # A finished peer is no longer watched.
  assert watcher._update({"jaxft/alive/2": "7"}, 110.0) is None  # 4 s: not yet past.
  lost = watcher._update({"jaxft/alive/2": "7"}, 110.5)
  assert (lost.code, lost.why) == (distributed.LOST_PEER_EXIT,
                                   "process 2 of 3 stopped responding (no heartbeat for 4 s)")


def test_the_watchdog_threads_beat_end_with_their_peers_and_report_a_silent_one():
  """The threads over a shared store; waits only for events, with timeouts no load reaches."""
  dogs = _watchdogs(timeout=30.0)  # Beats every 5 s; a false verdict needs 30 s unscheduled.
  for dog in dogs:
    dog.start()
  store = dogs[0]._client.store
  _wait_for(lambda: all(store.get(f"jaxft/alive/{i}", "").isdigit()
                        for i in range(2)))
  assert dogs[0].verdicts == dogs[1].verdicts == []  # Both beat.
  dogs[1].stop()  # Ends normally: "done".
  _wait_for(lambda: not dogs[0]._thread.is_alive())
  assert dogs[0].verdicts == []  # Nobody left to watch: it ended without a verdict.

  dogs = _watchdogs(timeout=0.6)
  dogs[0].start()  # Process 1 never beats: lost.
  _wait_for(lambda: dogs[0].verdicts)
  [(verdict, quiet)] = dogs[0].verdicts
  assert (verdict.code, quiet) == (distributed.LOST_PEER_EXIT, False)
  assert verdict.why == "process 1 of 2 stopped responding (no heartbeat for 0.6 s)"


def test_a_pause_of_the_watching_process_itself_is_not_a_lost_peer():
  watcher = _watchdogs(timeout=1.0)[0]
  # A read, then none for 10 s (this process starved), then a read where the peer moved on.
  assert watcher._update({"jaxft/alive/1": "1"}, now=100.0) is None
  assert watcher._update({"jaxft/alive/1": "9"}, now=110.0) is None
  assert watcher._update({"jaxft/alive/1": "9"}, now=110.5) is None
  assert watcher._update({"jaxft/alive/1": "9"}, now=111.1).code == distributed.LOST_PEER_EXIT


def test_a_failed_peer_ends_the_others_with_code_1_and_a_leaving_one_passes_its_reason_on():
  watcher = _watchdogs(timeout=60.0, count=3)[2]
  failed = watcher._update({"jaxft/alive/0": "3", "jaxft/alive/1": "failed OSError: disk"}, 1.0)
  assert (failed.code, failed.why) == (
      1, "process 1 of 3 failed (OSError: disk; its log has the traceback)")
  left = watcher._update({"jaxft/alive/0": "left 75 process 1 of 3 stopped responding (no "
                                           "heartbeat for 60 s)"}, 2.0)
  assert (left.code, left.why) == (
      75, "process 1 of 3 stopped responding (no heartbeat for 60 s), found by process 0")
  assert distributed._message(watcher, left) == (
      "jaxft: error: process 1 of 3 stopped responding (no heartbeat for 60 s), found by "
      "process 0; process 2 stops instead of waiting for it in a collective. Rerun all 3 "
      "processes with the same command")
  relayed = watcher._update({"jaxft/alive/1": "left 1 process 1 of 3 failed (OSError: disk; "
                                              "its log has the traceback)"}, 3.0)
  assert relayed.why == failed.why  # Its own news: no "found by".
  assert distributed._message(watcher, failed) == (
      "jaxft: error: process 1 of 3 failed (OSError: disk; its log has the traceback); "
      "process 2 stops too")


def test_the_message_names_the_newest_checkpoint_and_the_error_that_followed(tmp_path):
  for name in ("5", "10.orbax-checkpoint-tmp-1764820000"):
    (tmp_path / "checkpoints" / name).mkdir(parents=True)
  watcher = _Recorded(_FakeClient({}), 0, 2, 4.0, workdir=str(tmp_path))
  watcher.cause = "JaxRuntimeError: UNKNOWN: Gloo all-reduce failed"
  watcher._update({"jaxft/alive/1": "7"}, now=100.0)
  lost = watcher._update({"jaxft/alive/1": "7"}, now=110.0)
  assert distributed._message(watcher, lost) == (
      "jaxft: error: process 1 of 2 stopped responding (no heartbeat for 4 s); process 0 "
      "stops instead of waiting for it in a collective (the error that followed here: "
      "JaxRuntimeError: UNKNOWN: Gloo all-reduce failed). Rerun all 2 processes with the same "
      f"command; training resumes from the newest checkpoint in {tmp_path} (step 5)")


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf"])
def test_a_bad_peer_timeout_is_a_user_error(monkeypatch, value):
  monkeypatch.setenv(distributed.PEER_TIMEOUT_ENV, value)
  with pytest.raises(UserError, match="JAXFT_PEER_TIMEOUT"):
    distributed.peer_timeout()


def test_the_bounds_keep_jax_s_own_heartbeat_second():
  for timeout in (1.0, 4.0, 60.0, 600.0):
    bound = distributed.exit_bound(timeout)
    assert bound <= timeout + 10
    # JAX notices a dead task half its timeout after the death at the earliest.
    assert distributed.jax_heartbeat_s(timeout) / 2 > bound
  assert distributed.exit_bound(distributed.DEFAULT_PEER_TIMEOUT_S) == 70.0
