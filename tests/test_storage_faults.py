"""A damaged newest checkpoint costs one save, not the run; a failed save costs nothing."""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxft import checkpoint
from jaxft import run as run_lib
from jaxft import train
from jaxft.errors import UserError
from jaxft.runtime import integrity
from tests.helpers import ROOT, jaxft_in_process, tiny_config, tiny_flags


def _flags(root, workdir, *extra):
  """`jaxft train` flags for the same run as tiny_config's."""
  return tiny_flags(root, workdir, "--config.train.num_steps=6", "--config.checkpoint.every=3",
                    "--config.checkpoint.keep=5", "--config.train.log_every=2",
                    "--config.train.eval_batch_size=16", *extra)


def _state(workdir, config):
  run = run_lib.open_run(config, str(workdir), config.model.path,
                         run_lib.read_labels(str(workdir)), quiet=True)
  run.checkpointer.close()
  return run.step, jax.tree.map(np.asarray, run.state)


def _assert_bitwise_equal(a, b):
  flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def finished(tiny_setup, tmp_path_factory):
  """A 6-step run with checkpoints at 3 and 6, and its final state."""
  workdir = tmp_path_factory.mktemp("finished")
  config = tiny_config(tiny_setup)
  train.train(config, str(workdir))
  return workdir, config, _state(workdir, config)[1]


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
  files = [p for p in folder.rglob("*") if p.is_file() and p.name != integrity.MANIFEST]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _largest_file(step_dir)
  path.write_bytes(path.read_bytes()[:100])
  return path


def _remove(step_dir):
  path = _largest_file(step_dir)
  path.unlink()
  return path


def _flip(step_dir):
  path = _largest_file(step_dir)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10  # One bit, mid-file: a size check alone cannot see it.
  path.write_bytes(bytes(data))
  return path


DAMAGE = {"truncated": _truncate, "missing": _remove, "flipped": _flip}


def test_finished_saves_are_sealed_and_read_as_intact(finished):
  workdir, config, _ = finished
  ckpt = checkpoint.Checkpointer.of(str(workdir), config)
  try:
    assert ckpt.all_steps() == [3, 6]
    assert all(integrity.is_sealed(ckpt.step_dir(s)) for s in (3, 6))
    assert ckpt.newest_intact() == (6, [])
  finally:
    ckpt.close()


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_rerun_resumes_from_the_previous(
    finished, tmp_path, kind, capfd):
  source, config, final = finished
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  damaged = DAMAGE[kind](workdir / "checkpoints" / "6")
  name = str(damaged.relative_to(workdir / "checkpoints" / "6"))

  result = train.train(config, str(workdir))

  err = capfd.readouterr().err
  skip = [l for l in err.splitlines() if "skipping checkpoint 6" in l]
  assert len(skip) == 1 and name in skip[0] and "checkpoints_corrupt" in skip[0], err[-3000:]
  assert "restored checkpoint at step 3" in err
  assert result["step"] == 6 and np.isfinite(result["loss"])
  assert (workdir / "checkpoints_corrupt" / "6").is_dir()  # Kept for a post-mortem.
  step, state = _state(workdir, config)
  assert step == 6
  _assert_bitwise_equal(state, final)  # Steps 4-6 retrained from step 3: the same numbers.


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_on_corrupt_error_names_the_checkpoint_and_file_and_exits_2(
    finished, tmp_path, kind, tiny_setup):
  source, _, _ = finished
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  damaged = DAMAGE[kind](workdir / "checkpoints" / "6")
  # In process: the error comes before anything compiles, as a subprocess would show it.
  proc = jaxft_in_process("train", *_flags(tiny_setup, workdir,
                                           "--config.checkpoint.on_corrupt=error"))
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("jaxft: error: checkpoint 6 in ") and damaged.name in last, last
  assert "on_corrupt=fallback" in last and len(last) < 600, last
  assert (workdir / "checkpoints" / "6").is_dir()  # "error" moves nothing.


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(finished, tmp_path):
  source, config, _ = finished
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  for step in ("3", "6"):
    _flip(workdir / "checkpoints" / step)
  with pytest.raises(UserError, match="no intact checkpoint left: checkpoint 6 .*checkpoint 3"):
    train.train(config, str(workdir))


