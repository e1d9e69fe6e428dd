"""ROC curve and reliability diagram as PNGs a clinician can read, drawn with PIL.

Both figures are SIZE x SIZE pixels with a square plot of the unit square:
x = 0 at column LEFT, y = 0 at row TOP + PLOT (PIL rows grow downwards).
Written through `storage.write_bytes`, so gs:// paths work.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from sklearn import metrics

from jaxft.runtime import storage
from jaxft.tasks import clinical_metrics

SIZE, LEFT, TOP, PLOT = 360, 50, 40, 280
CURVE = (31, 119, 180)  # the ROC curve and the reliability points
POINT = (214, 39, 40)  # the operating point
BAR = (166, 206, 227)
_CHANCE = (150, 150, 150)


def pixel(x: float, y: float) -> tuple[int, int]:
  """The (column, row) of the plot point (x, y), x and y in [0, 1]."""
  return round(LEFT + x * PLOT), round(TOP + (1 - y) * PLOT)


def save_roc(labels: np.ndarray, positive_probs: np.ndarray, path: str, *,
             threshold: float | None = None, title: str = "") -> None:
  """Writes the ROC curve of positive-class probabilities to `path` as PNG.

  Draws the curve (sensitivity against 1 - specificity), the chance diagonal
  and, when `threshold` is given, the operating point there as a dot labelled
  with its sensitivity and specificity; the title gives the AUC. With one
  class only in `labels` the ROC is undefined: the figure says so, with no curve.
  """
  scores = clinical_metrics.binary(labels, positive_probs, 0.5 if threshold is None else threshold)
  image, draw = _canvas("1 - specificity (false positive rate)", "sensitivity")
  _chance(draw)
  auc = scores["auc"]
  if auc is None:
    heading = "ROC undefined: one class only in labels"
  else:
    fpr, tpr, _ = metrics.roc_curve(np.asarray(labels), np.asarray(positive_probs, np.float64))
    draw.line([pixel(x, y) for x, y in zip(fpr, tpr)], fill=CURVE, width=3, joint="curve")
    heading = f"ROC AUC {auc:.3f}"
    if threshold is not None:
      _operating_point(draw, scores)
  draw.text((4, 4), f"{title}  {heading}" if title else heading, fill="black")
  _write(image, path)


def save_calibration(labels: np.ndarray, probs: np.ndarray, path: str, bins: int = 10) -> None:
  """Writes the reliability diagram of [N, K] class probabilities to `path` as PNG.

  Per equal-width bin of top-class confidence: a bar of the bin's accuracy
  over the bin's span and a dot at (mean confidence, accuracy); the diagonal
  is perfect calibration. The title gives the ECE over the same `bins`.
  """
  edges, confidence, accuracy, count = clinical_metrics.reliability(labels, probs, bins)
  ece = clinical_metrics.expected_calibration_error(labels, probs, bins)
  image, draw = _canvas("confidence (top class)", "accuracy")
  for i in np.flatnonzero(count):
    (x0, y0), (x1, y1) = pixel(edges[i], accuracy[i]), pixel(edges[i + 1], 0.0)
    if y1 > y0:  # a zero-height bar is no bar
      draw.rectangle([x0, y0, x1, y1 - 1], fill=BAR, outline="white")
  _chance(draw)
  for i in np.flatnonzero(count):
    _dot(draw, pixel(confidence[i], accuracy[i]), CURVE)
  draw.text((4, 4), f"reliability  ECE {ece:.3f} ({bins} bins, n={int(count.sum())})", fill="black")
  _write(image, path)


def _canvas(x_label: str, y_label: str) -> tuple[Any, Any]:
  """A white image with the plot frame, ticks at 0, 0.5 and 1, and axis labels."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  image = Image.new("RGB", (SIZE, SIZE), "white")
  draw = ImageDraw.Draw(image)
  (left, bottom), (right, top) = pixel(0, 0), pixel(1, 1)
  draw.rectangle([left, top, right, bottom], outline="black")
  for v in (0.0, 0.5, 1.0):
    text = f"{v:g}"
    x, _ = pixel(v, 0)
    draw.line([x, bottom, x, bottom + 4], fill="black")
    draw.text((x - draw.textlength(text) / 2, bottom + 6), text, fill="black")
    _, y = pixel(0, v)
    draw.line([left - 4, y, left, y], fill="black")
    draw.text((left - 7 - draw.textlength(text), y - 5), text, fill="black")
  draw.text((left + (PLOT - draw.textlength(x_label)) / 2, bottom + 22), x_label, fill="black")
  draw.text((left, top - 16), y_label, fill="black")
  return image, draw


def _chance(draw: Any) -> None:
  """The diagonal, dashed so a curve on top of it stays visible."""
  steps = 40
  for i in range(0, steps, 2):
    draw.line([pixel(i / steps, i / steps), pixel((i + 1) / steps, (i + 1) / steps)], fill=_CHANCE)


def _operating_point(draw: Any, scores: dict[str, Any]) -> None:
  sens, spec = scores["sensitivity"], scores["specificity"]
  x, y = pixel(1 - spec, sens)
  _dot(draw, (x, y), POINT)
  text = f"sens {sens:.2f} spec {spec:.2f} @ {scores['threshold']:.3g}"
  width = draw.textlength(text)
  # Right of the dot and below it, unless that runs off the plot.
  tx = x + 8 if x + 8 + width <= SIZE - 2 else x - 8 - width
  ty = y + 6 if y + 18 <= TOP + PLOT else y - 18
  draw.text((tx, ty), text, fill=POINT)


def _dot(draw: Any, center: tuple[int, int], color: tuple[int, int, int]) -> None:
  x, y = center
  draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)


def _write(image: Any, path: str) -> None:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  storage.write_bytes(path, buffer.getvalue())
