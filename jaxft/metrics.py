"""What a run reports as it goes: log lines, the JSONL metrics file, the dashboards
(TensorBoard, wandb: `runtime/dashboards.py`) fed with it, terminal progress."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

import ml_collections

from jaxft.runtime import dashboards
from jaxft.runtime import storage


def is_primary() -> bool:
  """Whether this process writes logs, metrics and exports (process 0 of a multi-host run)."""
  import jax  # pylint: disable=g-import-not-at-top  (keeps `jaxft --help` free of JAX)
  return jax.process_index() == 0


def log(msg: str) -> None:
  """A line on stderr, from process 0 only."""
  if is_primary():
    print(msg, file=sys.stderr, flush=True)


class Board:
  """The dashboards of one workdir (TensorBoard's event file, a wandb run), open on
  process 0 from the first `JsonlWriter` given the config until `close_board`."""

  def __init__(self, sinks: list[Any]):
    self.sinks = sinks

  def scalars(self, step: int, values: dict[str, float]) -> None:
    for sink in self.sinks:
      sink.scalars(step, values)

  def image(self, step: int, tag: str, png: bytes) -> None:
    for sink in self.sinks:
      sink.image(step, tag, png)

  def text(self, step: int, tag: str, markdown: str) -> None:
    for sink in self.sinks:
      sink.text(step, tag, markdown)

  def flush(self) -> None:
    for sink in self.sinks:
      sink.flush()

  def close(self) -> None:
    for sink in self.sinks:
      sink.close()


# One board per workdir in this process: the loop's writer, a task's figures and
# samples, and a late eval (train._finished) all log into the same files.
_BOARDS: dict[str, Board] = {}


def open_board(workdir: str, config: ml_collections.ConfigDict) -> Board | None:
  """The open board of `workdir`, else a new one as config.log asks; None on other
  processes or when config.log asks for none."""
  key = storage.resolve(workdir)
  if key not in _BOARDS and is_primary():
    sinks = dashboards.open_sinks(workdir, config)
    if sinks:
      _BOARDS[key] = Board(sinks)
  return _BOARDS.get(key)


def board(workdir: str) -> Board | None:
  """The board open for `workdir` in this process, or None."""
  return _BOARDS.get(storage.resolve(workdir))


def close_board(workdir: str) -> None:
  """Flushes and closes the board of `workdir` (a no-op without one): at the end of
  training, however it ends."""
  found = _BOARDS.pop(storage.resolve(workdir), None)
  if found is not None:
    found.close()


def add_image(workdir: str, step: int, tag: str, path: str) -> None:
  """The PNG file at `path` (an eval figure) as image `tag` on the workdir's board, if open."""
  found = board(workdir)
  if found is not None:
    found.image(step, tag, dashboards.read_bytes(path))


def add_samples(workdir: str, step: int, tag: str, rows: list[dict[str, str]]) -> None:
  """LM samples ({"prompt", "reference", "generated"} rows) as text `tag` on the board, if open."""
  found = board(workdir)
  if found is not None:
    found.text(step, tag, dashboards.samples_markdown(rows))


class JsonlWriter:
  """Appends one JSON object per event to DIR/metrics.jsonl (appending across resumes),
  and its numbers to the workdir's board (TensorBoard, wandb) when one is open.

  `config`: open the board config.log asks for (once per workdir; `close_board`
  ends it); without, the writer feeds a board already open, if any.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict | None = None):
    self.path = storage.join(workdir, "metrics.jsonl")
    self.board = open_board(workdir, config) if config is not None else board(workdir)

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not is_primary():
      return
    values = {k: _plain(v) for k, v in metrics.items()}
    record = {"step": int(step), "split": split, **values}
    storage.append_text(self.path, json.dumps(record) + "\n")
    self.write_board(step, split, values)

  def write_board(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    """`metrics` to the board only, as `split/name` scalars; flushed, so a dashboard
    shows each log step as it happens."""
    if self.board is not None:
      self.board.scalars(step, dashboards.scalars(split, metrics))
      self.board.flush()


def records(workdir: str) -> list[dict[str, Any]]:
  """The objects of DIR/metrics.jsonl in file order ([] without the file)."""
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return []
  out = []
  for line in storage.read_text(path).splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      continue  # A line cut short by a kill mid-write.
  return out


def recorded_eval(workdir: str, step: int) -> dict[str, Any] | None:
  """The last eval metrics metrics.jsonl holds for `step` (without step and split), or None."""
  found = None
  for record in records(workdir):
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
               stream: TextIO = sys.stderr, unit: str = "step"):
    self.total, self.batch_size, self.every, self.stream = total, batch_size, max(every, 1), stream
    self._t0, self._s0 = time.perf_counter(), start
    self._bar = None
    self._quiet = not is_primary()
    if stream.isatty() and not self._quiet:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(initial=start, total=total, file=stream, unit=unit, dynamic_ncols=True)

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
