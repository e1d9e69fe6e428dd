"""MFU: the analytic FLOP count agrees with XLA's, and train logs report it."""

import json

import pytest

from jaxft import inspect
from jaxft import mfu
from jaxft import tasks
from jaxft.tuning import trainable
from tests.test_train import tiny_config


def test_analytic_train_flops_match_xlas_cost_analysis_for_minilm(tiny_setup, minilm_path):
  config = tiny_config(tiny_setup)
  config.model.path = minilm_path
  config.data.max_length = 64
  config.train.batch_size = 8
  xla = inspect.inspect(config)["step_flops"]
  task = tasks.of(config)
  hf_config = task.hf_config(minilm_path, ["neg", "pos"])
  sizes = trainable.split(trainable.abstract_model(hf_config, config, task.name), config).sizes
  ours = 8 * 64 * task.flops_per_token(sizes, hf_config)
  assert ours == pytest.approx(xla, rel=0.15)


def test_training_logs_mfu_against_the_measured_peak(tiny_setup, tmp_path):
  from jaxft import train
  train.train(tiny_config(tiny_setup, num_steps=4, log_every=2), str(tmp_path))
  events = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  logged = [e for e in events if e["split"] == "train"]
  assert logged and all(0 < e["mfu"] < 1 for e in logged)
  assert mfu.peak_flops() > 1e9  # A measured CPU matmul peak, not a placeholder.
