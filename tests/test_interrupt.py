"""Ctrl-C (SIGINT) at any moment of `jaxft train` ends it with 130 and a clean message."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxft import train
from tests.helpers import ROOT, tiny_flags

DELAYS = (1, 3, 6, 10)  # Seconds after start: imports, loading, compiling, training.


def test_sigint_at_1_3_6_and_10_s_exits_130_cleanly_and_a_rerun_finishes(tiny_setup, tmp_path):
  def start(workdir, env=None):
    args = [sys.executable, "-m", "jaxft.cli", "train",
            *tiny_flags(tiny_setup, workdir, "--config.train.num_steps=300",
                        "--config.checkpoint.every=20", "--config.train.log_every=0")]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})

  # Slowed to ~15 s of steps (sleeping, not computing) so that 10 s still lands mid-run.
  procs = {d: (start(tmp_path / str(d), {train.STEP_DELAY_ENV: "0.05"}), time.monotonic())
           for d in DELAYS}
  for d, (proc, t0) in procs.items():
    time.sleep(max(0.0, t0 + d - time.monotonic()))
    proc.send_signal(signal.SIGINT)
  for d, (proc, _) in procs.items():
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (d, err[-2000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("jaxft: stopped by SIGINT"), (d, last)
    assert "Traceback" not in err and "Exception ignored" not in err, (d, err[-2000:])
    assert not out.strip(), d  # No result line: the run did not finish.
  reruns = {d: start(tmp_path / str(d)) for d in DELAYS}
  for d, proc in reruns.items():
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (d, err[-2000:])
    assert json.loads(out.strip().splitlines()[-1])["step"] == 300


def test_a_sigint_that_an_import_turns_into_another_error_still_exits_130(monkeypatch, capsys):
  """A Ctrl-C inside a C extension's import surfaces as "ImportError: initialization
  failed" (tensorstore, seen under load): still a clean SIGINT exit, no traceback."""
  from jaxft import cli  # pylint: disable=g-import-not-at-top
  from jaxft.runtime import preemption  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(preemption, "_pending", None)  # Put back after: later tests see none.

  def interrupted_import(argv):
    del argv
    try:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)  # The handler raises in this frame first.
    except KeyboardInterrupt as e:
      raise ImportError("initialization failed") from e

  monkeypatch.setattr(cli, "run", interrupted_import)
  with pytest.raises(SystemExit) as e:
    cli.main()
  assert e.value.code == 130
  assert capsys.readouterr().err.strip() == "jaxft: stopped by SIGINT"


def test_an_error_without_a_signal_is_not_called_an_interrupt(monkeypatch):
  from jaxft import cli  # pylint: disable=g-import-not-at-top
  from jaxft.runtime import preemption  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(preemption, "_pending", None)  # Put back after: later tests see none.

  def broken(argv):
    del argv
    raise ImportError("initialization failed")

  monkeypatch.setattr(cli, "run", broken)
  with pytest.raises(ImportError, match="initialization failed"):
    cli.main()

  def signal_then_error(argv):  # A signal came (deferred), but this error is not its doing.
    del argv
    preemption._handle(signal.SIGTERM, None)
    raise ValueError("real")

  monkeypatch.setattr(preemption, "_deferring", 1)  # As inside the training loop.
  monkeypatch.setattr(cli, "run", signal_then_error)
  with pytest.raises(ValueError, match="real"):
    cli.main()


def test_a_signal_during_an_import_waits_for_the_import_then_check_raises_it(
    monkeypatch, tmp_path):
  """Raised inside a C extension's initialisation (jaxlib under load), the signal's
  KeyboardInterrupt comes out as a bare ImportError or a crash: so it is held."""
  from jaxft.runtime import preemption  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(preemption, "_pending", None)  # Put back after: later tests see none.
  (tmp_path / "interrupted_module.py").write_text(
      "import os, signal, time\n"
      "os.kill(os.getpid(), signal.SIGINT)\n"
      "time.sleep(0.2)\n"
      "COMPLETED = True\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  previous = preemption.install()
  try:
    module = importlib.import_module("interrupted_module")
    assert module.COMPLETED
    assert preemption.pending() == signal.SIGINT
    with pytest.raises(preemption.Interrupted, match="stopped by SIGINT"):
      preemption.check()
  finally:
    preemption.restore(previous)
    sys.modules.pop("interrupted_module", None)
