"""Deterministic, resumable batching of in-memory example arrays.

Batch `i` of training is a pure function of (seed, i): grain's random-access
shuffle reorders each epoch with its own seed, so resuming at step `i` needs no
iterator state beyond the step itself.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import grain
import numpy as np

Examples = Mapping[str, np.ndarray]


def num_examples(examples: Examples) -> int:
  return len(next(iter(examples.values())))


class TrainBatches:
  """Random-access training batches: `batches[step]` -> dict of [batch_size, ...] arrays."""

  def __init__(self, examples: Examples, batch_size: int, seed: int):
    n = num_examples(examples)
    self._examples = examples
    self._indices = (grain.MapDataset.range(n).shuffle(seed=seed).repeat()
                     .batch(batch_size, drop_remainder=True))

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    idx = np.asarray(self._indices[step])
    return {k: v[idx] for k, v in self._examples.items()}

  def lazy(self, step: int) -> dict[str, Rows]:
    """Batch `step` as views that gather only the rows asked for (a process's slice)."""
    idx = np.asarray(self._indices[step])
    return {k: Rows(v, idx) for k, v in self._examples.items()}


class Rows:
  """`column[indices]`, gathered lazily: `rows[a:b]` reads only rows a..b."""

  def __init__(self, column: np.ndarray, indices: np.ndarray):
    self._column, self._indices = column, indices
    self.shape = (len(indices), *column.shape[1:])
    self.dtype = column.dtype

  def __getitem__(self, index) -> np.ndarray:
    first, *rest = index if isinstance(index, tuple) else (index,)
    return self._column[self._indices[first]][(slice(None), *rest)]


def eval_batches(examples: Examples, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape batches in order; the last is padded and `weight` marks real rows."""
  n = num_examples(examples)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    weight = (idx < n).astype(np.float32)
    idx = np.minimum(idx, n - 1)
    batch = {k: v[idx] for k, v in examples.items()}
    batch["weight"] = weight
    yield batch
