"""The Task interface: everything that differs between jobs, asked by the rest of jaxft.

The loop (`train.py`), `jaxft inspect`, `jaxft eval / export / generate`
and `bench/` run the same code for every task and ask the task object for
the pieces below; none of them compares task names. Adding a task is one
module in this package that subclasses `Task`, plus its line in
`tasks/__init__.py`'s registry (and its model classes in `models/registry.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from jaxft import mfu
from jaxft import steps
from jaxft.data import batches as batches_lib
from jaxft.formats import hf
from jaxft.models import registry
from jaxft.tuning import trainable


@dataclasses.dataclass
class Data:
  """A task's examples: fixed-shape arrays per split, plus what else it needs.

  Attributes:
    train: training arrays, or None (eval and export do not need them).
    eval: eval arrays, or None when config.data.eval is empty.
    labels: class names (classification), else None.
    samples: (prompt, reference) pairs generated from at each eval (LMs).
    records: the eval rows as read, aligned with `samples` (LMs).
    tokenizer: what tokenized the data (LMs generate with it at eval).
  """
  train: dict[str, np.ndarray] | None
  eval: dict[str, np.ndarray] | None
  labels: list[str] | None = None
  samples: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  records: list[dict] = dataclasses.field(default_factory=list)
  tokenizer: Any = None


class Task:
  """One kind of fine-tuning job; subclasses fill in what differs.

  Class attributes:
    name: the `config.task` value, also the models registry's key.
    has_labels: a run saves its class names (DIR/labels.json) and needs them back.
    generates_text: the model continues text (`jaxft generate / chat`).
    per_example_eval: `eval_step` returns per-example arrays (split like the
      batch), not sums over the batch (replicated).
    peft_task_type: PEFT's `task_type` for a LoRA adapter export (None: the
      model is wrapped as is).
  """
  name: str = ""
  has_labels: bool = False
  generates_text: bool = False
  per_example_eval: bool = True
  peft_task_type: str | None = None

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  # --- data ------------------------------------------------------------------

  def prepare(self, model_path: str, labels: list[str] | None, *, need_train: bool) -> Data:
    """Reads and encodes the config's data (train only if `need_train`).

    `labels`: the class names a workdir's run trained with (None: new run).
    """
    raise NotImplementedError

  def class_names(self) -> list[str] | None:
    """The training data's class names, without encoding anything (None: not a classifier)."""
    return None

  def abstract_batch(self, model_path: str) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global train batch, for compiling a step without data."""
    raise NotImplementedError

  def describe(self, data: Data) -> str:
    """One line about the training data, for the log."""
    return f"{batches_lib.num_examples(data.train)} train examples"

  # --- model -----------------------------------------------------------------

  def hf_config(self, model_path: str, labels: list[str] | None) -> Any:
    """The transformers config the task builds its model from."""
    raise NotImplementedError

  def load(self, model_path: str, hf_config: Any, shardings: Callable[[Any], Any],
           quantized: dict[str, str] | None = None) -> hf.Loaded:
    """The pretrained model (or a fresh one with config.model.from_scratch) of
    `hf_config` (this task's `hf_config(...)`), placed by `shardings`; the
    Linears `quantized` names (QLoRA) stored quantized as they are read."""
    c = self.config
    kw = dict(dtype=trainable.compute_dtype(c), seed=c.train.seed, shardings=shardings)
    if c.model.get("from_scratch"):
      return hf.init_model(hf_config, self.name, **kw)
    return hf.load(model_path, self.name, hf_config=hf_config,
                   allow_pickle=c.model.allow_pickle, quantized=quantized, **kw)

  def fresh_heads(self, hf_config: Any) -> tuple[str, ...]:
    """Modules the task adds to the pretrained model: LoRA trains them by default,
    a PEFT export saves them in full."""
    del hf_config
    return ()

  # --- objective and evaluation ----------------------------------------------

  # What the train step minimises (see steps.Objective); a class attribute, or
  # a property where it depends on the config (image input sizes).
  objective: steps.Objective

  # (params, frozen, batch, *, graphdef, rest) -> per-example outputs or sums;
  # a staticmethod, or a property as `objective`.
  eval_step: Callable[..., Any]

  def evaluate(self, run: Any, data: Data, workdir: str | None = None) -> dict[str, Any]:
    """Metrics of the run's current model on `data.eval`; with a workdir, also its files."""
    raise NotImplementedError

  def tokens_per_example(self, hf_config: Any) -> int:
    """Positions the model runs over per example (padding included)."""
    del hf_config
    return int(self.config.data.max_length)

  def flops_per_token(self, sizes: dict[str, int], hf_config: Any) -> float:
    """Training FLOPs per token of the model (mfu.py's convention)."""
    spec = registry.lookup(hf_config.model_type, self.name)
    heads = spec.layout.head_modules
    # A tied output layer is the embedding table, which then also multiplies.
    tied = spec.output_embedding and not any(p.split("/", 1)[0] in heads for p in sizes)
    layers, attn_dim = mfu.model_shape(hf_config)
    n = mfu.matmul_params(sizes, spec.output_embedding if tied else None)
    return mfu.train_flops_per_token(n, layers, self.tokens_per_example(hf_config), attn_dim)

  # --- export ----------------------------------------------------------------

  def export(self, run: Any, model_path: str, out_dir: str) -> None:
    """Writes the run's model (LoRA merged) as an HF folder transformers loads."""
    raise NotImplementedError
