"""HF `model_type` -> jaxft model class and how its checkpoints are named."""

from __future__ import annotations

import dataclasses

from flax import nnx

from jaxft.errors import UserError
from jaxft.models import bert
from jaxft.models import layers


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything hf.py needs to load, build and export one model family.

  Attributes:
    classifier: sequence-classification module, built as
      `classifier(hf_config, dtype=..., param_dtype=..., rngs=...)`.
    layout: checkpoint names, prefix and head of the classifier.
    architecture: the transformers class name written to config.json on export.
  """
  classifier: type[nnx.Module]
  layout: layers.CheckpointLayout
  architecture: str

  @property
  def prefix(self) -> str:
    return self.layout.prefix


MODELS: dict[str, ModelSpec] = {
    "bert": ModelSpec(bert.BertForSequenceClassification, bert.BERT_CHECKPOINT,
                      "BertForSequenceClassification"),
    "roberta": ModelSpec(bert.RobertaForSequenceClassification,
                         bert.ROBERTA_CHECKPOINT,
                         "RobertaForSequenceClassification"),
    "distilbert": ModelSpec(bert.DistilBertForSequenceClassification,
                            bert.DISTILBERT_CHECKPOINT,
                            "DistilBertForSequenceClassification"),
}


def lookup(model_type: str) -> ModelSpec:
  """The spec for an HF `model_type`; UserError if jaxft does not support it."""
  try:
    return MODELS[model_type]
  except KeyError:
    raise UserError(
        f"Unsupported model_type {model_type!r} in config.json; jaxft "
        f"supports: {', '.join(sorted(MODELS))}.") from None
