"""Classification metrics agree with scikit-learn."""

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from jaxft.tasks import class_metrics


def test_accuracy_and_macro_f1_match_sklearn():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 200)
  preds = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 3, 200))
  got = class_metrics.classification(labels, preds, 3)
  assert got["accuracy"] == accuracy_score(labels, preds)
  assert abs(got["f1"] - f1_score(labels, preds, average="macro")) < 1e-12
