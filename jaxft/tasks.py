"""What differs between tasks: data, model loading, objective, evaluation, export.

`train.py` runs the same loop for every task and asks the task (chosen by
`config.task`) for these pieces. Classification reads labelled text and
scores accuracy / macro-F1; causal-LM SFT reads conversations, prompt /
completion pairs or text, scores per-token loss and perplexity on the loss
tokens, and writes sample generations at each eval.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxft import generate
from jaxft import hf
from jaxft import lm_metrics
from jaxft import lm_steps
from jaxft import lora
from jaxft import metrics as metrics_lib
from jaxft import sharding
from jaxft import steps
from jaxft import trainable
from jaxft import confusion_png
from jaxft.data import batches as batches_lib
from jaxft.data import images
from jaxft.data import sft
from jaxft.data import text
from jaxft.models import registry


@dataclasses.dataclass
class Data:
  """A task's examples: fixed-shape int32 arrays per split, plus what else it needs.

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

  def describe(self) -> str:
    n = batches_lib.num_examples(self.train)
    if "pixels" in self.train:
      h, w, c = self.train["pixels"].shape[1:]
      return f"{n} train images ({h}x{w}x{c}), {len(self.labels)} classes"
    if self.labels is not None:
      return f"{n} train examples, {len(self.labels)} classes"
    return f"{n} train rows of {self.train['input_ids'].shape[1]} tokens"


