"""Clinical scores of a classifier from its class probabilities.

Binary (label 1 is the positive finding, e.g. pneumonia): ROC AUC and, at a
decision threshold, sensitivity, specificity, PPV, NPV, balanced accuracy, F1
and the confusion counts; a threshold chosen for a stated target; multi-class
one-vs-rest AUC and per-class sensitivity / specificity; the expected
calibration error. The scores come from `sklearn.metrics` so there is one
implementation of each; only the ECE, which scikit-learn lacks, is written here.

A value that is undefined on the data (PPV with no positive prediction, AUC
with one class present) is None, never NaN, so every result is JSON-safe.
Pure numpy / scikit-learn: no JAX.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sklearn import exceptions
from sklearn import metrics

from jaxft import config

TARGETS = config.DECISION_TARGETS[1:]  # sensitivity | specificity | youden

# A rate computed as k / n may land a rounding error below a target written as
# a decimal (0.95); this slack keeps such a threshold eligible.
_RATE_SLACK = 1e-12
# Probabilities from a float16 / bfloat16 softmax sum to 1 only roughly.
_SUM_SLACK = 1e-3


def binary(labels: np.ndarray, positive_probs: np.ndarray, threshold: float) -> dict[str, Any]:
  """Scores of positive-class probabilities at `threshold` (positive when prob >= threshold).

  Args:
    labels: [N] ints, 0 (negative) or 1 (positive).
    positive_probs: [N] probabilities of class 1, in [0, 1].
    threshold: the decision threshold, a finite number. The comparison is
      exact (in float64): a float32 0.9 lies just below 0.9. Thresholds from
      `choose_threshold` are exact copies of probabilities, so they are safe.

  Returns:
    `auc`, `sensitivity`, `specificity`, `ppv`, `npv`, `balanced_accuracy`,
    `f1`, `accuracy`, `threshold` (floats, None where undefined on these data)
    and the confusion counts `tp`, `fp`, `tn`, `fn` (ints).
  """
  labels, probs = _binary_inputs(labels, positive_probs)
  threshold = _finite("threshold", threshold)
  preds = (probs >= threshold).astype(np.int64)
  tn, fp, fn, tp = (int(c) for c in metrics.confusion_matrix(labels, preds, labels=[0, 1]).ravel())
  both = bool(tp + fn) and bool(tn + fp)
  rate = dict(y_true=labels, y_pred=preds, zero_division=np.nan)
  return {
      "auc": _defined(metrics.roc_auc_score(labels, probs)) if both else None,
      "sensitivity": _defined(metrics.recall_score(**rate, pos_label=1)),
      "specificity": _defined(metrics.recall_score(**rate, pos_label=0)),
      "ppv": _defined(metrics.precision_score(**rate, pos_label=1)),
      "npv": _defined(metrics.precision_score(**rate, pos_label=0)),
      # sklearn would average only the classes present; with one absent the
      # binary score is not balanced over anything, so it is undefined.
      "balanced_accuracy": (_defined(metrics.balanced_accuracy_score(labels, preds))
                            if both else None),
      "f1": _defined(metrics.f1_score(**rate, pos_label=1)),
      "accuracy": float(metrics.accuracy_score(labels, preds)),
      "threshold": threshold,
      "tp": tp, "fp": fp, "tn": tn, "fn": fn,
  }


def choose_threshold(labels: np.ndarray, positive_probs: np.ndarray, *, target: str,
                     value: float | None = None) -> float:
  """A decision threshold, one of the distinct probabilities, that meets `target` on these data.

  Choose it on a validation split and report test scores at it.

  Args:
    labels: [N] ints, 0 or 1.
    positive_probs: [N] probabilities of class 1.
    target: "sensitivity": the largest threshold whose sensitivity is still >=
      `value` (so specificity is as high as it can be there); "specificity":
      the smallest threshold whose specificity is >= `value` (so sensitivity is
      as high as it can be); "youden": the threshold of greatest sensitivity +
      specificity - 1 (`value` is ignored).
    value: the target rate, in (0, 1]; required unless target is "youden".

  Ties: examples with equal probability fall on the same side of every
  candidate, so the rate reached may overshoot `value` by several examples'
  worth. Among thresholds of equal Youden index the largest wins. When no
  predicted probability gives the specificity asked for (the top score is
  shared by too many negatives), the threshold returned lies just above the
  largest probability: nothing is predicted positive.

  Raises:
    ValueError: a bad `target` or `value`, bad inputs, or the class the target
      needs is absent from `labels`.
  """
  if target not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
  if target != "youden":
    if value is None or not 0 < _finite("value", value) <= 1:
      raise ValueError(f"value for target {target!r} must be in (0, 1], got {value!r}")
  labels, probs = _binary_inputs(labels, positive_probs)
  needs = {"sensitivity": (1,), "specificity": (0,), "youden": (0, 1)}[target]
  for c in needs:
    if not np.any(labels == c):
      raise ValueError(f"target {target!r} needs examples of class {c} in labels; there are none")
  with warnings.catch_warnings():
    # One class absent leaves the other rate NaN, with a warning; the target
    # reads only the rate whose class is present.
    warnings.simplefilter("ignore", exceptions.UndefinedMetricWarning)
    fpr, tpr, thresholds = metrics.roc_curve(labels, probs, drop_intermediate=False)
  # The first point is roc_curve's "predict nothing" (threshold inf, or
  # max + 1 before scikit-learn 1.3): not a predicted probability.
  fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # descending thresholds
  if target == "sensitivity":
    return float(thresholds[np.argmax(tpr >= value - _RATE_SLACK)])  # tpr rises: first hit
  if target == "specificity":
    ok = np.flatnonzero(1 - fpr >= value - _RATE_SLACK)
    return float(thresholds[ok[-1]]) if ok.size else float(np.nextafter(probs.max(), np.inf))
  return float(thresholds[np.argmax(tpr - fpr)])  # argmax takes the first: the largest


def multiclass(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
  """Scores of [N, K] class probabilities, predicting the argmax.

  Returns:
    `auc` (one-vs-rest macro ROC AUC; None when a class is absent from
    labels), `balanced_accuracy` (mean recall over the classes present),
    `accuracy`, `f1` (macro over classes in labels or predictions),
    `sensitivity` and `specificity` (macro means of the defined per-class
    values) and `per_class_sensitivity`, `per_class_specificity` (K entries,
    one-vs-rest, None where undefined).
  """
  labels, probs = _multiclass_inputs(labels, probs)
  k = probs.shape[1]
  preds = np.argmax(probs, axis=1)
  classes = list(range(k))
  sens = metrics.recall_score(labels, preds, labels=classes, average=None, zero_division=np.nan)
  # One 2x2 [[tn, fp], [fn, tp]] per class, that class against the rest.
  per_class = metrics.multilabel_confusion_matrix(labels, preds, labels=classes)
  negatives = per_class[:, 0, 0] + per_class[:, 0, 1]
  spec = [c[0, 0] / n if n else None for c, n in zip(per_class, negatives)]
  per_sens = [_defined(s) for s in sens]
  per_spec = [_defined(s) for s in spec]
  with warnings.catch_warnings():
    # A class absent from labels but predicted is expected on small eval sets;
    # the mean runs over the classes present, as documented.
    warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
    balanced = float(metrics.balanced_accuracy_score(labels, preds))
  return {
      "auc": _ovr_auc(labels, probs),
      "balanced_accuracy": balanced,
      "accuracy": float(metrics.accuracy_score(labels, preds)),
      "f1": float(metrics.f1_score(labels, preds, average="macro", zero_division=0.0)),
      "sensitivity": _mean(per_sens),
      "specificity": _mean(per_spec),
      "per_class_sensitivity": per_sens,
      "per_class_specificity": per_spec,
  }


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
  """ECE of the top-class confidence (Guo et al., 2017).

  Confidences fall into `bins` equal-width bins (lo, hi] of [0, 1]; the ECE is
  the mean over bins of |accuracy - mean confidence|, weighted by the bin's
  share of the examples.
  """
  _, confidence, accuracy, count = reliability(labels, probs, bins)
  weight = count / count.sum()
  return float(np.sum(weight * np.abs(np.nan_to_num(accuracy - confidence))))


def reliability(labels: np.ndarray, probs: np.ndarray,
                bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Per-bin statistics of the top-class confidence, as the ECE bins them.

  Returns:
    edges [bins + 1], and per bin the mean confidence, the accuracy of the
    argmax (both NaN in an empty bin) and the example count.
  """
  labels, probs = _multiclass_inputs(labels, probs)
  if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
    raise ValueError(f"bins must be a positive int, got {bins!r}")
  confidence = probs.max(axis=1)
  correct = (np.argmax(probs, axis=1) == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, bins + 1)
  # side="left" on the inner edges: a confidence on an edge belongs to the lower bin.
  which = np.searchsorted(edges[1:-1], confidence, side="left")
  count = np.bincount(which, minlength=bins).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_confidence = np.bincount(which, confidence, minlength=bins) / count
    accuracy = np.bincount(which, correct, minlength=bins) / count
  return edges, mean_confidence, accuracy, count


