"""`jaxft predict`: a trained model's predictions on new data, one JSON line per input.

Classifiers (text, text pairs, images, DICOM) write, in input order,
`{"id", "label", "score", "probs"}`, plus `true_label` where the input holds
one (a label column, a class subfolder, a labels array): `label` is the class
`jaxft eval` would predict (two classes with a decision threshold kept with
the checkpoint, config.decision: class 1 iff its probability >= it), `score`
its probability and `probs` every class's. `id` is the row (or the input's
`id` column) for tables and arrays, the file path for image files. An
unreadable image, with config.data.skip_bad, gives `{"id", "error"}` in its
place. Language models (tasks that generate text) complete each prompt of a
file (jsonl / json / csv / parquet with `prompt` or `messages`, or .txt with
one prompt a line) and write `{"id", "prompt", "completion"}`.

Which model, and which config (preprocessing, labels, threshold):
  --workdir=DIR: the latest checkpoint of the run, with its config (what the
    CLI passes, `--config.KEY=VALUE` overrides on top) and labels.json.
  --workdir=DIR --model=HF_DIR: the run's config and labels with the weights
    of an exported folder (`jaxft export`); the threshold kept with the
    checkpoint that folder was exported from, when DIR still keeps it.
  --model=HF_DIR alone: as with --workdir, the run the folder was exported
    from (its jaxft_export.json) when that workdir is still there; else
    `--config` when given; else the defaults of the task the folder's
    architecture names (text column `text`, max_length 128 or the model's
    limit; images at the folder's size and normalisation; a language model
    generates), labels from its config.json.

The input is read, encoded and run a chunk at a time, the next chunk
prepared on a thread while the device runs this one, in batches of
`batch_size` (default config.train.eval_batch_size): every batch has that
shape (one compile), the last padded and its padding dropped. (Prompts are
padded to a multiple of 64 tokens: a compile per length bucket; a file
smaller than a batch is one batch of its size.) Output goes to stdout (logs
stay on stderr), or to a file written whole: a temporary file renamed once
every line is in, so a failure leaves nothing at `out`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, TextIO

import datasets
import ml_collections
import numpy as np

from jaxft import checkpoint
from jaxft import config as config_lib
from jaxft import generate
from jaxft import metrics
from jaxft import run as run_lib
from jaxft import tasks
from jaxft.data import batches as batches_lib
from jaxft.data import image_files
from jaxft.data import image_prep
from jaxft.data import prefetch
from jaxft.data import sources
from jaxft.data import text
from jaxft.errors import UserError
from jaxft.formats import export_dir
from jaxft.formats import gguf
from jaxft.formats import hub
from jaxft.models import registry
from jaxft.runtime import run_record
from jaxft.runtime import storage
from jaxft.tasks import classify
from jaxft.tasks import image_classify

log = metrics.log

# Rows encoded per chunk (rounded to whole batches): big enough that tokenizing or decoding
# runs in bulk, small enough that a chunk of 224 x 224 RGB images stays near 75 MB.
_CHUNK_ROWS = 512
# Prompt lengths rounded up to this many tokens: few distinct shapes, few compiles.
_PROMPT_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class Generation:
  """How a language model completes prompts (`jaxft generate`'s flags)."""
  max_new_tokens: int = 128
  sampling: generate.Sampling = generate.Sampling()
  stop: tuple[str, ...] = ()
  seed: int = 0
  chat: bool = False  # Wrap each `prompt` in the chat template as one user turn.


def predict(config: ml_collections.ConfigDict | None, workdir: str | None, input_spec: str, *,
            out: str | None = None, batch_size: int | None = None, model: str | None = None,
            generation: Generation = Generation()) -> dict[str, Any]:
  """Writes the predictions of a run (or an exported model) on `input_spec` as JSON lines.

  `config`: the run's (None: read from `workdir`) or a recipe; `model`: an
  exported HF folder whose weights predict instead of the checkpoint (see the
  module doc for the config each combination uses). Lines go to stdout, or to
  `out` once all are written. Returns a summary: rows, seconds, rows_per_sec,
  out, and for classifiers the count of each predicted label and of skipped
  unreadable images.

  Raises:
    UserError: no model named, a missing or empty input, an input without the
      columns the task reads, a workdir without a checkpoint, or a model
      folder whose labels differ from the run's.
  """
  if workdir is None and model is None:
    raise UserError("predict needs --workdir=DIR (a run's latest checkpoint) or "
                    "--model=HF_DIR (an exported model)")
  if batch_size is not None and batch_size < 1:
    raise UserError(f"--batch_size must be >= 1, got {batch_size}")
  _check_out(out, input_spec)
  stdout = sys.stdout
  # Anything a library prints while loading goes to stderr: stdout holds only JSON lines.
  with contextlib.redirect_stdout(sys.stderr):
    config, workdir, export = _resolve(config, workdir, model)
    config = _with_batch_size(config, batch_size)
    task = tasks.of(config)
    if task.generates_text:
      rows, total, counts = _completions(config, workdir, model, input_spec, generation)
    elif task.has_labels:
      rows, total, counts = _classifications(config, task, workdir, export, input_spec)
    else:
      raise UserError(f"predict supports classifiers and language models, not "
                      f"{task.name} runs")
    t0 = time.perf_counter()
    with _output(out, stdout) as sink:
      n = _write(rows, total, sink)
    seconds = time.perf_counter() - t0
  log(f"predicted {n} rows in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} rows/s)"
      + (f": {out}" if out else ""))
  summary = {"out": out, "rows": n, "seconds": round(seconds, 3),
             "rows_per_sec": round(n / max(seconds, 1e-9), 2)}
  return {**summary, **counts}


# ------------------------------------------------------------------ config and model


@dataclasses.dataclass(frozen=True)
class _Export:
  """An exported model folder to predict with: where, its labels, its checkpoint's meta."""
  path: str
  labels: list[str] | None
  meta: dict


def _resolve(config: ml_collections.ConfigDict | None, workdir: str | None, model: str | None
             ) -> tuple[ml_collections.ConfigDict, str | None, _Export | None]:
  """(config, workdir, the export to predict with or None) for the module doc's cases."""
  if workdir is not None:
    run_record.require_workdir(workdir)
    storage.check_shared(workdir)
    config = config if config is not None else run_record.saved_config(workdir)
  if model is None:
    return config, workdir, None
  local = hub.resolve_model(model)
  manifest = _manifest(local)
  if manifest and manifest.get("format") == "peft":
    raise UserError(f"{model} is a LoRA adapter (jaxft export --format=peft): predict with "
                    "--workdir=DIR, or export with --format=hf")
  if config is None and _is_run(manifest and manifest.get("workdir")):
    workdir = manifest["workdir"]
    log(f"{model} was exported from {workdir}: predicting with that run's config and labels")
    config = run_record.saved_config(workdir)
  if config is None:
    config = _defaults_for(local, model)
  config = _for_export(config, local)
  task = tasks.of(config)
  labels = None
  if task.has_labels:
    labels = _export_labels(local, workdir)
  meta = _export_meta(config, workdir, manifest, local) if task.has_labels else {}
  if meta.get("decision") and not config.decision.target:
    # A folder alone gets defaults without a target: the export's own decides.
    config = config.copy_and_resolve_references()
    config.decision.target = meta["decision"]["target"]
    config.decision.value = float(meta["decision"]["value"])
  return config, workdir, _Export(local, labels, meta)


def _manifest(folder: str) -> dict | None:
  """The jaxft_export.json of an exported folder (format, step, workdir), or None."""
  path = os.path.join(folder, export_dir.MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    found = json.loads(storage.read_text(path))
  except (ValueError, UserError):
    return None  # Not ours to judge: the weights still load.
  return found if isinstance(found, dict) else None


def _is_run(workdir: Any) -> bool:
  """Whether `workdir` (as an export's manifest names it) is a run folder still there."""
  if not isinstance(workdir, str) or not workdir:
    return False
  try:
    return run_record.latest_file(workdir) is not None
  except (UserError, OSError):
    return False  # Gone, or a bucket out of reach: the folder alone decides.


def _text_defaults() -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.data.text_key, c.data.text_pair_key, c.data.label_key = "text", "", "label"
  return c


# A task kind (models/registry.py) -> the defaults of its config, for a model folder alone.
_DEFAULTS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    classify.Classify.model_kind: _text_defaults,
    image_classify.ImageClassify.model_kind: config_lib.image_classify,
    tasks.CausalLM.model_kind: config_lib.causal_lm,
}


def _defaults_for(local: str, model: str) -> ml_collections.ConfigDict:
  """Defaults for the task the folder's config.json architecture names (a GGUF: an LM)."""
  if gguf.is_gguf(local):
    return _DEFAULTS[tasks.CausalLM.model_kind]()
  raw = hub.config_json(local) or {}
  architectures = tuple(raw.get("architectures") or ())
  kinds = [kind for kind, specs in registry.MODELS.items()
           if any(spec.architecture in architectures for spec in specs.values())]
  if not kinds or kinds[0] not in _DEFAULTS:
    raise UserError(f"cannot tell what {model} predicts: its config.json names architectures "
                    f"{list(architectures)}; add --workdir=DIR (the run it was exported "
                    "from) or --config=RECIPE")
  config = _DEFAULTS[kinds[0]]()
  config.task = kinds[0]  # The registry's kinds are spelled as config.task.
  positions = raw.get("max_position_embeddings")
  if "text_key" in config.data and isinstance(positions, int):
    config.data.max_length = min(config.data.max_length, positions)  # A small model's limit.
  return config


def _for_export(config: ml_collections.ConfigDict, local: str) -> ml_collections.ConfigDict:
  """`config` reading the exported folder: its weights are whole (LoRA merged, float32)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.path = local
    config.model.from_scratch = False
    config.model.frozen_dtype = "float32"
    config.lora.rank = 0
    # Nothing trains, and the run's rules may name parameters (adapters) the export lacks.
    config.optim.rules = ()
    config.optim.layer_decay = 0.0
  return config


def _export_labels(local: str, workdir: str | None) -> list[str]:
  """The folder's class names; with a workdir, UserError unless they are the run's."""
  raw = hub.load_hf_config(local).id2label
  names = [raw[i] for i in sorted(raw)]
  if workdir is None:
    return names
  labels = run_lib.read_labels(workdir)
  if labels is None:
    raise UserError(f"{workdir} is not a jaxft workdir (no labels.json)")
  if labels != names:
    raise UserError(f"{local} classifies into {names}, but the run in {workdir} into {labels}: "
                    "it was not exported from this run")
  return labels


def _export_meta(config: ml_collections.ConfigDict, workdir: str | None,
                 manifest: dict | None, local: str) -> dict:
  """The decision threshold of an export: the one its config.json keeps
  (`classify.EXPORT_DECISION`), else that of the checkpoint it came from, where
  `workdir` is its run and still keeps it; else {} (a threshold of 0.5)."""
  kept = getattr(hub.load_hf_config(local), classify.EXPORT_DECISION, None)
  if isinstance(kept, dict) and "threshold" in kept:
    return {"decision": kept}
  if workdir is None or not manifest or manifest.get("workdir") != storage.resolve(workdir):
    return {}
  ckpt = checkpoint.Checkpointer.of(workdir, config)
  try:
    step = manifest.get("step")
    if step not in ckpt.all_steps():
      log(f"{workdir} no longer keeps checkpoint {step}, which was exported: "
          "no decision threshold")
      return {}
    return ckpt.meta(step)
  finally:
    ckpt.close()


def _with_batch_size(config: ml_collections.ConfigDict, batch_size: int | None
                     ) -> ml_collections.ConfigDict:
  """`config` with eval_batch_size = `batch_size`: the size every forward batch has (and
  that the mesh must split)."""
  if batch_size is None:
    return config
  config = config.copy_and_resolve_references()
  config.train.eval_batch_size = batch_size
  return config


def _open_classifier(config: ml_collections.ConfigDict, workdir: str | None,
                     export: _Export | None) -> tuple[run_lib.Run, str]:
  """(the run to predict with, its model folder): the checkpoint, or the export's weights."""
  if export is None:
    _, run, model_path = run_lib.restore(workdir, config=config)
    return run, model_path
  # An empty workdir: open_run loads the folder as a pretrained model, head included.
  with tempfile.TemporaryDirectory(prefix="jaxft-predict-") as empty:
    run = run_lib.open_run(config, empty, export.path, export.labels, quiet=True)
    run.checkpointer.close()
  if run.untrained:
    raise UserError(f"{export.path} has no trained classification head "
                    f"({', '.join(run.untrained[:3])} missing): export a trained run")
  run.meta = export.meta
  return run, export.path


# ------------------------------------------------------------------ classifiers


Rows = Iterator[dict[str, Any]]


class _Texts:
  """A table (or .txt, one text a line) of texts to classify, tokenized a chunk at a time."""

  def __init__(self, config: ml_collections.ConfigDict, spec: str):
    d = config.data
    self.keys = [d.text_key] + ([d.text_pair_key] if d.text_pair_key else [])
    self.max_length = d.max_length
    self.ds = _text_table(spec, self.keys, d.get("eval_split", "test"))
    self.ids = _ids(self.ds)
    self.truth = list(self.ds[d.label_key]) if d.label_key in self.ds.column_names else None
    if self.truth is not None and isinstance(self.ds.features[d.label_key],
                                             datasets.ClassLabel):
      names = self.ds.features[d.label_key].names
      self.truth = [names[t] if t is not None and 0 <= t < len(names) else None
                    for t in self.truth]
    self.texts = self.ds.select_columns(self.keys)
    self.tokenizer = None  # Set once the model is known.

  def __len__(self) -> int:
    return len(self.ds)

  def arrays(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], list[str | None]]:
    """(model inputs of rows start..stop-1, None per row: texts have no unreadable rows)."""
    rows = self.texts[start:stop]
    pairs = rows[self.keys[1]] if len(self.keys) > 1 else None
    encoded = text.encode(self.tokenizer, rows[self.keys[0]], pairs, max_length=self.max_length)
    return encoded, [None] * (stop - start)


