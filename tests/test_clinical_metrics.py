"""Clinical metrics against first principles: counts by hand, numpy formulas, the Mann-Whitney U.

Every expected value is written here from its definition, never read back
from scikit-learn, which the module under test uses.
"""

import json

import numpy as np
import pytest
from PIL import Image

from jaxft.tasks import clinical_metrics as cm
from jaxft.tasks import clinical_png

# Ten chest X-rays, six with pneumonia (1); the positive at 0.5 ties a negative.
LABELS = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
PROBS = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.5, 0.65, 0.2, 0.1, 0.5])
BINARY_KEYS = {"auc", "sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "f1",
               "accuracy", "threshold", "tp", "fp", "tn", "fn"}


def mann_whitney_auc(labels, scores):
  """P(score of a positive > score of a negative), ties counted half."""
  pos, neg = scores[labels == 1][:, None], scores[labels == 0][None, :]
  return (np.sum(pos > neg) + 0.5 * np.sum(pos == neg)) / (pos.size * neg.size)


def rates(labels, probs, t):
  """Sensitivity and specificity at threshold t, from their definitions."""
  pred = probs >= t
  return np.mean(pred[labels == 1]), np.mean(~pred[labels == 0])


def assert_scores(got, expected):
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, abs=1e-12), key


# --- binary -------------------------------------------------------------------


def test_binary_at_half_counted_by_hand():
  # Positives 0.9 0.8 0.7 0.6 0.5 reach 0.5, 0.4 does not; negatives 0.65 and
  # 0.5 reach it (>= counts), 0.2 and 0.1 do not.
  got = cm.binary(LABELS, PROBS, 0.5)
  assert set(got) == BINARY_KEYS
  assert (got["tp"], got["fn"], got["fp"], got["tn"]) == (5, 1, 2, 2)
  assert all(type(got[k]) is int for k in ("tp", "fp", "tn", "fn"))
  assert_scores(got, {
      "sensitivity": 5 / 6, "specificity": 2 / 4, "ppv": 5 / 7, "npv": 2 / 3,
      "balanced_accuracy": (5 / 6 + 2 / 4) / 2, "f1": 2 * 5 / (2 * 5 + 2 + 1),
      "accuracy": 7 / 10, "threshold": 0.5,
      # Of 6 x 4 pairs the positive scores higher in 19 and ties in one (0.5, 0.5).
      "auc": 19.5 / 24,
  })


def test_binary_at_a_stricter_threshold_counted_by_hand():
  got = cm.binary(LABELS, PROBS, 0.7)  # catches 0.9 0.8 0.7; no negative reaches 0.7
  assert (got["tp"], got["fn"], got["fp"], got["tn"]) == (3, 3, 0, 4)
  assert_scores(got, {"sensitivity": 0.5, "specificity": 1.0, "ppv": 1.0, "npv": 4 / 7,
                      "balanced_accuracy": 0.75, "f1": 6 / 9, "accuracy": 0.7, "auc": 19.5 / 24})


@pytest.mark.parametrize("threshold", [0.13, 0.5, 0.74, 0.9])
def test_binary_matches_numpy_formulas_on_seeded_data(threshold):
  rng = np.random.default_rng(1)
  labels = (rng.random(300) < 0.74).astype(np.int32)  # ~74% pneumonia, as in the chest X-ray set
  # Rounded to 2 places so many scores tie; float32 like a model's output.
  probs = np.round(np.clip(0.3 * labels + 0.7 * rng.random(300), 0, 1), 2).astype(np.float32)
  # Compared as exact values: float32(0.9) is just below 0.9, so not positive at 0.9.
  pred = probs.astype(np.float64) >= threshold
  tp, fp = np.sum(pred & (labels == 1)), np.sum(pred & (labels == 0))
  fn, tn = np.sum(~pred & (labels == 1)), np.sum(~pred & (labels == 0))
  got = cm.binary(labels, probs, threshold)
  assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (tp, fp, tn, fn)
  sens, spec = tp / (tp + fn), tn / (tn + fp)
  assert_scores(got, {
      "sensitivity": sens, "specificity": spec, "ppv": tp / (tp + fp), "npv": tn / (tn + fn),
      "balanced_accuracy": (sens + spec) / 2, "f1": 2 * tp / (2 * tp + fp + fn),
      "accuracy": (tp + tn) / 300, "auc": mann_whitney_auc(labels, probs.astype(np.float64)),
  })


