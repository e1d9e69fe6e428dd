"""Text classification: a BERT-family encoder with a fresh head, on labelled text.

Reads csv / json / parquet / hub data with text (and text-pair) and label
columns, trains softmax cross-entropy on the head's logits and scores
accuracy and macro-F1 over every eval example.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxft import metrics
from jaxft import sharding
from jaxft import steps
from jaxft.data import batches as batches_lib
from jaxft.data import sources
from jaxft.data import text
from jaxft.errors import UserError
from jaxft.formats import hf
from jaxft.formats import hub
from jaxft.models import registry
from jaxft.tasks import base
from jaxft.tasks import class_metrics
from jaxft.tasks import clinical_metrics
from jaxft.tuning import lora


def _forward(model, batch, deterministic, rngs):
  return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
               deterministic=deterministic, rngs=rngs)


def _example_weights(batch: dict) -> jax.Array:
  """Each example's class weight (config.data.class_weights), else 1."""
  if "class_weight" in batch:
    return batch["class_weight"]
  return jnp.ones(batch["label"].shape, jnp.float32)


def _loss_sums(logits, batch):
  """Summed (class-weighted) cross-entropy; `accuracy` weighted alike, so with class
  weights the train accuracy is the class-weighted one."""
  w = _example_weights(batch)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = jnp.sum(w * (jnp.argmax(logits, -1) == batch["label"]))
  return jnp.sum(w * losses), {"accuracy": correct.astype(jnp.float32)}


# Without config.decision.target, binary scores are taken where the most probable class
# is the prediction.
_THRESHOLD = 0.5
_BINARY_KEYS = ("auc", "sensitivity", "specificity", "ppv", "npv", "balanced_accuracy",
                "threshold")
# The config.json attribute an export keeps the run's decision threshold in
# ({"threshold", "target", "value", "step"}), for `jaxft predict --model=` and users.
EXPORT_DECISION = "jaxft_decision"
ECE_BINS = 15  # Equal-width confidence bins of the eval's `ece` and the calibration PNG.
_MULTICLASS_KEYS = ("auc", "balanced_accuracy", "sensitivity", "specificity")

# A weighted mean divides by the batch's summed weights, as torch's CrossEntropyLoss(weight=).
OBJECTIVE = steps.Objective(forward=_forward, loss_sums=_loss_sums,
                            units=lambda batch: jnp.sum(_example_weights(batch)))


def eval_step(params: nnx.State, frozen: nnx.State, batch: dict, *, graphdef: nnx.GraphDef,
              rest: nnx.State, objective: steps.Objective = OBJECTIVE
              ) -> tuple[jax.Array, jax.Array]:
  """Per-example loss and float32 class probabilities, dropout off."""
  out = steps.model_outputs(objective, graphdef, params, frozen, rest, batch, None)
  losses = optax.softmax_cross_entropy_with_integer_labels(out, batch["label"])
  return losses, jax.nn.softmax(out.astype(jnp.float32), axis=-1)


