"""config.log: TensorBoard event files in DIR/tensorboard/ (metrics.jsonl's numbers, eval
figures, LM samples), read back with TensorBoard's own reader; and the wandb option."""

import io
import json
import os
import sys
import types

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jaxft import defaults
from jaxft import metrics
from jaxft import train
from jaxft.errors import UserError
from jaxft.runtime import dashboards
from jaxft.tasks import causal_lm
from tests.helpers import tiny_config


def _events(workdir) -> EventAccumulator:
  events = EventAccumulator(str(workdir / "tensorboard"),
                            size_guidance={"scalars": 0, "images": 0, "tensors": 0})
  events.Reload()
  return events


def _event_scalars(events: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
          for tag in events.Tags()["scalars"]}


def _jsonl_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
  """metrics.jsonl's numbers as TensorBoard holds them: split/name tags, float32 values."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    values = {k: v for k, v in record.items() if k not in ("step", "split")}
    for tag, value in dashboards.scalars(record["split"], values).items():
      out.setdefault(tag, []).append((record["step"], float(np.float32(value))))
  return out


def test_event_files_hold_every_number_of_metrics_jsonl_at_the_same_steps(tiny_setup, tmp_path):
  config = tiny_config(tiny_setup, eval_every=3)
  train.train(config, str(tmp_path))
  [name] = [p.name for p in (tmp_path / "tensorboard").iterdir()]
  assert name.startswith("events.out.tfevents.")
  logged = _event_scalars(_events(tmp_path))
  assert logged == _jsonl_scalars(tmp_path)
  assert [s for s, _ in logged["train/loss"]] == [2, 4, 6]
  assert [s for s, _ in logged["eval/loss"]] == [s for s, _ in logged["eval/accuracy"]] == [3, 6]
  assert {"train/lr", "train/grad_norm", "train/skipped_steps", "train/tokens_per_sec",
          "train/mfu", "eval/auc"} <= set(logged)
  assert "eval/npv" not in logged  # None in metrics.jsonl (no negative predictions).


def test_without_log_tensorboard_no_event_file_is_written(tiny_setup, tmp_path):
  config = tiny_config(tiny_setup, num_steps=2)
  config.log.tensorboard = False
  train.train(config, str(tmp_path))
  assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()


def test_each_rule_groups_own_learning_rate_goes_to_the_dashboard_only(tiny_setup, tmp_path):
  config = tiny_config(tiny_setup, num_steps=4)
  config.optim.rules = ((".*embeddings.*", 0.5), (".*", 1.0))
  train.train(config, str(tmp_path))
  logged = _event_scalars(_events(tmp_path))
  [tag] = [t for t in logged if t.startswith("train/lr/")]
  assert tag == "train/lr/optim.rules[0] .*embeddings.*"
  # Half the run's rate (the plain rule's, train/lr) at every log step.
  assert [s for s, _ in logged[tag]] == [s for s, _ in logged["train/lr"]] == [2, 4]
  assert [2 * v for _, v in logged[tag]] == pytest.approx([v for _, v in logged["train/lr"]])
  assert "lr/" not in (tmp_path / "metrics.jsonl").read_text()


def test_an_image_runs_eval_figures_are_images_at_their_step(tiny_image_vit, tmp_path):
  config = defaults.recipe("vit", "full")
  config.model.path = str(tiny_image_vit)
  config.data.image_size = 16
  config.train.update(batch_size=32, num_steps=2, log_every=1, eval_batch_size=128)
  train.train(config, str(tmp_path))
  events = _events(tmp_path)
  assert sorted(events.Tags()["images"]) == ["eval/calibration", "eval/confusion"]  # 10 classes.
  for kind in ("confusion", "calibration"):
    [image] = events.Images(f"eval/{kind}")
    png = (tmp_path / kind / "step_2.png").read_bytes()
    assert image.step == 2 and image.encoded_image_string == png
    assert (image.width, image.height) == Image.open(io.BytesIO(png)).size
  assert _event_scalars(events)["eval/recall/3"][0][0] == 2  # Per-class recall, flattened.


def test_lm_samples_are_a_text_summary_at_their_step(tmp_path):
  config = tiny_config(tmp_path)
  board = metrics.open_board(str(tmp_path), config)
  try:
    causal_lm.write_samples(4, [("Hi ```x```", "Hello"), ("2+2?\nthink", "4")], ["Hey", "4"],
                            str(tmp_path))
  finally:
    metrics.close_board(str(tmp_path))
  assert metrics.board(str(tmp_path)) is None and board is not None
  [event] = _events(tmp_path).Tensors("eval/samples")
  text = event.tensor_proto.string_val[0].decode()
  assert event.step == 4
  assert text.startswith("### sample 1\n\n**prompt**\n\n    Hi ```x```\n\n**reference**\n\n    Hello")
  assert "**prompt**\n\n    2+2?\n    think\n\n" in text and text.endswith("**generated**\n\n    4")


def test_wandb_without_the_package_is_an_error_before_anything_loads(tmp_path, monkeypatch):
  monkeypatch.setattr(dashboards.importlib.util, "find_spec",
                      lambda name: None if name == "wandb" else object())
  config = tiny_config(tmp_path)  # Its model and data do not exist: the check comes first.
  config.log.wandb = True
  with pytest.raises(UserError, match=r"config.log.wandb=True needs the wandb package: "
                     r"`pip install wandb` \(or set config.log.wandb=False\)"):
    train.train(config, str(tmp_path / "run"))


def test_wandb_runs_offline_in_the_workdir_and_gets_the_same_numbers(tmp_path, monkeypatch):
  calls = []
  run = types.SimpleNamespace(log=lambda values, step: calls.append((step, values)),
                              finish=lambda: calls.append("finish"))
  fake = types.ModuleType("wandb")
  fake.init = lambda **kw: calls.append(kw) or run
  monkeypatch.setitem(sys.modules, "wandb", fake)
  monkeypatch.setattr(dashboards.importlib.util, "find_spec", lambda name: object())
  monkeypatch.setenv("WANDB_MODE", "")
  monkeypatch.delenv("WANDB_MODE")
  config = tiny_config(tmp_path)
  config.log.update(tensorboard=False, wandb=True)
  writer = metrics.JsonlWriter(str(tmp_path), config)
  writer.write(2, "train", {"loss": np.float32(0.5), "recall": {"a": 1.0}, "npv": None})
  metrics.close_board(str(tmp_path))
  init, logged, end = calls
  assert init["dir"] == str(tmp_path) and init["resume"] == "allow"
  assert init["config"]["train"]["num_steps"] == 6
  assert logged == (2, {"train/loss": 0.5, "train/recall/a": 1.0}) and end == "finish"
  assert os.environ["WANDB_MODE"] == "offline"
  assert not (tmp_path / "tensorboard").exists()