def _text_table(spec: str, keys: list[str], split: str) -> datasets.Dataset:
  """A table with the text columns `keys`; a .txt file is one text a line (blank lines
  skipped)."""
  _not_a_folder(spec, "a csv / jsonl / json / parquet table of texts (or .txt, one a line)")
  if not spec.lower().endswith(".txt"):
    return sources.load_split(spec, split, required=keys)
  if len(keys) > 1:
    raise UserError(f"{spec}: a .txt input holds one text a line; a text-pair classifier "
                    f"(config.data.text_pair_key={keys[1]!r}) needs a table with both columns")
  lines = [l for l in _read_lines(spec) if l.strip()]
  if not lines:
    raise UserError(f"input {spec} is empty")
  return datasets.Dataset.from_dict({keys[0]: lines})


def _read_lines(spec: str) -> list[str]:
  if not storage.exists(spec):
    raise UserError(f"input not found: {spec}")
  return storage.read_text(spec).splitlines()


def _ids(ds: datasets.Dataset) -> list[Any]:
  """Each row's id: the table's `id` column, else its index."""
  return list(ds["id"]) if "id" in ds.column_names else list(range(len(ds)))


class _Images:
  """Image files, arrays or a table of images to classify, decoded a chunk at a time."""

  def __init__(self, task: image_classify.ImageClassify, spec: str):
    d = task.config.data
    self.input = task.input
    self.skip_bad = bool(d.skip_bad)
    self.data = image_files.open_unlabeled(spec, size=self.input.size, split=d.eval_split,
                                           image_key=d.image_key, label_key=d.label_key)
    self.ids, self.truth = self.data.ids, self.data.truth

  def __len__(self) -> int:
    return len(self.data)

  def arrays(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], list[str | None]]:
    """(pixels of the readable images of rows start..stop-1, per row None or why it is
    unreadable)."""
    images = self.data.read(start, stop)
    errors = [a if isinstance(a, str) else None for a in images]
    for i, err in enumerate(errors):
      if err is not None and not self.skip_bad:
        raise UserError(f"cannot read image {self.ids[start + i]}: {err} "
                        "(config.data.skip_bad=True reports such files and goes on)")
    good = [a[..., None] if a.ndim == 2 else a for a in images if not isinstance(a, str)]
    return {"pixels": self._pixels(good)}, errors

  def _pixels(self, images: list[np.ndarray]) -> np.ndarray:
    """uint8 model pixels as eval makes them (`image_prep.to_model_pixels`), image by image
    where sizes or channels differ."""
    size, channels = self.input.size, self.input.channels
    if not images:
      return np.zeros((0, *size, channels), np.uint8)
    if len({a.shape for a in images}) == 1:
      return image_prep.to_model_pixels(np.stack(images), size, channels)
    return np.concatenate([image_prep.to_model_pixels(a[None], size, channels) for a in images])