def test_undefined_values_are_none_and_json_safe():
  nobody_flagged = cm.binary(LABELS, PROBS, 0.95)
  assert nobody_flagged["ppv"] is None and nobody_flagged["f1"] == 0.0  # 6 missed positives: F1 is 0
  healthy_only = cm.binary(np.zeros(4, np.int64), np.array([0.1, 0.2, 0.3, 0.4]), 0.99)
  for key in ("auc", "sensitivity", "balanced_accuracy", "ppv", "f1"):
    assert healthy_only[key] is None, key
  assert healthy_only["specificity"] == 1.0 and healthy_only["npv"] == 1.0
  sick_only = cm.binary(np.ones(3, np.int64), np.array([0.1, 0.5, 0.9]), 0.0)
  for key in ("auc", "specificity", "npv", "balanced_accuracy"):
    assert sick_only[key] is None, key
  assert sick_only["sensitivity"] == 1.0
  for scores in (nobody_flagged, healthy_only, sick_only):
    json.dumps(scores, allow_nan=False)


# --- choosing a threshold -----------------------------------------------------


@pytest.mark.parametrize("target,value,expected", [
    ("sensitivity", 0.8, 0.5),  # 5/6 of positives reach 0.5; at 0.6 only 4/6
    ("sensitivity", 0.5, 0.7),  # exactly 3/6 at 0.7: equality meets the target
    ("sensitivity", 1.0, 0.4),
    ("specificity", 0.75, 0.6),  # 3/4 negatives below 0.6; at 0.5 only 2/4
    ("specificity", 1.0, 0.7),  # the smallest probability above the top negative, 0.65
    ("youden", None, 0.7),  # 0.5 + 1 - 1 = 0.5, the best of the ten
])
def test_choose_threshold_by_hand(target, value, expected):
  assert cm.choose_threshold(LABELS, PROBS, target=target, value=value) == expected


def _seeded(n=400, seed=2):
  rng = np.random.default_rng(seed)
  labels = (rng.random(n) < 0.74).astype(np.int64)
  probs = np.round(np.clip(0.25 * labels + 0.75 * rng.random(n), 0, 1), 2)  # with ties
  return labels, probs


@pytest.mark.parametrize("value", [0.5, 0.9, 0.95, 0.99, 1.0])
def test_sensitivity_target_is_met_and_the_next_larger_probability_misses(value):
  labels, probs = _seeded()
  t = cm.choose_threshold(labels, probs, target="sensitivity", value=value)
  assert t in probs
  assert rates(labels, probs, t)[0] >= value
  larger = np.unique(probs[probs > t])
  assert larger.size == 0 or rates(labels, probs, larger[0])[0] < value


@pytest.mark.parametrize("value", [0.3, 0.6, 0.9, 1.0])
def test_specificity_target_is_met_and_the_next_smaller_probability_misses(value):
  labels, probs = _seeded()
  t = cm.choose_threshold(labels, probs, target="specificity", value=value)
  assert t in probs
  assert rates(labels, probs, t)[1] >= value
  smaller = np.unique(probs[probs < t])
  assert smaller.size == 0 or rates(labels, probs, smaller[-1])[1] < value


def test_youden_is_the_largest_threshold_of_best_index():
  labels, probs = _seeded()
  candidates = np.unique(probs)
  youden = np.array([sum(rates(labels, probs, c)) - 1 for c in candidates])
  best = candidates[np.isclose(youden, youden.max(), rtol=0, atol=1e-12)]
  assert cm.choose_threshold(labels, probs, target="youden") == best.max()


