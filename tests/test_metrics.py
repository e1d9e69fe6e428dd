"""Classification metrics agree with scikit-learn."""

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from jaxft import metrics


def test_accuracy_and_macro_f1_match_sklearn():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 200)
  preds = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 3, 200))
  got = metrics.classification(labels, preds, 3)
  assert got["accuracy"] == accuracy_score(labels, preds)
  assert abs(got["f1"] - f1_score(labels, preds, average="macro")) < 1e-12


def test_jsonl_writer_appends_one_object_per_event(tmp_path):
  w = metrics.JsonlWriter(str(tmp_path))
  w.write(1, "train", {"loss": np.float32(0.5)})
  w.write(2, "eval", {"accuracy": 1.0})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [l[:30] for l in lines] == ['{"step": 1, "split": "train", ', '{"step": 2, "split": "eval", "']