def _classifications(config: ml_collections.ConfigDict, task: classify.Classifier,
                     workdir: str | None, export: _Export | None, spec: str
                     ) -> tuple[Rows, int, dict[str, Any]]:
  """(the rows, how many, the counts they add up to once written) of a classifier."""
  # The input first: a missing file or column fails before the model loads.
  inputs = _Images(task, spec) if isinstance(task, image_classify.ImageClassify) else (
      _Texts(config, spec))
  run, model_path = _open_classifier(config, workdir, export)
  if isinstance(inputs, _Texts):
    inputs.tokenizer = hub.load_tokenizer(model_path)
  labels = list(run.hf_config.id2label[i] for i in range(len(run.hf_config.id2label)))
  # Not chosen on these data (they may have no labels): the one kept with the checkpoint.
  threshold = task.threshold(run, np.zeros(0, np.int32), np.zeros((0, len(labels))),
                             choose=False)
  counts = {"counts": dict.fromkeys(labels, 0), "skipped": 0}

  def rows() -> Rows:
    for i, probs, error in _classify_rows(task, run, inputs, config.train.eval_batch_size):
      if error is not None:
        counts["skipped"] += 1
        yield {"id": inputs.ids[i], "error": error}
        continue
      label = int(task.predictions(probs[None], threshold)[0])
      counts["counts"][labels[label]] += 1
      row = {"id": inputs.ids[i], "label": labels[label], "score": float(probs[label]),
             "probs": {name: float(p) for name, p in zip(labels, probs)}}
      truth = inputs.truth[i] if inputs.truth is not None else None
      if truth is not None:
        row["true_label"] = _label_name(truth, labels)
      yield row
  return rows(), len(inputs), counts


