"""The run's metric log: one JSON object per event."""

import numpy as np

from jaxft import metrics


def test_jsonl_writer_appends_one_object_per_event(tmp_path):
  w = metrics.JsonlWriter(str(tmp_path))
  w.write(1, "train", {"loss": np.float32(0.5)})
  w.write(2, "eval", {"accuracy": 1.0})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [l[:30] for l in lines] == ['{"step": 1, "split": "train", ', '{"step": 2, "split": "eval", "']


def test_summary_prints_counts_as_integers():
  from jaxft import metrics
  line = metrics.summary({"tokens": 6628, "loss": 0.5, "recall": {"a": 1.0}, "flag": True})
  assert line == "tokens 6628, loss 0.5000"
