"""What a run reports as it goes: log lines, the JSONL metrics file, terminal progress."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from jaxft.runtime import storage


def is_primary() -> bool:
  """Whether this process writes logs, metrics and exports (process 0 of a multi-host run)."""
  import jax  # pylint: disable=g-import-not-at-top  (keeps `jaxft --help` free of JAX)
  return jax.process_index() == 0


def log(msg: str) -> None:
  """A line on stderr, from process 0 only."""
  if is_primary():
    print(msg, file=sys.stderr, flush=True)


class JsonlWriter:
  """Appends one JSON object per event to DIR/metrics.jsonl (appending across resumes)."""

  def __init__(self, workdir: str):
    self.path = storage.join(workdir, "metrics.jsonl")

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not is_primary():
      return
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
    storage.append_text(self.path, json.dumps(record) + "\n")


def recorded_eval(workdir: str, step: int) -> dict[str, Any] | None:
  """The last eval metrics metrics.jsonl holds for `step` (without step and split), or None."""
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return None
  found = None
  for line in storage.read_text(path).splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # A line cut short by a kill mid-write.
    if record.get("split") == "eval" and record.get("step") == step:
      found = {k: v for k, v in record.items() if k not in ("step", "split")}
  return found


def summary(metrics: dict[str, Any]) -> str:
  """`name value, ...` for a log line: counts as integers, the rest to 4 decimals."""
  fmt = lambda v: str(v) if isinstance(v, int) else f"{v:.4f}"
  return ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool))


def _plain(v: Any) -> Any:
  return v.item() if hasattr(v, "item") else v


class Progress:
  """A tqdm bar (loss, examples/s, ETA) on a terminal, else a plain line every `every` steps."""

  def __init__(self, start: int, total: int, batch_size: int, every: int,
               stream: TextIO = sys.stderr):
    self.total, self.batch_size, self.every, self.stream = total, batch_size, max(every, 1), stream
    self._t0, self._s0 = time.perf_counter(), start
    self._bar = None
    self._quiet = not is_primary()
    if stream.isatty() and not self._quiet:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(initial=start, total=total, file=stream, unit="step", dynamic_ncols=True)

  def examples_per_sec(self, step: int) -> float:
    elapsed = time.perf_counter() - self._t0
    return (step - self._s0) * self.batch_size / max(elapsed, 1e-9)

  def update(self, step: int, loss: float | None = None) -> None:
    rate = self.examples_per_sec(step)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if loss is not None:
        self._bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{rate:.1f}")
    elif loss is not None and not self._quiet and (step % self.every == 0 or step == self.total):
      eta = (self.total - step) * self.batch_size / max(rate, 1e-9)
      print(f"step {step}/{self.total} loss {loss:.4f} {rate:.1f} ex/s eta {eta:.0f}s",
            file=self.stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