def _classify_rows(task: classify.Classifier, run: run_lib.Run, inputs: _Texts | _Images,
                   batch_size: int) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
  """(row, class probabilities or None, why it is unreadable or None) for every input row."""
  n = len(inputs)
  chunk = batch_size * max(1, _CHUNK_ROWS // batch_size)
  starts = range(0, n, chunk)
  with prefetch.Prefetch(lambda c: inputs.arrays(starts[c], min(starts[c] + chunk, n)),
                         0, len(starts) - 1, depth=1) as ahead:
    for c, start in enumerate(starts):
      arrays, errors = ahead.get(c)
      readable = batches_lib.num_examples(arrays)
      probs = np.zeros((0, 0), np.float32)
      if readable:
        # The eval step scores a label too: any, its loss goes unread.
        arrays = {**arrays, "label": np.zeros(readable, np.int32)}
        batches = batches_lib.eval_batches(arrays, batch_size)
        probs = np.concatenate([p for _, p in task.batch_outputs(run, batches)])
      k = 0
      for i, error in enumerate(errors):
        if error is None:
          yield start + i, probs[k], None
          k += 1
        else:
          yield start + i, None, error


def _label_name(value: Any, labels: list[str]) -> str:
  """A label as the input holds it, named as `jaxft eval` reads it: integers are ids."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return labels[int(value)] if 0 <= int(value) < len(labels) else str(value)
  return str(value)


# ------------------------------------------------------------------ language models


def _prompts(spec: str, split: str) -> tuple[list[Any], list[Any]]:
  """(ids, prompts) of a prompt file: a string per `prompt`, a message list per `messages`
  (a training row's closing assistant turns dropped: those are what the model writes)."""
  _not_a_folder(spec, "prompts: jsonl / json / csv / parquet with `prompt` or `messages`, "
                "or .txt, one a line")
  if spec.lower().endswith(".txt"):
    prompts = [l for l in _read_lines(spec) if l.strip()]
    if not prompts:
      raise UserError(f"input {spec} is empty")
    return list(range(len(prompts))), prompts
  ds = sources.load_split(spec, split)
  if "messages" in ds.column_names:
    prompts = [_conversation(m, spec, row) for row, m in enumerate(ds["messages"])]
  elif "prompt" in ds.column_names:
    sources.check_values(ds, ["prompt"], spec)
    prompts = [str(p) for p in ds["prompt"]]
  else:
    raise UserError(f"{spec} needs a 'prompt' or a 'messages' column (or use a .txt file, one "
                    f"prompt a line); its columns are {ds.column_names}")
  return _ids(ds), prompts


def _conversation(messages: Any, spec: str, row: int) -> list[dict[str, str]]:
  ok = isinstance(messages, list) and all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in messages)
  if not ok:
    raise UserError(f"{spec} row {row}: 'messages' must be a list of "
                    "{'role': str, 'content': str}")
  messages = list(messages)
  while messages and messages[-1]["role"] == "assistant":
    messages.pop()
  if not messages:
    raise UserError(f"{spec} row {row}: no message before the assistant's reply")
  return messages


def _completions(config: ml_collections.ConfigDict, workdir: str | None, model: str | None,
                 spec: str, generation: Generation) -> tuple[Rows, int, dict[str, Any]]:
  """(the rows, how many, {}) of a language model: a completion per prompt."""
  ids, prompts = _prompts(spec, config.data.get("eval_split", "test"))
  # With --model, _resolve pointed config.model.path at the export.
  lm, tokenizer = run_lib.language_model(
      workdir, model_path=config.model.path if model is not None else None, config=config)
  texts = [generate.chat_prompt(tokenizer, p) if isinstance(p, list) else
           generate.chat_prompt(tokenizer, [{"role": "user", "content": p}]) if generation.chat
           else p for p in prompts]
  # A file smaller than a batch is one batch of its own size: nothing to pad.
  size = min(config.train.eval_batch_size, len(texts))

  def rows() -> Rows:
    for b, start in enumerate(range(0, len(texts), size)):
      batch = texts[start:start + size]
      padded = batch + [batch[-1]] * (size - len(batch))  # The compiled batch shape.
      done = generate.complete(lm, tokenizer, padded, max_new_tokens=generation.max_new_tokens,
                               sampling=generation.sampling, stop=generation.stop,
                               seed=generation.seed + b, pad_multiple=_PROMPT_MULTIPLE)
      for i, completion in enumerate(done[:len(batch)]):
        yield {"id": ids[start + i], "prompt": prompts[start + i], "completion": completion}
  return rows(), len(texts), {}


# ------------------------------------------------------------------ output


def _check_out(out: str | None, input_spec: str) -> None:
  """UserError for an --out that is a folder or would replace the input."""
  if not out or storage.is_remote(out):
    return
  if os.path.isdir(out):
    raise UserError(f"--out={out} is a folder; name the JSON-lines file to write")
  if os.path.exists(input_spec) and os.path.realpath(out) == os.path.realpath(input_spec):
    raise UserError(f"--out={out} is the input file: write the predictions elsewhere")


def _not_a_folder(spec: str, what: str) -> None:
  """UserError for a folder where a file of `what` is read."""
  if not storage.is_remote(spec) and os.path.isdir(os.path.expanduser(spec)):
    raise UserError(f"--input={spec} is a folder; this model reads {what}")


@contextlib.contextmanager
def _output(out: str | None, stdout: TextIO) -> Iterator[TextIO]:
  """Where the lines go: `stdout`, or a temporary file put at `out` once all are written
  (renamed beside it; a gs:// URL uploaded whole). Only process 0 writes."""
  if not metrics.is_primary():
    yield io.StringIO()
    return
  if out is None:
    yield stdout
    return
  remote = storage.is_remote(out)
  folder = None if remote else os.path.dirname(os.path.abspath(out))
  if folder:
    os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(out)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      yield f
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the result private.
    if remote:
      with open(tmp, "rb") as f:
        storage.write_bytes(out, f.read())
      os.remove(tmp)
    else:
      os.replace(tmp, out)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _write(rows: Rows, total: int, sink: TextIO) -> int:
  """Writes each row as a JSON line, with a progress bar on a terminal; returns how many."""
  progress = metrics.Progress(0, total, batch_size=1, every=total, unit="row")
  n = 0
  try:
    for row in rows:
      sink.write(json.dumps(row, default=_plain) + "\n")
      n += 1
      if n % 64 == 0 or n == total:
        sink.flush()
        progress.update(n)
  finally:
    progress.close()
  return n


def _plain(value: Any) -> Any:
  """JSON for what an input's `id` column may hold beyond JSON's own types."""
  return value.item() if hasattr(value, "item") else str(value)
