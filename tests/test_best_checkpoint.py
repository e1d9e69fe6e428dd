"""config.checkpoint.best_metric keeps the best eval checkpoint; early_stop_patience stops."""

import json

from jaxft import checkpoint
from tests.helpers import jaxft_in_process, tiny_flags


def _evals(workdir):
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in records if r["split"] == "eval"}


def test_the_best_eval_checkpoint_is_kept_beside_the_last(tiny_setup, tmp_path):
  w = tmp_path / "w"
  run = jaxft_in_process("train", *tiny_flags(
      tiny_setup, w, "--config.train.num_steps=8", "--config.train.eval_every=2",
      "--config.checkpoint.best_metric=loss", "--config.checkpoint.keep=1"))
  assert run.returncode == 0, run.stderr
  evals = _evals(w)
  assert sorted(evals) == [2, 4, 6, 8]
  best = min(evals, key=lambda s: evals[s]["loss"])
  kept = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == sorted({best, 8})
  ckpt = checkpoint.Checkpointer(str(w), keep=1, best_metric="loss", best_mode="min")
  try:
    assert ckpt.best_step() == best
  finally:
    ckpt.close()
  exported = jaxft_in_process("export", f"--workdir={w}", f"--out={tmp_path / 'best'}",
                              "--step=best")
  assert exported.returncode == 0, exported.stderr
  assert json.loads((tmp_path / "best" / "jaxft_export.json").read_text())["step"] == best


def test_early_stopping_stops_saves_and_a_rerun_is_a_no_op(tiny_setup, tmp_path):
  w = tmp_path / "w"
  # A learning rate too small to change a prediction: accuracy never improves after step 2.
  flags = tiny_flags(tiny_setup, w, "--config.train.num_steps=20", "--config.optim.lr=1e-12",
                     "--config.train.eval_every=2", "--config.checkpoint.best_metric=accuracy",
                     "--config.train.early_stop_patience=2")
  run = jaxft_in_process("train", *flags)
  assert run.returncode == 0, run.stderr
  assert json.loads(run.stdout.strip().splitlines()[-1])["step"] == 6
  assert "early stop at step 6: best accuracy" in run.stderr
  assert "at step 2, then 2 evals without improvement" in run.stderr
  assert sorted(_evals(w)) == [2, 4, 6]
  again = jaxft_in_process("train", *flags)
  assert again.returncode == 0, again.stderr
  assert f"nothing to train: {w} stopped early at step 6" in again.stderr
  assert sorted(_evals(w)) == [2, 4, 6]
  # More patience: the run goes on, counting the evals it already had.
  more = jaxft_in_process("train", *flags, "--config.train.early_stop_patience=3")
  assert more.returncode == 0, more.stderr
  assert json.loads(more.stdout.strip().splitlines()[-1])["step"] == 8


def test_early_stopping_without_evals_is_a_config_error(tiny_setup, tmp_path):
  bad = jaxft_in_process("train", *tiny_flags(tiny_setup, tmp_path / "w",
                                              "--config.train.early_stop_patience=2"))
  assert bad.returncode == 2
  assert bad.stderr.strip() == ("jaxft: error: config.train.eval_every must be > 0 when "
                                "train.early_stop_patience is set, got 0")
