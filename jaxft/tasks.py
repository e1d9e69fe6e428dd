"""What differs between tasks: data, model loading, objective, evaluation, export.

`train.py` runs the same loop for every task and asks the task (chosen by
`config.task`) for these pieces. Classification reads labelled text and
scores accuracy / macro-F1; causal-LM SFT reads conversations, prompt /
completion pairs or text, scores per-token loss and perplexity on the loss
tokens, and writes sample generations at each eval.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import jax
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
from jaxft.data import batches as batches_lib
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
  """
  train: dict[str, np.ndarray] | None
  eval: dict[str, np.ndarray] | None
  labels: list[str] | None = None
  samples: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  records: list[dict] = dataclasses.field(default_factory=list)

  def describe(self) -> str:
    n = batches_lib.num_examples(self.train)
    if self.labels is not None:
      return f"{n} train examples, {len(self.labels)} classes"
    return f"{n} train rows of {self.train['input_ids'].shape[1]} tokens"


class Classify:
  """Sequence classification (BERT-family encoders with a fresh head)."""
  name = registry.CLASSIFY
  objective = steps.CLASSIFY
  eval_step = staticmethod(steps.eval_step)
  per_example_eval = True

  def prepare(self, config: ml_collections.ConfigDict, tokenizer, labels: list[str] | None,
              *, need_train: bool) -> Data:
    train, evaluation, names = text.prepare(config, tokenizer, labels, need_train=need_train)
    return Data(train, evaluation, names)

  def hf_config(self, model_path: str, labels: list[str] | None):
    return hf.load_hf_config(model_path, num_labels=len(labels), id2label=dict(enumerate(labels)))

  def load(self, config: ml_collections.ConfigDict, model_path: str, labels: list[str] | None,
           shardings: Callable[[Any], Any]) -> hf.Loaded:
    return hf.load_classifier(model_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                              dtype=trainable.compute_dtype(config), seed=config.train.seed,
                              allow_pickle=config.model.allow_pickle, shardings=shardings)

  def evaluate(self, run, data: Data, config: ml_collections.ConfigDict,
               workdir: str | None = None) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over every eval example (no example dropped)."""
    del workdir
    losses, preds, weights = [], [], []
    for batch in batches_lib.eval_batches(data.eval, config.train.eval_batch_size):
      weight = batch.pop("weight")
      batch = sharding.global_batch(batch, run.placement.batch)
      loss, pred = run.eval_fn(run.state["params"], run.state["frozen"], batch)
      losses.append(sharding.to_host(loss))
      preds.append(sharding.to_host(pred))
      weights.append(weight)
    keep = np.concatenate(weights) > 0
    loss = np.concatenate(losses)[keep]
    scores = metrics_lib.classification(data.eval["label"], np.concatenate(preds)[keep],
                                        len(data.labels))
    return {"loss": float(loss.mean()), **scores}

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
                records=evaluation.records if evaluation else [])

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
      completions = complete(run, [p for p, _ in samples], config)
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


def complete(run, prompts: list[str], config: ml_collections.ConfigDict) -> list[str]:
  """Greedy completions of `prompts` by the run's model, eval_batch_size at a time."""
  tokenizer = hf.load_tokenizer(hf.resolve_model(config.model.path))
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


def of(config: ml_collections.ConfigDict) -> Classify | CausalLM:
  """The task `config.task` names (configs without the key are classification)."""
  return CausalLM() if trainable.task(config) == registry.CAUSAL_LM else Classify()