def test_specificity_out_of_reach_among_probabilities_predicts_nobody():
  labels, probs = np.array([0, 0, 1]), np.array([0.9, 0.9, 0.9])
  t = cm.choose_threshold(labels, probs, target="specificity", value=0.5)
  assert t > 0.9
  assert cm.binary(labels, probs, t)["specificity"] == 1.0


@pytest.mark.parametrize("kwargs,match", [
    ({"target": "ppv", "value": 0.9}, "target must be one of"),
    ({"target": "sensitivity", "value": 0.0}, r"in \(0, 1\]"),
    ({"target": "sensitivity", "value": 1.5}, r"in \(0, 1\]"),
    ({"target": "specificity", "value": None}, r"in \(0, 1\]"),
    ({"target": "sensitivity", "value": float("nan")}, "finite"),
])
def test_choose_threshold_rejects_bad_targets(kwargs, match):
  with pytest.raises(ValueError, match=match):
    cm.choose_threshold(LABELS, PROBS, **kwargs)


def test_choose_threshold_needs_the_class_its_target_counts():
  with pytest.raises(ValueError, match="class 1"):
    cm.choose_threshold(np.zeros(3, np.int64), np.array([0.1, 0.2, 0.3]), target="sensitivity", value=0.9)
  # Negatives alone suffice for specificity: 2 of 3 lie below 0.3.
  assert cm.choose_threshold(np.zeros(3, np.int64), np.array([0.1, 0.2, 0.3]),
                             target="specificity", value=0.6) == 0.3


# --- multi-class --------------------------------------------------------------

# Eight examples of three classes; argmax predictions 0 0 1 | 1 1 2 | 2 0.
MC_LABELS = np.array([0, 0, 0, 1, 1, 1, 2, 2])
MC_PROBS = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1],
                     [0.2, 0.5, 0.3], [0.1, 0.4, 0.5], [0.2, 0.1, 0.7], [0.6, 0.1, 0.3]])


def test_multiclass_counted_by_hand():
  got = cm.multiclass(MC_LABELS, MC_PROBS)
  # class 0: tp 2 fn 1 fp 1 of 5 others; class 1: tp 2 fn 1 fp 1 of 5; class 2: tp 1 fn 1 fp 1 of 6.
  sens, spec = [2 / 3, 2 / 3, 1 / 2], [4 / 5, 4 / 5, 5 / 6]
  assert got["per_class_sensitivity"] == pytest.approx(sens)
  assert got["per_class_specificity"] == pytest.approx(spec)
  ovr = [mann_whitney_auc((MC_LABELS == c).astype(int), MC_PROBS[:, c]) for c in range(3)]
  assert_scores(got, {
      "accuracy": 5 / 8, "balanced_accuracy": np.mean(sens), "sensitivity": np.mean(sens),
      "specificity": np.mean(spec), "f1": np.mean([4 / 6, 4 / 6, 2 / 4]), "auc": np.mean(ovr),
  })


def test_multiclass_matches_numpy_formulas_on_seeded_data():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 4, 400)
  logits = rng.normal(size=(400, 4)) + 1.5 * np.eye(4)[labels]
  probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
  pred = probs.argmax(1)
  got = cm.multiclass(labels, probs)
  tp = np.array([np.sum((pred == c) & (labels == c)) for c in range(4)])
  fp = np.array([np.sum((pred == c) & (labels != c)) for c in range(4)])
  fn = np.array([np.sum((pred != c) & (labels == c)) for c in range(4)])
  tn = 400 - tp - fp - fn
  assert got["per_class_sensitivity"] == pytest.approx(tp / (tp + fn))
  assert got["per_class_specificity"] == pytest.approx(tn / (tn + fp))
  ovr = [mann_whitney_auc((labels == c).astype(int), probs[:, c].astype(np.float64)) for c in range(4)]
  assert_scores(got, {"accuracy": np.mean(pred == labels), "f1": np.mean(2 * tp / (2 * tp + fp + fn)),
                      "balanced_accuracy": np.mean(tp / (tp + fn)), "auc": np.mean(ovr)})


