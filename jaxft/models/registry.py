"""HF `model_type` -> jaxft model class and how its checkpoints are named, per task kind.

Keyed first by the task kind, as `config.task` spells it (the tasks package
picks the kind; this table only knows which model classes serve it).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jaxft.errors import UserError
from jaxft.models import bert
from jaxft.models import gpt2
from jaxft.models import naming
from jaxft.models import llama
from jaxft.models import resnet
from jaxft.models import vit



@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything hf.py needs to load, build and export one model family for one task.

  Attributes:
    module: the model class, built as `module(hf_config, dtype=..., param_dtype=..., rngs=...)`.
    layout: checkpoint names, prefix and head of the model.
    architecture: the transformers class name written to config.json on export.
    output_embedding: the token embedding's param path where it doubles as the
      output layer when config.json ties them (no head module then); "" if never.
  """
  module: type[nnx.Module]
  layout: naming.CheckpointLayout
  architecture: str
  output_embedding: str = ""

  @property
  def prefix(self) -> str:
    return self.layout.prefix


_TIED_LLAMA = "model/embed_tokens/embedding"

MODELS: dict[str, dict[str, ModelSpec]] = {
    "classify": {
        "bert": ModelSpec(bert.BertForSequenceClassification, bert.BERT_CHECKPOINT,
                          "BertForSequenceClassification"),
        "roberta": ModelSpec(bert.RobertaForSequenceClassification, bert.ROBERTA_CHECKPOINT,
                             "RobertaForSequenceClassification"),
        "distilbert": ModelSpec(bert.DistilBertForSequenceClassification,
                                bert.DISTILBERT_CHECKPOINT,
                                "DistilBertForSequenceClassification"),
    },
    "causal_lm": {
        "llama": ModelSpec(llama.LlamaForCausalLM, llama.CAUSAL_LM_CHECKPOINT,
                           "LlamaForCausalLM", _TIED_LLAMA),
        "mistral": ModelSpec(llama.MistralForCausalLM, llama.CAUSAL_LM_CHECKPOINT,
                             "MistralForCausalLM", _TIED_LLAMA),
        "qwen2": ModelSpec(llama.Qwen2ForCausalLM, llama.CAUSAL_LM_CHECKPOINT,
                           "Qwen2ForCausalLM", _TIED_LLAMA),
        "qwen3": ModelSpec(llama.Qwen3ForCausalLM, llama.CAUSAL_LM_CHECKPOINT,
                           "Qwen3ForCausalLM", _TIED_LLAMA),
        "gpt2": ModelSpec(gpt2.GPT2LMHeadModel, gpt2.GPT2_CHECKPOINT, "GPT2LMHeadModel",
                         "transformer/wte/embedding"),
    },
    "image_classify": {
        "vit": ModelSpec(vit.ViTForImageClassification, vit.VIT_CHECKPOINT,
                         "ViTForImageClassification"),
        "resnet": ModelSpec(resnet.ResNetForImageClassification, resnet.RESNET_CHECKPOINT,
                            "ResNetForImageClassification"),
    },
}


def supported() -> str:
  """The model types jaxft reads, per task kind: `bert, distilbert, roberta (classify); ...`."""
  return "; ".join(f"{', '.join(sorted(types))} ({task})" for task, types in MODELS.items())


def lookup(model_type: str, task: str) -> ModelSpec:
  """The spec for an HF `model_type` and a task kind; UserError if jaxft does not support it."""
  try:
    return MODELS[task][model_type]
  except KeyError:
    raise UserError(
        f"Unsupported model_type {model_type!r} in config.json for {task}; jaxft "
        f"supports: {', '.join(sorted(MODELS[task]))}.") from None
