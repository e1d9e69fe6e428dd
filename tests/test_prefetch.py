"""The background batch prefetch: same batches, same order, errors where they belong."""

import threading

import pytest

from jaxft.data import prefetch


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_returns_every_step_s_batch_in_order(depth):
  threads = set()

  def make(step):
    threads.add(threading.current_thread().name)
    return step * 10

  with prefetch.Prefetch(make, 3, 9, depth) as upcoming:
    assert [upcoming.get(s) for s in range(3, 10)] == [s * 10 for s in range(3, 10)]
  # Inline without depth; on the worker thread with it.
  assert (threads == {threading.current_thread().name}) == (depth == 0)


def test_prefetch_never_builds_past_the_last_step():
  made = []
  with prefetch.Prefetch(made.append, 1, 2, 4) as upcoming:
    upcoming.get(1), upcoming.get(2)
  assert made == [1, 2]


def test_a_failing_batch_raises_at_its_own_step():
  def make(step):
    if step == 3:
      raise OSError("unreadable shard")
    return step

  with prefetch.Prefetch(make, 1, 5, 2) as upcoming:
    assert upcoming.get(1) == 1 and upcoming.get(2) == 2
    with pytest.raises(OSError, match="unreadable"):
      upcoming.get(3)


def test_steps_out_of_order_are_refused():
  with prefetch.Prefetch(lambda s: s, 1, 5, 2) as upcoming:
    with pytest.raises(ValueError, match="step 2"):
      upcoming.get(2)
