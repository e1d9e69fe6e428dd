"""Ctrl-C (SIGINT) at any moment of `jaxft train` ends it with 130 and a clean message."""

import json
import os
import signal
import subprocess
import sys
import time

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