def test_multiclass_with_an_absent_class():
  labels = np.array([0, 0, 1, 1, 0])
  probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.1, 0.7], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1]])
  got = cm.multiclass(labels, probs)
  assert got["auc"] is None
  assert got["per_class_sensitivity"] == [2 / 3, 1.0, None]
  assert got["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)  # over the classes present
  assert got["per_class_specificity"][2] == pytest.approx(4 / 5)  # one of five wrongly called 2
  json.dumps(got, allow_nan=False)


def test_two_class_multiclass_auc_is_the_binary_auc():
  labels, p = _seeded(100)
  assert cm.multiclass(labels, np.stack([1 - p, p], 1))["auc"] == pytest.approx(mann_whitney_auc(labels, p))


# --- calibration --------------------------------------------------------------


def test_ece_of_a_calibrated_model_is_small():
  rng = np.random.default_rng(4)
  p = rng.random(20000)
  labels = (rng.random(20000) < p).astype(np.int64)  # class 1 happens with probability p
  assert cm.expected_calibration_error(labels, np.stack([1 - p, p], 1)) < 0.02


def test_ece_of_an_overconfident_model_by_hand():
  # Five say 0.9 for class 0, three are right; five say 0.7 for class 1, four are right.
  probs = np.array([[0.9, 0.1]] * 5 + [[0.3, 0.7]] * 5)
  labels = np.array([0, 0, 0, 1, 1] + [1, 1, 1, 1, 0])
  assert cm.expected_calibration_error(labels, probs) == pytest.approx(0.5 * 0.3 + 0.5 * 0.1)
  # One bin holds all: |mean accuracy 0.7 - mean confidence 0.8|.
  assert cm.expected_calibration_error(labels, probs, bins=1) == pytest.approx(0.1)
  assert cm.expected_calibration_error(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]])) == 0.0


# --- input checks -------------------------------------------------------------


@pytest.mark.parametrize("labels,probs,match", [
    (LABELS.reshape(2, 5), PROBS, "1-D"),
    (LABELS.astype(float), PROBS, "integer"),
    (LABELS[:0], PROBS[:0], "non-empty"),
    (LABELS, PROBS[:9], "one entry per label"),
    (LABELS + 1, PROBS, "0 or 1"),
    (LABELS, PROBS * 2, r"\[0, 1\]"),
    (LABELS, np.where(PROBS > 0.8, np.nan, PROBS), "finite"),
])
def test_binary_rejects_bad_inputs(labels, probs, match):
  with pytest.raises(ValueError, match=match):
    cm.binary(labels, probs, 0.5)


@pytest.mark.parametrize("labels,probs,match", [
    (MC_LABELS, MC_PROBS[:, 0], r"\[N, K\]"),
    (MC_LABELS[:7], MC_PROBS, r"\[N, K\]"),
    (MC_LABELS, MC_PROBS * 0.9, "sum to 1"),
    (MC_LABELS + 1, MC_PROBS, r"\[0, 3\)"),
])
def test_multiclass_and_ece_reject_bad_inputs(labels, probs, match):
  with pytest.raises(ValueError, match=match):
    cm.multiclass(labels, probs)
  with pytest.raises(ValueError, match=match):
    cm.expected_calibration_error(labels, probs)


def test_bad_threshold_and_bins():
  with pytest.raises(ValueError, match="finite"):
    cm.binary(LABELS, PROBS, float("inf"))
  with pytest.raises(ValueError, match="bins"):
    cm.expected_calibration_error(MC_LABELS, MC_PROBS, bins=0)


# --- figures ------------------------------------------------------------------


def _open(path):
  image = Image.open(path)
  assert image.size == (clinical_png.SIZE, clinical_png.SIZE)
  return np.asarray(image.convert("RGB"))


