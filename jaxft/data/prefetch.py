"""Preparing the next batches on a background thread while the device computes.

Building a global batch (gathering rows, copying them to the devices) costs
host time on every step; done inline it sits between two steps. `Prefetch`
runs it `depth` steps ahead on one worker thread, in step order, so the
train loop only picks up finished batches. An error in the worker surfaces
at the step whose batch failed.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Callable


class Prefetch:
  """Batches `make(step)` for steps first..last, produced up to `depth` steps ahead."""

  def __init__(self, make: Callable[[int], Any], first: int, last: int, depth: int):
    self._make = make
    self._last = last
    self._depth = depth
    self._next = first  # The next step to submit.
    self._pending: collections.deque = collections.deque()
    self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
                  if depth > 0 else None)

  def _fill(self) -> None:
    while len(self._pending) < self._depth and self._next <= self._last:
      self._pending.append((self._next, self._pool.submit(self._make, self._next)))
      self._next += 1

  def get(self, step: int) -> Any:
    """The batch of `step`; steps must be asked for in order."""
    if self._pool is None:
      return self._make(step)
    self._fill()
    submitted, future = self._pending.popleft()
    if submitted != step:
      raise ValueError(f"asked for step {step}, next prepared is {submitted}")
    batch = future.result()
    self._fill()
    return batch

  def close(self) -> None:
    if self._pool is not None:
      for _, future in self._pending:
        future.cancel()
      self._pool.shutdown(wait=True)

  def __enter__(self) -> "Prefetch":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
