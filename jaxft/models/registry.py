"""HF `model_type` -> jaxft model class and how its checkpoints are named, per task."""

from __future__ import annotations

import dataclasses

from flax import nnx

from jaxft.errors import UserError
from jaxft.models import bert
from jaxft.models import gpt2
from jaxft.models import layers
from jaxft.models import llama
from jaxft.models import vit

CLASSIFY = "sequence-classification"
CAUSAL_LM = "causal-lm"
IMAGE_CLASSIFY = "image-classification"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything hf.py needs to load, build and export one model family for one task.

  Attributes:
    module: the model class, built as `module(hf_config, dtype=..., param_dtype=..., rngs=...)`.
    layout: checkpoint names, prefix and head of the model.
    architecture: the transformers class name written to config.json on export.
  """
  module: type[nnx.Module]
  layout: layers.CheckpointLayout
  architecture: str

  @property
  def prefix(self) -> str:
    return self.layout.prefix


MODELS: dict[str, dict[str, ModelSpec]] = {
    CLASSIFY: {
        "bert": ModelSpec(bert.BertForSequenceClassification, bert.BERT_CHECKPOINT,
                          "BertForSequenceClassification"),
        "roberta": ModelSpec(bert.RobertaForSequenceClassification, bert.ROBERTA_CHECKPOINT,
                             "RobertaForSequenceClassification"),
        "distilbert": ModelSpec(bert.DistilBertForSequenceClassification,
                                bert.DISTILBERT_CHECKPOINT,
                                "DistilBertForSequenceClassification"),
    },
    CAUSAL_LM: {
        "llama": ModelSpec(llama.LlamaForCausalLM, llama.CAUSAL_LM_CHECKPOINT,
                           "LlamaForCausalLM"),
        "mistral": ModelSpec(llama.MistralForCausalLM, llama.CAUSAL_LM_CHECKPOINT,
                             "MistralForCausalLM"),
        "qwen2": ModelSpec(llama.Qwen2ForCausalLM, llama.CAUSAL_LM_CHECKPOINT,
                           "Qwen2ForCausalLM"),
        "qwen3": ModelSpec(llama.Qwen3ForCausalLM, llama.CAUSAL_LM_CHECKPOINT,
                           "Qwen3ForCausalLM"),
        "gpt2": ModelSpec(gpt2.GPT2LMHeadModel, gpt2.GPT2_CHECKPOINT, "GPT2LMHeadModel"),
    },
    IMAGE_CLASSIFY: {
        "vit": ModelSpec(vit.ViTForImageClassification, vit.VIT_CHECKPOINT,
                         "ViTForImageClassification"),
    },
}


def lookup(model_type: str, task: str = CLASSIFY) -> ModelSpec:
  """The spec for an HF `model_type` and task; UserError if jaxft does not support it."""
  try:
    return MODELS[task][model_type]
  except KeyError:
    raise UserError(
        f"Unsupported model_type {model_type!r} in config.json for {task}; jaxft "
        f"supports: {', '.join(sorted(MODELS[task]))}.") from None