def _has(pixels, color, x, y, r=2):
  """Whether `color` occurs within r pixels of column x, row y."""
  return bool(np.any(np.all(pixels[y - r:y + r + 1, x - r:x + r + 1] == color, axis=-1)))


def test_roc_png_of_a_perfect_classifier_hugs_the_left_and_top(tmp_path):
  labels = np.array([0] * 50 + [1] * 50)
  path = str(tmp_path / "roc.png")
  clinical_png.save_roc(labels, np.linspace(0, 1, 100), path, title="perfect")
  pixels = _open(path)
  for v in (0.1, 0.3, 0.5, 0.7, 0.9):
    assert _has(pixels, clinical_png.CURVE, *clinical_png.pixel(0, v)), f"left edge at {v}"
    assert _has(pixels, clinical_png.CURVE, *clinical_png.pixel(v, 1)), f"top edge at {v}"
  for v in (0.25, 0.5, 0.75):
    assert not _has(pixels, clinical_png.CURVE, *clinical_png.pixel(v, v), r=10)


def test_roc_png_of_a_random_classifier_follows_the_diagonal(tmp_path):
  rng = np.random.default_rng(5)
  labels, probs = rng.integers(0, 2, 4000), rng.random(4000)
  path = str(tmp_path / "roc.png")
  clinical_png.save_roc(labels, probs, path)
  pixels = _open(path)
  for v in (0.25, 0.5, 0.75):
    x, y = clinical_png.pixel(v, v)
    columns = np.flatnonzero(np.all(pixels[y] == clinical_png.CURVE, axis=-1))
    assert columns.size and np.all(np.abs(columns - x) < 0.08 * clinical_png.PLOT), v
    assert not _has(pixels, clinical_png.CURVE, *clinical_png.pixel(0, v))
    assert not _has(pixels, clinical_png.CURVE, *clinical_png.pixel(v, 1))


def test_roc_png_marks_the_operating_point(tmp_path):
  path = str(tmp_path / "roc.png")
  clinical_png.save_roc(LABELS, PROBS, path, threshold=0.5)
  # At 0.5: sensitivity 5/6, specificity 1/2 (counted above).
  assert _has(_open(path), clinical_png.POINT, *clinical_png.pixel(1 - 1 / 2, 5 / 6), r=1)


def test_roc_png_with_one_class_draws_no_curve(tmp_path):
  path = str(tmp_path / "roc.png")
  clinical_png.save_roc(np.zeros(4, np.int64), np.array([0.1, 0.2, 0.3, 0.4]), path, threshold=0.5)
  pixels = _open(path)
  assert not np.any(np.all(pixels == clinical_png.CURVE, axis=-1))


def test_calibration_png_shows_each_bins_accuracy_at_its_confidence(tmp_path):
  probs = np.array([[0.9, 0.1]] * 5 + [[0.3, 0.7]] * 5)  # the overconfident case above
  labels = np.array([0, 0, 0, 1, 1] + [1, 1, 1, 1, 0])
  path = str(tmp_path / "calibration.png")
  clinical_png.save_calibration(labels, probs, path, bins=10)
  pixels = _open(path)
  # Bins (0.8, 0.9] and (0.6, 0.7]: dots at (mean confidence, accuracy), bars beneath.
  assert _has(pixels, clinical_png.CURVE, *clinical_png.pixel(0.9, 0.6), r=1)
  assert _has(pixels, clinical_png.CURVE, *clinical_png.pixel(0.7, 0.8), r=1)
  assert _has(pixels, clinical_png.BAR, *clinical_png.pixel(0.85, 0.3), r=0)
  assert _has(pixels, clinical_png.BAR, *clinical_png.pixel(0.65, 0.4), r=0)
  # No confidence in (0.2, 0.3]: no bar there, and none above bin (0.8, 0.9]'s accuracy.
  assert not _has(pixels, clinical_png.BAR, *clinical_png.pixel(0.25, 0.05), r=3)
  assert not _has(pixels, clinical_png.BAR, *clinical_png.pixel(0.85, 0.7), r=3)