def test_eval_of_a_damaged_newest_checkpoint_reads_the_previous_and_moves_nothing(
    finished, tmp_path, capfd):
  source, config, _ = finished
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  _truncate(workdir / "checkpoints" / "6")
  _, run, _ = run_lib.restore(str(workdir), config=config)
  assert run.step == 3
  assert "skipping checkpoint 6" in capfd.readouterr().err
  assert (workdir / "checkpoints" / "6").is_dir() and not (workdir / "checkpoints_corrupt").exists()


def _with_file_size_limit(limit: int, args: list[str]) -> list[str]:
  """`python ARGS` with writes past `limit` bytes failing (EFBIG), as on a full disk (ENOSPC).

  The limit is set in the child before it execs: no fork of this threaded process.
  SIGXFSZ ignored makes the kernel fail the write instead of killing the writer.
  """
  setup = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
           "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
  return [sys.executable, "-c", setup, *args]


def _tensorstore_noise(line: str) -> bool:
  line = line.strip()
  return (not line or line.startswith(("Traceback (most recent call last):", 'File "', "^"))
          or line in ("self._check_closed()", "raise RuntimeError('Event loop is closed')",
                      "RuntimeError: Event loop is closed"))


def test_a_save_that_fails_to_write_keeps_the_earlier_checkpoint_and_the_run_resumes(
    finished, tiny_setup, tmp_path):
  source, config, final = finished
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")  # Back to a run stopped at step 3.
  flags = _flags(tiny_setup, workdir, "--config.checkpoint.keep=1")
  largest = _largest_file(workdir / "checkpoints" / "3").stat().st_size
  # keep=1: a save that pruned before it completed would leave no checkpoint at all.
  proc = subprocess.run(_with_file_size_limit(largest // 2, ["-m", "jaxft.cli", "train", *flags]),
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  # Its threads write a traceback in pieces, so a piece may land in front of our line.
  [at] = [i for i, l in enumerate(lines) if "jaxft: error: saving checkpoint 6 in " in l]
  last = lines[at]
  assert "failed" in last and "File too large writing " in last, last
  assert "steps 3 are intact" in last, last
  # TensorStore prints "Event loop is closed" tracebacks from its own threads as Orbax
  # cancels the other writes (upstream noise, neither sys.excepthook nor logging), some
  # after the line above; nothing else may follow it.
  assert all(_tensorstore_noise(l) for l in lines[at + 1:]), lines[at + 1:]
  assert "ERROR:absl" not in proc.stderr, proc.stderr[-3000:]

  ckpt = checkpoint.Checkpointer.of(str(workdir), config)
  try:
    assert ckpt.newest_intact() == (3, [])
  finally:
    ckpt.close()
  proc = jaxft_in_process("train", *flags)  # No file size limit now: in this process.
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "restored checkpoint at step 3" in proc.stderr
  step, state = _state(workdir, config)
  assert step == 6
  _assert_bitwise_equal(state, final)
  assert os.listdir(workdir / "checkpoints") == ["6"]


def test_an_export_that_fails_to_write_is_a_clear_error_and_keeps_the_earlier_export(
    finished, tmp_path):
  workdir, _, _ = finished
  out = tmp_path / "export"
  first = jaxft_in_process("export", f"--workdir={workdir}", f"--out={out}")
  assert first.returncode == 0, first.stderr[-3000:]
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  weights = max(p.stat().st_size for p in out.iterdir())
  proc = subprocess.run(_with_file_size_limit(weights // 2, [
      "-m", "jaxft.cli", "export", f"--workdir={workdir}", f"--out={out}", "--step=3"]),
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"jaxft: error: writing the export for {out} failed: ") and \
      "File too large" in last and "is unchanged" in last, last
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  assert not list(tmp_path.glob(".jaxft-export-*"))  # The staging folder went too.
