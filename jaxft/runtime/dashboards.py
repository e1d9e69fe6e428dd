"""TensorBoard event files in DIR/tensorboard/ and an optional Weights & Biases run.

They get what metrics.jsonl gets (`metrics.JsonlWriter` feeds them), plus the
eval PNGs and LM samples. The event file is written with TensorBoard's own
record framing and protos, in pure Python: tensorboardX imports torch whenever
it is installed (seconds per run) and TensorBoard's EventFileWriter imports
TensorFlow whenever that is; neither is needed to write a file. The file
itself goes through runtime/storage, so a gs:// workdir works as for
metrics.jsonl (rewritten whole at each flush).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import socket
import struct
import time
from typing import Any, Iterator

import ml_collections

from jaxft.errors import UserError
from jaxft.runtime import storage

EVENTS_DIR = "tensorboard"  # Below the workdir.
_EVENTS_PREFIX = "events.out.tfevents."  # TensorBoard reads the files whose name has it.


def scalars(split: str, metrics: dict[str, Any]) -> dict[str, float]:
  """{"split/name": value} for each number in `metrics`; a dict's numbers as
  split/name/key (per-class recall), and None, text and lists left out."""
  out = {}
  for name, value in metrics.items():
    if isinstance(value, dict):
      out.update(scalars(f"{split}/{name}", value))
    elif isinstance(value, (int, float)):  # bool too: a flag plots as 0 / 1.
      out[f"{split}/{name}"] = float(value)
  return out


def samples_markdown(rows: list[dict[str, str]]) -> str:
  """LM eval samples as Markdown for TensorBoard's text tab: each field an
  indented code block, which keeps line breaks and any backticks a reply holds."""
  parts = []
  for i, row in enumerate(rows, 1):
    parts.append(f"### sample {i}")
    for field, text in row.items():
      block = "\n".join("    " + line for line in str(text).splitlines() or [""])
      parts.append(f"**{field}**\n\n{block}")
  return "\n\n".join(parts)


class EventFile:
  """One TensorBoard event file, new for each run session (a resume adds one)."""

  def __init__(self, folder: str):
    # Imported here: TensorBoard's protos are for runs that log, not for every command.
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.text import summary_v2 as text_summary
    from tensorboard.summary.writer import record_writer
    # pylint: enable=g-import-not-at-top
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    self._text_pb, self._records = text_summary.text_pb, record_writer.RecordWriter
    storage.makedirs(folder)
    # Named as TensorBoard's writers name theirs; the time in front keeps sessions in order.
    name = f"{_EVENTS_PREFIX}{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    self.path = storage.join(folder, name)
    self._pending: list[bytes] = []
    self._written = b""  # A remote file's content so far (objects cannot grow).
    self._add(self._event(wall_time=time.time(), file_version="brain.Event:2"))
    self.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if values:
      self._summarise(step, [self._summary.Value(tag=t, simple_value=v)
                             for t, v in values.items()])

  def image(self, step: int, tag: str, png: bytes) -> None:
    """A PNG as is (not decoded and encoded again)."""
    width, height = struct.unpack(">II", png[16:24])  # The IHDR chunk, first in every PNG.
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(png[25], 3)  # From the PNG colour type.
    image = self._summary.Image(height=height, width=width, colorspace=channels,
                                encoded_image_string=png)
    self._summarise(step, [self._summary.Value(tag=tag, image=image)])

  def text(self, step: int, tag: str, markdown: str) -> None:
    self._summarise(step, list(self._text_pb(tag, markdown).value))

  def flush(self) -> None:
    """Writes the events added since the last flush (a remote file: all of it again)."""
    data, self._pending = b"".join(self._pending), []
    if not data:
      return
    if storage.is_remote(self.path):
      self._written += data
      storage.write_bytes(self.path, self._written)
    else:
      with open(self.path, "ab") as f:
        f.write(data)

  def close(self) -> None:
    self.flush()  # Each flush leaves a complete file: nothing is held open.

  def _summarise(self, step: int, values: list[Any]) -> None:
    self._add(self._event(wall_time=time.time(), step=int(step),
                          summary=self._summary(value=values)))

  def _add(self, event: Any) -> None:
    buffer = io.BytesIO()  # TFRecord framing: length, data and their checksums.
    self._records(buffer).write(event.SerializeToString())
    self._pending.append(buffer.getvalue())


def read_bytes(path: str) -> bytes:
  """The bytes of a file, local or gs:// (runtime/storage reads only text)."""
  if not storage.is_remote(path):
    with open(path, "rb") as f:
      return f.read()
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(storage.resolve(path)).read_bytes()  # resolve: the emulator, if set.


def read_events(data: bytes) -> Iterator[Any]:
  """The Event protos of an event file's bytes (checksums not checked; a record cut
  short by a kill ends the file)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  at = 0
  while at + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    end = at + 12 + length
    if end + 4 > len(data):
      return
    yield event_pb2.Event.FromString(data[at + 12:end])
    at = end + 4


def event_files(workdir: str) -> list[str]:
  """The event files of the run in `workdir`, oldest session first."""
  folder = storage.join(workdir, EVENTS_DIR)
  return [storage.join(folder, n) for n in storage.listdir(folder) if n.startswith(_EVENTS_PREFIX)]


class Wandb:
  """A Weights & Biases run of the workdir, resumed by a rerun (its id is the workdir's)."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    # No network is the safe default: the run is kept in DIR/wandb/ for `wandb sync`.
    os.environ.setdefault("WANDB_MODE", "offline")
    import wandb  # pylint: disable=g-import-not-at-top  (an optional extra)
    self._wandb = wandb
    where = storage.resolve(workdir)
    self._run = wandb.init(
        project="jaxft", name=os.path.basename(where), config=config.to_dict(),
        id=hashlib.sha1(where.encode()).hexdigest()[:16], resume="allow",
        dir=None if storage.is_remote(where) else where)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if values:
      self._run.log(values, step=int(step))

  def image(self, step: int, tag: str, png: bytes) -> None:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    self._run.log({tag: self._wandb.Image(Image.open(io.BytesIO(png)))}, step=int(step))

  def text(self, step: int, tag: str, markdown: str) -> None:
    del step, tag, markdown  # DIR/samples/ has them; wandb has no plain text panel.

  def flush(self) -> None:
    pass

  def close(self) -> None:
    self._run.finish()


def check(config: ml_collections.ConfigDict) -> None:
  """Raises UserError when config.log asks for a dashboard whose package is missing."""
  if config.get("log", {}).get("wandb", False) and importlib.util.find_spec("wandb") is None:
    raise UserError("config.log.wandb=True needs the wandb package: `pip install wandb` "
                    "(or set config.log.wandb=False)")


def open_sinks(workdir: str, config: ml_collections.ConfigDict) -> list[Any]:
  """The dashboards config.log asks for, opened for `workdir` (call on process 0 only)."""
  log = config.get("log", {})
  sinks: list[Any] = []
  if log.get("tensorboard", True):
    sinks.append(EventFile(storage.join(workdir, EVENTS_DIR)))
  if log.get("wandb", False):
    check(config)
    sinks.append(Wandb(workdir, config))
  return sinks
