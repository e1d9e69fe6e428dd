"""A confusion matrix as a PNG a person can read: counts in cells shaded by row share."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from jaxft.runtime import storage

_CELL, _MARGIN = 44, 120


def save(matrix: np.ndarray, names: Sequence[str], path: str, title: str = "") -> None:
  """Writes `matrix` (rows: true class, columns: predicted) to `path` as PNG.

  Each cell shows its count; its blue shade is the count's share of the row
  (the class's recall on the diagonal), so errors stand out at any class size.
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  n = len(names)
  size = _MARGIN + n * _CELL + 10
  image = Image.new("RGB", (size, size + 20), "white")
  draw = ImageDraw.Draw(image)
  rows = matrix.sum(1, keepdims=True)
  share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
  for i in range(n):
    for j in range(n):
      x, y = _MARGIN + j * _CELL, _MARGIN + i * _CELL
      shade = int(255 * (1 - share[i, j]))
      draw.rectangle([x, y, x + _CELL - 1, y + _CELL - 1], fill=(shade, shade, 255),
                     outline=(200, 200, 200))
      ink = "white" if share[i, j] > 0.5 else "black"
      draw.text((x + 4, y + _CELL // 2 - 5), str(int(matrix[i, j])), fill=ink)
  for k, name in enumerate(names):
    label = str(name)[:16]
    draw.text((4, _MARGIN + k * _CELL + _CELL // 2 - 5), label, fill="black")
    draw.text((_MARGIN + k * _CELL + 2, _MARGIN - 14 - 10 * (k % 2)), label[:6], fill="black")
  draw.text((4, 4), title or "rows: true class, columns: predicted", fill="black")
  draw.text((4, 20), "shade: share of the row", fill="gray")
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  storage.write_bytes(path, buffer.getvalue())
