"""DIR/plots/ and `jaxft report`: curves drawn from metrics.jsonl, and a run's summary."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from jaxft import metrics
from jaxft import train
from jaxft.runtime import plots
from jaxft.runtime import report
from tests.helpers import jaxft_in_process, tiny_config

# A classifier's metrics.jsonl: train lines every 10 steps, evals at 20 and 40, and a
# resume at step 20 that logged step 30 again (the later line describes the kept weights).
RECORDS = [
    {"step": 10, "split": "train", "loss": 0.9, "accuracy": 0.50, "lr": 1e-3},
    {"step": 20, "split": "train", "loss": 0.7, "accuracy": 0.60, "lr": 1e-3},
    {"step": 20, "split": "eval", "loss": 0.8, "accuracy": 0.55, "recall": {"a": 0.5},
     "npv": None},
    {"step": 30, "split": "train", "loss": 0.65, "accuracy": 0.62, "lr": 1e-3},
    {"step": 20, "split": "resume", "changes": {"train.num_steps": [30, 40]}},
    {"step": 30, "split": "train", "loss": 0.6, "accuracy": 0.70, "lr": 1e-3},
    {"step": 40, "split": "train", "loss": 0.4, "accuracy": 0.80, "lr": 1e-3},
    {"step": 40, "split": "eval", "loss": 0.5, "accuracy": 0.75, "recall": {"a": 0.7},
     "npv": 0.1},
]


def _write(folder, records):
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records)
                                        + '{"step": 41, "split": "tr')  # Cut short by a kill.


def _lines(figure):
  """{label: (x, y)} of the lines in the figure's one plot."""
  [ax] = figure.axes
  return {l.get_label(): (list(l.get_xdata()), list(l.get_ydata())) for l in ax.get_lines()}


def test_figures_plot_the_files_values_in_800x500_pngs(tmp_path):
  _write(tmp_path, RECORDS)
  drawn = plots.figures(metrics.records(str(tmp_path)), run_name="demo")
  assert sorted(drawn) == ["accuracy.png", "loss.png"]
  assert _lines(drawn["loss.png"]) == {"train": ([10, 20, 30, 40], [0.9, 0.7, 0.6, 0.4]),
                                       "eval": ([20, 40], [0.8, 0.5])}
  assert _lines(drawn["accuracy.png"]) == {"train": ([10, 20, 30, 40], [0.5, 0.6, 0.7, 0.8]),
                                           "eval": ([20, 40], [0.55, 0.75])}
  ax = drawn["loss.png"].axes[0]
  assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("demo: loss", "step", "loss")

  image = Image.open(io.BytesIO(plots.png(drawn["loss.png"])))
  assert image.format == "PNG" and image.size == plots.SIZE_PX
  pixels = np.asarray(image.convert("RGB")).astype(int)
  # Where the figure puts each eval point, the PNG has the eval line's orange (tab:orange).
  for x, y in zip([20, 40], [0.8, 0.5]):
    px, py = ax.transData.transform((x, y))
    near = pixels[round(plots.SIZE_PX[1] - py) - 2:round(plots.SIZE_PX[1] - py) + 3,
                  round(px) - 2:round(px) + 3]
    assert (np.abs(near - [255, 127, 14]).sum(-1) < 60).any(), near


@pytest.mark.parametrize("records, preferred, want", [
    (RECORDS, "", "accuracy"),
    (RECORDS, "loss", "loss"),  # config.checkpoint.best_metric comes first.
    (RECORDS, "f1", "accuracy"),  # One the evals do not hold: the default choice.
    ([{"step": 5, "split": "eval", "loss": 2.0, "perplexity": 7.4}], "", "perplexity"),
    ([{"step": 5, "split": "eval", "loss": 2.0, "perplexity": 7.4, "pass@1": 0.25}], "",
     "pass@1"),
    ([{"step": 5, "split": "eval", "loss": 0.6, "preference_accuracy": 0.7,
       "rewards/accuracies": 0.7}], "", "preference_accuracy"),
    ([{"step": 5, "split": "train", "loss": 0.1, "reward": 0.2},
      {"step": 5, "split": "eval", "prompts": 8, "reward": 0.5}], "", "reward"),
    ([{"step": 5, "split": "train", "loss": 0.1}], "", None),
])
def test_the_headline_metric_is_the_eval_metric_a_run_is_judged_by(records, preferred, want):
  assert plots.headline(records, preferred) == want
  drawn = plots.figures(records, preferred)
  assert sorted(drawn) == sorted({"loss.png"} | ({plots.file_name(want)} if want else set()))


