"""Classification scores from labels and predictions: accuracy, macro-F1, confusion, recall."""

from __future__ import annotations

import numpy as np


def classification(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict[str, float]:
  """Accuracy and macro-F1 (mean over classes that occur in labels or predictions)."""
  f1s = []
  for c in range(num_labels):
    tp = np.sum((preds == c) & (labels == c))
    fp = np.sum((preds == c) & (labels != c))
    fn = np.sum((preds != c) & (labels == c))
    if tp + fp + fn:
      f1s.append(2 * tp / (2 * tp + fp + fn))
  return {"accuracy": float(np.mean(preds == labels)), "f1": float(np.mean(f1s))}


def confusion(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> np.ndarray:
  """int64 [true class, predicted class] counts."""
  matrix = np.zeros((num_labels, num_labels), np.int64)
  np.add.at(matrix, (labels, preds), 1)
  return matrix


def recall_per_class(matrix: np.ndarray) -> list[float | None]:
  """Of each class's examples, the fraction predicted as that class (None: none in the data)."""
  totals = matrix.sum(1)
  return [float(matrix[i, i] / t) if t else None for i, t in enumerate(totals)]