def _ovr_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
  k = probs.shape[1]
  if len(np.unique(labels)) < k:
    return None
  if k == 2:  # sklearn takes binary scores as one column; class 0's AUC equals class 1's.
    return _defined(metrics.roc_auc_score(labels, probs[:, 1]))
  return _defined(metrics.roc_auc_score(labels, probs, multi_class="ovr", average="macro",
                                        labels=list(range(k))))


def _binary_inputs(labels: Any, positive_probs: Any) -> tuple[np.ndarray, np.ndarray]:
  labels = _labels(labels)
  probs = np.asarray(positive_probs)
  if probs.ndim != 1 or probs.shape[0] != labels.shape[0]:
    raise ValueError(f"positive_probs must be 1-D with one entry per label ({labels.shape[0]}), "
                     f"got shape {probs.shape}")
  probs = _probabilities("positive_probs", probs)
  bad = ~np.isin(labels, (0, 1))
  if np.any(bad):
    raise ValueError(f"binary labels must be 0 or 1, got {labels[bad][0]}")
  return labels, probs


def _multiclass_inputs(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
  labels = _labels(labels)
  probs = np.asarray(probs)
  if probs.ndim != 2 or probs.shape[0] != labels.shape[0] or probs.shape[1] < 2:
    raise ValueError(f"probs must be [N, K] with N = {labels.shape[0]} labels and K >= 2 "
                     f"classes, got shape {probs.shape}")
  probs = _probabilities("probs", probs)
  sums = probs.sum(axis=1)
  if not np.allclose(sums, 1.0, rtol=0, atol=_SUM_SLACK):
    worst = sums[np.argmax(np.abs(sums - 1))]
    raise ValueError(f"each row of probs must sum to 1 (softmax outputs), one sums to {worst:.6g}")
  k = probs.shape[1]
  bad = (labels < 0) | (labels >= k)
  if np.any(bad):
    raise ValueError(f"labels must be class ids in [0, {k}), got {labels[bad][0]}")
  return labels, probs / sums[:, None]  # exact sums: sklearn's multi-class AUC insists


def _labels(labels: Any) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] == 0:
    raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
    raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
  return labels.astype(np.int64)


def _probabilities(name: str, probs: np.ndarray) -> np.ndarray:
  if not np.issubdtype(probs.dtype, np.number) or np.issubdtype(probs.dtype, np.complexfloating):
    raise ValueError(f"{name} must be real numbers, got dtype {probs.dtype}")
  probs = probs.astype(np.float64)
  if not np.all(np.isfinite(probs)) or np.any(probs < 0) or np.any(probs > 1):
    raise ValueError(f"{name} must be finite probabilities in [0, 1]; "
                     f"got values in [{np.nanmin(probs)}, {np.nanmax(probs)}]")
  return probs


def _finite(name: str, x: Any) -> float:
  try:
    x = float(x)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number, got {x!r}") from None
  if not math.isfinite(x):
    raise ValueError(f"{name} must be finite, got {x}")
  return x


def _defined(x: Any) -> float | None:
  x = float(x) if x is not None else None
  return None if x is None or math.isnan(x) else x


def _mean(values: list[float | None]) -> float | None:
  defined = [v for v in values if v is not None]
  return float(np.mean(defined)) if defined else None