def test_a_metric_name_becomes_a_safe_file_name():
  assert plots.file_name("rewards/accuracies") == "rewards_accuracies.png"
  assert plots.file_name("pass@1") == "pass@1.png"


@pytest.fixture(scope="module")
def trained(tiny_setup, tmp_path_factory):
  """A tiny classifier run (6 steps, evals at 3 and 6), what train returned, its config."""
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config(tiny_setup, eval_every=3)
  return workdir, train.train(config, str(workdir)), config


def test_training_ends_with_the_plots_and_report_redraws_them_and_sums_up(trained):
  workdir, result, config = trained
  pngs = {p.name: p.read_bytes() for p in (workdir / "plots").iterdir()}
  assert sorted(pngs) == ["accuracy.png", "loss.png"]
  for data in pngs.values():
    assert Image.open(io.BytesIO(data)).size == plots.SIZE_PX
  for p in (workdir / "plots").iterdir():
    p.unlink()

  proc = jaxft_in_process("report", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr
  assert sorted(p.name for p in (workdir / "plots").iterdir()) == ["accuracy.png", "loss.png"]
  lines = proc.stdout.splitlines()
  assert lines[0] == f"run {workdir}: task classify, model {config.model.path}"
  assert "  train.num_steps = 6  (default 1000)" in lines
  assert "  train.eval_every = 3  (default 0)" in lines
  assert "steps: 6 of config.train.num_steps=6 (last logged)" in lines
  assert f"final eval (step 6): loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}" \
      in proc.stdout
  evals = [r for r in metrics.records(str(workdir)) if r["split"] == "eval"]
  best = max(evals, key=lambda r: r["accuracy"])  # The first of equal ones.
  assert f"best eval accuracy: {best['accuracy']:.4f} at step {best['step']} (maximum of 2 " \
         "evals)" in lines
  [speed] = [l for l in lines if l.startswith("speed (train line at step 6")]
  assert "examples/s" in speed and "tokens/s" in speed and "MFU" in speed
  assert any(l.startswith("wall time: ") and "event files" in l for l in lines)
  assert f"checkpoints: {workdir / 'checkpoints'}: steps 3, 6" in lines
  assert lines[-1] == f"plots: {workdir / 'plots' / 'loss.png'}, {workdir / 'plots' / 'accuracy.png'}"


def test_report_finds_the_runs_exports_beside_it(trained, tmp_path):
  workdir, _, _ = trained
  # What `jaxft export` leaves in its --out folder (formats/export_dir.py), faked.
  out = workdir.parent / f"{workdir.name}-hf"
  out.mkdir()
  (out / "jaxft_export.json").write_text(json.dumps(
      {"format": "hf", "step": 6, "workdir": str(workdir), "files": []}))
  try:
    text = report.report(str(workdir))
  finally:
    (out / "jaxft_export.json").unlink()
    out.rmdir()
  assert f"exports: {out} (hf, step 6)" in text.splitlines()


def test_report_of_a_folder_that_is_not_a_workdir_is_exit_2(tmp_path):
  proc = jaxft_in_process("report", f"--workdir={tmp_path}")
  assert proc.returncode == 2
  assert proc.stderr.strip() == f"jaxft: error: {tmp_path} is not a jaxft workdir (no config.json)"
  missing = jaxft_in_process("report", f"--workdir={tmp_path / 'typo'}")
  assert missing.returncode == 2
  assert missing.stderr.strip() == f"jaxft: error: workdir {tmp_path / 'typo'} does not exist"
  assert not (tmp_path / "plots").exists()
  alone = jaxft_in_process("report")
  assert alone.returncode == 2 and alone.stderr.strip() == "jaxft: error: --workdir is required"


def test_progress_off_a_terminal_prints_one_line_per_log_step():
  out = io.StringIO()  # Not a TTY: no tqdm bar.
  progress = metrics.Progress(0, 6, batch_size=8, every=2, stream=out)
  for step in range(1, 7):
    progress.update(step, 0.5 if step % 2 == 0 else None)
  progress.close()
  lines = out.getvalue().splitlines()
  assert [l.split()[1] for l in lines] == ["2/6", "4/6", "6/6"]
  assert all(l.startswith("step ") and " loss 0.5000 " in l for l in lines)
