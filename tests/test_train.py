"""End to end: train, resume exactly, evaluate and export a tiny BERT on real text."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import transformers

from jaxft import train
from jaxft.errors import UserError
from jaxft.models import stack
from jaxft import run as run_lib
from jaxft import commands
from tests.helpers import tiny_config


def _params(workdir, config):
  labels = run_lib.read_labels(str(workdir))
  run = run_lib.open_run(config, str(workdir), config.model.path, labels)
  run.checkpointer.close()
  return run.step, jax.tree.map(np.asarray, run.state)


def test_training_writes_metrics_config_and_checkpoints(tiny_setup, tmp_path):
  result = train.train(tiny_config(tiny_setup), str(tmp_path))
  assert set(result) == {"step", "loss", "accuracy", "f1", "auc", "sensitivity", "specificity",
                         "ppv", "npv", "balanced_accuracy", "threshold", "ece"}
  assert result["step"] == 6
  events = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [e["step"] for e in events if e["split"] == "train"] == [2, 4, 6]
  assert events[-1]["split"] == "eval" and events[-1]["step"] == 6
  assert all(np.isfinite(e["loss"]) for e in events)
  assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 6
  assert json.loads((tmp_path / "labels.json").read_text()) == ["negative", "positive"]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tiny_setup, tmp_path):
  config = tiny_config(tiny_setup)
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  train.train(config, str(full))
  shutil.copytree(full, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")  # As if killed after the step-3 save.
  train.train(config, str(resumed))
  step_a, state_a = _params(full, config)
  step_b, state_b = _params(resumed, config)
  assert step_a == step_b == 6
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)


def _without_dropout(tiny_setup, tmp_path):
  """A copy of the tiny model with dropout off: runs that draw masks differently agree."""
  cfg = transformers.AutoConfig.from_pretrained(tiny_setup / "model")
  cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
  shutil.copytree(tiny_setup / "model", tmp_path / "nodrop")
  cfg.save_pretrained(tmp_path / "nodrop")

  def config(**train_overrides):
    c = tiny_config(tiny_setup, **train_overrides)
    c.model.path = str(tmp_path / "nodrop")
    return c
  return config


def test_grad_accumulation_matches_the_full_batch(tiny_setup, tmp_path):
  no_dropout = _without_dropout(tiny_setup, tmp_path)  # Micro-batches draw their own masks.
  one = no_dropout(num_steps=2, grad_accum=1)
  four = no_dropout(num_steps=2, grad_accum=4)
  train.train(one, str(tmp_path / "one"))
  train.train(four, str(tmp_path / "four"))
  _, a = _params(tmp_path / "one", one)
  _, b = _params(tmp_path / "four", four)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               a["params"], b["params"])


def test_scanned_rematerialised_layers_train_like_the_loop_and_resume(tiny_setup, tmp_path):
  no_dropout = _without_dropout(tiny_setup, tmp_path)
  loop = no_dropout(num_steps=4)
  scan = no_dropout(num_steps=4)
  scan.model.update(scan_layers=True, remat="full")
  train.train(loop, str(tmp_path / "loop"))
  train.train(scan, str(tmp_path / "scan"))
  _, a = _params(tmp_path / "loop", loop)
  _, b = _params(tmp_path / "scan", scan)  # Restored from the stacked checkpoint.
  assert any("stacked" in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(b))
  unstacked = stack.unstack_state(jax.tree.map(jax.numpy.asarray, b["params"]))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               a["params"], jax.tree.map(np.asarray, unstacked))
  loop.model.scan_layers = True  # The loop's checkpoints hold unstacked layers.
  with pytest.raises(UserError, match="scan_layers"):
    train.train(loop, str(tmp_path / "loop"))


def test_bfloat16_compute_trains_with_float32_params(tiny_setup, tmp_path):
  config = tiny_config(tiny_setup, num_steps=2)
  config.model.dtype = "bfloat16"
  result = train.train(config, str(tmp_path))
  assert np.isfinite(result["loss"])
  _, state = _params(tmp_path, config)
  assert {x.dtype for x in jax.tree.leaves(state["params"])} == {np.dtype("float32")}


def test_corrupt_checkpoint_is_a_clear_error(tiny_setup, tmp_path):
  config = tiny_config(tiny_setup, num_steps=3)
  train.train(config, str(tmp_path))
  for path in (tmp_path / "checkpoints" / "3" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b"garbage")
  with pytest.raises(UserError, match="checkpoint 3 in .* is unreadable: state/"):
    commands.eval_command(config, str(tmp_path))


def test_resuming_with_other_rules_is_a_clear_error(tiny_setup, tmp_path):
  train.train(tiny_config(tiny_setup, num_steps=2), str(tmp_path))
  config = tiny_config(tiny_setup, num_steps=4)
  config.optim.rules = (("embeddings/.*", None), (".*", 1.0))
  with pytest.raises(UserError, match="trained with config.optim.rules=.*in a new --workdir"):
    train.train(config, str(tmp_path))