class Classify:
  """Sequence classification (BERT-family encoders with a fresh head)."""
  name = registry.CLASSIFY
  objective = steps.CLASSIFY
  eval_step = staticmethod(steps.eval_step)
  per_example_eval = True
  uses_tokenizer = True

  def tokens_per_example(self, config: ml_collections.ConfigDict, hf_config: Any) -> int:
    """Positions the model runs over per example (padding included)."""
    del hf_config
    return int(config.data.max_length)

  def prepare(self, config: ml_collections.ConfigDict, tokenizer, labels: list[str] | None,
              *, need_train: bool) -> Data:
    train, evaluation, names = text.prepare(config, tokenizer, labels, need_train=need_train)
    return Data(train, evaluation, names)

  def hf_config(self, model_path: str, labels: list[str] | None):
    return hf.load_hf_config(model_path, num_labels=len(labels), id2label=dict(enumerate(labels)))

  def load(self, config: ml_collections.ConfigDict, model_path: str, labels: list[str] | None,
           shardings: Callable[[Any], Any]) -> hf.Loaded:
    if config.model.get("from_scratch"):
      return hf.init_model(self.hf_config(model_path, labels), self.name,
                           dtype=trainable.compute_dtype(config), seed=config.train.seed,
                           shardings=shardings)
    return hf.load_classifier(model_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                              dtype=trainable.compute_dtype(config), seed=config.train.seed,
                              allow_pickle=config.model.allow_pickle, shardings=shardings)

  def evaluate(self, run, data: Data, config: ml_collections.ConfigDict,
               workdir: str | None = None) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over every eval example (no example dropped)."""
    del workdir
    loss, preds = self.predict(run, data, config)
    scores = metrics_lib.classification(data.eval["label"], preds, len(data.labels))
    return {"loss": float(loss.mean()), **scores}

  def predict(self, run, data: Data, config: ml_collections.ConfigDict
              ) -> tuple[np.ndarray, np.ndarray]:
    """(loss, predicted class) of every eval example, in order."""
    losses, preds, weights = [], [], []
    for batch in batches_lib.eval_batches(data.eval, config.train.eval_batch_size):
      weight = batch.pop("weight")
      batch = sharding.global_batch(batch, run.placement.batch)
      loss, pred = run.eval_fn(run.state["params"], run.state["frozen"], batch)
      losses.append(sharding.to_host(loss))
      preds.append(sharding.to_host(pred))
      weights.append(weight)
    keep = np.concatenate(weights) > 0
    return np.concatenate(losses)[keep], np.concatenate(preds)[keep]

  def export(self, run, config: ml_collections.ConfigDict, model_path: str, out_dir: str) -> None:
    del config
    hf.export_classifier(lora.merge(run.model()), run.hf_config, out_dir,
                         tokenizer_path=model_path)


class CausalLM:
  """Supervised fine-tuning of a decoder-only LM (Llama, Mistral, Qwen2/3, GPT-2)."""
  name = registry.CAUSAL_LM
  objective = lm_steps.CAUSAL_LM
  eval_step = staticmethod(lm_steps.eval_step)
  per_example_eval = False
  uses_tokenizer = True
  tokens_per_example = Classify.tokens_per_example

  def prepare(self, config: ml_collections.ConfigDict, tokenizer, labels: list[str] | None,
              *, need_train: bool) -> Data:
    del labels
    train, evaluation = sft.prepare(config, tokenizer, need_train=need_train)
    for name, split in (("train", train), ("eval", evaluation)):
      if split is not None and split.truncated:
        metrics_lib.log(f"{name}: {split.truncated} of {split.documents} documents are longer "
                        f"than max_length={config.data.max_length} and were cut")
    return Data(train and train.rows, evaluation and evaluation.rows,
                samples=evaluation.samples if evaluation else [],
                records=evaluation.records if evaluation else [], tokenizer=tokenizer)

  def hf_config(self, model_path: str, labels: list[str] | None):
    del labels
    return hf.load_lm_config(model_path)

  def load(self, config: ml_collections.ConfigDict, model_path: str, labels: list[str] | None,
           shardings: Callable[[Any], Any]) -> hf.Loaded:
    del labels
    return hf.load_causal_lm(model_path, dtype=trainable.compute_dtype(config),
                             seed=config.train.seed, allow_pickle=config.model.allow_pickle,
                             shardings=shardings)

  def evaluate(self, run, data: Data, config: ml_collections.ConfigDict,
               workdir: str | None = None) -> dict[str, float]:
    """Mean loss per loss token over the eval split and its perplexity.

    With `config.eval.metric`, also the metric on greedy completions of every
    eval prompt. With a workdir, writes the completions (or, without a metric,
    those of the first `config.eval.num_samples` prompts) to
    DIR/samples/step_N.jsonl.
    """
    total, count = 0.0, 0.0
    for batch in batches_lib.eval_batches(data.eval, config.train.eval_batch_size):
      weight = batch.pop("weight")
      batch["loss_mask"] = batch["loss_mask"] & (weight[:, None] > 0)  # Padding rows repeat one.
      batch = sharding.global_batch(batch, run.placement.batch)
      s, n = run.eval_fn(run.state["params"], run.state["frozen"], batch)
      total += float(sharding.to_host(s))
      count += float(sharding.to_host(n))
    loss = total / max(count, 1.0)
    result = {"tokens": int(count)}
    e = config.eval
    samples = data.samples if e.metric else data.samples[:e.num_samples]
    if samples and (e.metric or workdir is not None):
      completions = complete(run, data.tokenizer, [p for p, _ in samples], config)
      if e.metric == "pass@1":
        result["pass@1"] = lm_metrics.pass_at_1(data.records, completions, timeout=e.timeout)
      elif e.metric == "rouge_l":
        result["rouge_l"] = lm_metrics.rouge_l([r for _, r in samples], completions)
      if workdir is not None:
        write_samples(run.step, samples, completions, workdir)
    return {**result, "loss": loss, "perplexity": math.exp(min(loss, 80.0))}

  def export(self, run, config: ml_collections.ConfigDict, model_path: str, out_dir: str) -> None:
    del config
    hf.export_causal_lm(lora.merge(run.model()), run.hf_config, out_dir,
                        tokenizer_path=model_path)


@dataclasses.dataclass(frozen=True)
class ImageInput:
  """How images reach the model: stored uint8 at `size`, normalised on the device."""
  size: tuple[int, int]
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  interpolate: bool  # size differs from the checkpoint's: resize the position grid.
  random_resized_crop: bool
  flip: bool
  crop_scale: tuple[float, float]


def _image_forward(model, batch, deterministic, rngs, *, input_: ImageInput):
  x = batch["pixels"].astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(input_.mean, jnp.float32)) / jnp.asarray(input_.std, jnp.float32)
  if not deterministic and (input_.random_resized_crop or input_.flip):
    x = images.augment(rngs.dropout(), x, random_resized_crop=input_.random_resized_crop,
                       flip=input_.flip, scale=input_.crop_scale)
  return model(x, deterministic=deterministic, rngs=rngs,
               interpolate_pos_encoding=input_.interpolate)


class ImageClassify(Classify):
  """Image classification (ViT): image folders, IDX or npz files; accuracy, recall, confusion."""
  name = registry.IMAGE_CLASSIFY
  uses_tokenizer = False

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @functools.cached_property
  def input(self) -> ImageInput:
    """Size, channels and normalisation from the config, the checkpoint and its processor."""
    d = self.config.data
    folder = hf.resolve_model(self.config.model.path, weights=False)
    hf_config = hf.load_hf_config(folder)
    mean, std, processor_size = images.processor_stats(folder)
    native = _pair(getattr(hf_config, "image_size", 224))
    size = _pair(d.image_size) if d.image_size else (processor_size or native)
    channels = int(getattr(hf_config, "num_channels", 3))
    mean, std = (tuple(float(v) for v in images.channel_stats(values, name, channels))
                 for values, name in ((mean, "image_mean"), (std, "image_std")))
    return ImageInput(size=tuple(size), channels=channels, mean=mean, std=std,
                      interpolate=tuple(size) != native,
                      random_resized_crop=bool(d.random_resized_crop), flip=bool(d.flip),
                      crop_scale=tuple(d.crop_scale))

  def tokens_per_example(self, config: ml_collections.ConfigDict, hf_config: Any) -> int:
    """Patches plus the CLS token."""
    del config
    patch = _pair(hf_config.patch_size)
    return (self.input.size[0] // patch[0]) * (self.input.size[1] // patch[1]) + 1

  @property
  def objective(self) -> steps.Objective:
    forward = functools.partial(_image_forward, input_=self.input)
    return dataclasses.replace(steps.CLASSIFY, forward=forward)

  @property
  def eval_step(self):
    return functools.partial(steps.eval_step, objective=self.objective)

  def read(self, spec: str, split: str, size: tuple[int, int] | None) -> images.ImageSet:
    """One split of the config's image data, as uint8 at `size` (None: as stored)."""
    d = self.config.data
    return images.load(spec, skip_bad=d.skip_bad, size=size, split=split,
                       label_names=list(d.label_names) or None, image_key=d.image_key,
                       label_key=d.label_key)

  def prepare(self, config: ml_collections.ConfigDict, tokenizer, labels: list[str] | None,
              *, need_train: bool) -> Data:
    del tokenizer
    d, inp = config.data, self.input
    splits = {}
    if need_train or labels is None:
      splits["train"] = self.read(d.train, d.train_split, inp.size)
    if d.eval:
      splits["eval"] = self.read(d.eval, d.eval_split, inp.size)
    names = list(labels) if labels is not None else splits["train"].label_names
    out = {}
    for name, data in splits.items():
      if data.skipped:
        metrics_lib.log(f"{name}: skipped {data.skipped} unreadable files "
                        f"(e.g. {data.skipped_files[0]})")
      data = images.align_labels(data, names, name)
      out[name] = {"pixels": images.to_model_pixels(data.images, inp.size, inp.channels),
                   "label": data.labels}
    return Data(out.get("train") if need_train else None, out.get("eval"), names)

  def hf_config(self, model_path: str, labels: list[str] | None):
    config = super().hf_config(model_path, labels)
    if self.input.interpolate and self.config.model.get("from_scratch"):
      config.image_size = self.input.size[0]  # A fresh model is built for the new size.
    return config

  def load(self, config: ml_collections.ConfigDict, model_path: str, labels: list[str] | None,
           shardings: Callable[[Any], Any]) -> hf.Loaded:
    if config.model.from_scratch:
      return super().load(config, model_path, labels, shardings)
    return hf.load_image_classifier(
        model_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        dtype=trainable.compute_dtype(config), seed=config.train.seed,
        allow_pickle=config.model.allow_pickle, shardings=shardings)

  def evaluate(self, run, data: Data, config: ml_collections.ConfigDict,
               workdir: str | None = None) -> dict[str, float]:
    """Loss, accuracy, macro-F1 and per-class recall; with a workdir, the
    confusion matrix as DIR/confusion/step_N.png."""
    loss, preds = self.predict(run, data, config)
    result = {"loss": float(loss.mean()),
              **metrics_lib.classification(data.eval["label"], preds, len(data.labels))}
    matrix = metrics_lib.confusion(data.eval["label"], preds, len(data.labels))
    recall = dict(zip(data.labels, metrics_lib.recall_per_class(matrix)))
    if workdir is not None and jax.process_index() == 0:
      folder = os.path.join(workdir, "confusion")
      os.makedirs(folder, exist_ok=True)
      confusion_png.save(matrix, data.labels, os.path.join(folder, f"step_{run.step}.png"),
                         title=f"step {run.step}: accuracy {result['accuracy']:.4f}")
    return {**result, "recall": recall}

  def export(self, run, config: ml_collections.ConfigDict, model_path: str, out_dir: str) -> None:
    del config
    hf.export_image_classifier(lora.merge(run.model()), run.hf_config, out_dir,
                               processor_path=model_path)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
  return (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(map(int, size))


def complete(run, tokenizer, prompts: list[str], config: ml_collections.ConfigDict) -> list[str]:
  """Greedy completions of `prompts` by the run's model, eval_batch_size at a time."""
  model, size = run.model(), config.train.eval_batch_size
  out = []
  for start in range(0, len(prompts), size):
    # Lengths rounded up to 64 tokens: few distinct shapes, few compilations.
    out += generate.complete(model, tokenizer, prompts[start:start + size],
                             max_new_tokens=config.eval.max_new_tokens,
                             stop=tuple(config.eval.stop), pad_multiple=64)
  return out


def write_samples(step: int, samples: list[tuple[str, str]], completions: list[str],
                  workdir: str) -> None:
  """Prompts, references and completions in DIR/samples/step_N.jsonl (process 0)."""
  if jax.process_index() != 0:
    return
  folder = os.path.join(workdir, "samples")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f"step_{step}.jsonl"), "w", encoding="utf-8") as f:
    for (prompt, reference), reply in zip(samples, completions):
      f.write(json.dumps({"prompt": prompt, "reference": reference, "generated": reply}) + "\n")


def of(config: ml_collections.ConfigDict) -> Classify | CausalLM | ImageClassify:
  """The task `config.task` names (configs without the key are text classification)."""
  name = trainable.task(config)
  if name == registry.CAUSAL_LM:
    return CausalLM()
  return ImageClassify(config) if name == registry.IMAGE_CLASSIFY else Classify()