class Classifier(base.Task):
  """What every classifier shares: labels, the head, per-example eval, accuracy and F1."""
  has_labels = True
  peft_task_type = "SEQ_CLS"

  def hf_config(self, model_path: str, labels: list[str] | None) -> Any:
    return hub.load_hf_config(model_path, num_labels=len(labels),
                              id2label=dict(enumerate(labels)))

  def fresh_heads(self, hf_config: Any) -> tuple[str, ...]:
    return registry.lookup(hf_config.model_type, self.model_kind).layout.head_modules

  def describe(self, data: base.Data) -> str:
    return (f"{batches_lib.num_examples(data.train)} train examples, "
            f"{len(data.labels)} classes")

  def with_class_weights(self, train: dict[str, np.ndarray] | None, names: list[str]
                         ) -> dict[str, np.ndarray] | None:
    """`train` with a `class_weight` column per config.data.class_weights (as it is if "")."""
    spec = self.config.data.get("class_weights", "")
    if not spec or train is None:
      return train
    counts = np.bincount(train["label"], minlength=len(names))
    if spec == "balanced":
      if not counts.all():
        raise UserError(f"config.data.class_weights='balanced': no training example of class "
                        f"{names[int(np.argmin(counts))]!r}")
      weights = counts.sum() / (len(names) * counts)
    else:
      weights = np.array([float(w) for w in spec.split(",")])
      if len(weights) != len(names):
        raise UserError(f"config.data.class_weights={spec!r} has {len(weights)} weights for "
                        f"{len(names)} classes ({', '.join(names)})")
    metrics.log("class weights: " + ", ".join(f"{n} {w:.3g}" for n, w in zip(names, weights)))
    return {**train, "class_weight": weights.astype(np.float32)[train["label"]]}

  def predict(self, run: Any, data: base.Data) -> tuple[np.ndarray, np.ndarray]:
    """(loss [N], class probabilities [N, classes]) of every eval example, in order."""
    batches = batches_lib.eval_batches(data.eval, self.config.train.eval_batch_size)
    losses, probs = zip(*self.batch_outputs(run, batches))
    return np.concatenate(losses), np.concatenate(probs)

  def batch_outputs(self, run: Any, batches: Iterable[dict[str, np.ndarray]]
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(loss, class probabilities) of each batch's real rows (`weight` > 0), in order.

    The batched forward of `predict` (eval) and `jaxft predict`: every batch
    has the shape `batches.eval_batches` gives (one compile), padding rows
    marked by `weight` 0.
    """
    for batch in batches:
      batch = dict(batch)
      keep = batch.pop("weight") > 0
      batch = sharding.global_batch(batch, run.placement.batch)
      loss, prob = run.eval_fn(run.state["params"], run.state["frozen"], batch)
      yield sharding.to_host(loss)[keep], sharding.to_host(prob)[keep]

  def predictions(self, probs: np.ndarray, threshold: float = _THRESHOLD) -> np.ndarray:
    """Class ids: two classes, class 1 where its probability >= threshold; else the argmax."""
    if probs.shape[-1] == 2:
      return (probs[:, 1] >= threshold).astype(np.int64)
    return np.argmax(probs, -1)

  def scores(self, labels: np.ndarray, probs: np.ndarray, threshold: float = _THRESHOLD
             ) -> dict[str, Any]:
    """Accuracy and macro-F1 of `predictions`, then the clinical scores.

    Two classes (class 1 the positive finding): ROC AUC, and sensitivity,
    specificity, PPV, NPV and balanced accuracy at `threshold`. More:
    one-vs-rest macro AUC, balanced accuracy, and macro sensitivity and
    specificity. None where the eval data leave a score undefined. `ece`: the
    expected calibration error of the top class (ECE_BINS bins).
    """
    out = class_metrics.classification(labels, self.predictions(probs, threshold),
                                       probs.shape[-1])
    out["ece"] = clinical_metrics.expected_calibration_error(labels, probs, ECE_BINS)
    if probs.shape[-1] == 2:
      binary = clinical_metrics.binary(labels, probs[:, 1], threshold)
      return {**out, **{k: binary[k] for k in _BINARY_KEYS}}
    multi = clinical_metrics.multiclass(labels, probs)
    return {**out, **{k: multi[k] for k in _MULTICLASS_KEYS}}

  # --- the decision threshold (config.decision) --------------------------------

  @property
  def evaluates_before_save(self) -> bool:
    """A chosen threshold is kept with the checkpoint of its eval: that eval comes first."""
    return bool(self.config.get("decision", {}).get("target"))

  def checkpoint_meta(self, step: int, result: dict[str, Any]) -> dict[str, Any]:
    """The threshold a training eval chose (`threshold`), kept for later evals."""
    d = self.config.get("decision")
    if not d or not d.target or "threshold" not in result:  # Two classes only have one.
      return {}
    return {"decision": {"threshold": result["threshold"], "target": d.target,
                         "value": float(d.value), "step": step}}

  def export_config(self, run: Any) -> Any:
    """The run's transformers config, plus its kept decision threshold as
    `EXPORT_DECISION` where it has one: an export labels as the run does."""
    config = copy.deepcopy(run.hf_config)
    if run.meta.get("decision"):
      setattr(config, EXPORT_DECISION, dict(run.meta["decision"]))
    return config

  def threshold(self, run: Any, labels: np.ndarray, probs: np.ndarray, *, choose: bool
                ) -> float:
    """The decision threshold of this eval.

    With config.decision.target and two classes: a training eval (`choose`)
    picks it on these (validation) data (`checkpoint_meta` keeps it);
    any other eval reads the one kept with the checkpoint, never choosing on
    its own data (that would tune on the test set). Else 0.5.
    """
    d = self.config.get("decision")
    if not d or not d.target or probs.shape[-1] != 2:
      return _THRESHOLD
    if choose:
      try:
        t = clinical_metrics.choose_threshold(labels, probs[:, 1], target=d.target,
                                              value=d.value)
      except ValueError as e:  # E.g. an eval split without the class the target needs.
        raise UserError(f"config.decision.target={d.target!r}: {e}") from e
      return float(t)
    kept = run.meta.get("decision")
    if kept is None:
      metrics.log(f"checkpoint {run.step} keeps no decision threshold (its run set no "
                  f"decision.target, or it was saved between evals): using {_THRESHOLD}")
      return _THRESHOLD
    return float(kept["threshold"])

  def scored(self, run: Any, data: base.Data, workdir: str | None
             ) -> tuple[dict[str, Any], np.ndarray, float]:
    """(loss and `scores` of every eval example at `threshold`, the probabilities, it)."""
    loss, probs = self.predict(run, data)
    labels = data.eval["label"]
    t = self.threshold(run, labels, probs, choose=workdir is not None)
    result = {"loss": float(loss.mean()), **self.scores(labels, probs, t)}
    if t != _THRESHOLD:
      result["at_0.5"] = {k: v for k, v in self.scores(labels, probs).items()
                          if k not in ("auc", "ece")}  # Those do not depend on it.
    return result, probs, t

  def evaluate(self, run: Any, data: base.Data, workdir: str | None = None) -> dict[str, Any]:
    """Loss and `scores` over every eval example (no example dropped)."""
    return self.scored(run, data, workdir)[0]


class Classify(Classifier):
  """Sequence classification (BERT, RoBERTa, DistilBERT encoders with a fresh head)."""
  name = model_kind = "classify"

  objective = OBJECTIVE
  eval_step = staticmethod(eval_step)

  def prepare(self, model_path: str, labels: list[str] | None, *, need_train: bool) -> base.Data:
    train, evaluation, names = text.prepare(self.config, hub.load_tokenizer(model_path), labels,
                                            need_train=need_train)
    return base.Data(self.with_class_weights(train, names), evaluation, names)

  def class_names(self) -> list[str]:
    d = self.config.data
    ds = sources.load_split(d.train, d.train_split, required=[d.label_key])
    return text.label_names(ds, d.label_key)

  def abstract_batch(self, model_path: str) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (self.config.train.batch_size, self.config.data.max_length)
    keys = ["input_ids", "attention_mask"]
    if "token_type_ids" in hub.load_tokenizer(model_path).model_input_names:
      keys.append("token_type_ids")
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in keys}
    batch["label"] = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    return batch

  def export(self, run: Any, model_path: str, out_dir: str) -> None:
    hf.export(lora.merge(run.model()), self.export_config(run), self.model_kind, out_dir,
              tokenizer_path=model_path)
