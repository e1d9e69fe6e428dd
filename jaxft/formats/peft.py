"""LoRA adapters out as a PEFT adapter folder: `adapter_config.json` + `adapter_model.safetensors`.

`PeftModel.from_pretrained(AutoModelFor...(base_model), out_dir)` then
computes what the jaxft model computes: the adapters under PEFT's names, and
every module with a trained non-adapter param (a fresh classification head
among them) in full, under `modules_to_save`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import transformers
from flax import nnx

from jaxft import sharding
from jaxft.formats import hf
from jaxft.models import naming
from jaxft.models import registry
from jaxft.tuning import lora
from jaxft.tuning import param_paths

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def _module_keys(layout: naming.CheckpointLayout,
                 named: list[tuple[str, Any]]) -> dict[str, str]:
  """Our module path -> transformers module name, for modules holding params."""
  keys = {}
  for path, _ in named:
    # A quantized kernel's scales (QLoRA) have no checkpoint name: export writes it dense.
    if not re.fullmatch(lora.ADAPTER_PATH, path) and not path.endswith("/kernel_scale"):
      key, _ = layout.export_name(path)
      keys[path.rsplit("/", 1)[0]] = key.rsplit(".", 1)[0]
  return keys


def _saved_modules(heads: Sequence[str], trainable: set[str]) -> set[str]:
  """The fresh head modules, plus the parent module of each other trained non-adapter param."""
  owners = {p.rsplit("/", 1)[0] for p in trainable if not re.fullmatch(lora.ADAPTER_PATH, p)}
  return set(heads) | {m for m in owners if m.split("/", 1)[0] not in heads}


def export_peft(model: nnx.Module, hf_config: transformers.PretrainedConfig, task: str,
                out_dir: str, *, lora_config: ml_collections.ConfigDict, trainable: set[str],
                heads: Sequence[str], task_type: str | None, base_model: str) -> None:
  """Writes the adapters and the other trained modules as a PEFT LoRA adapter.

  Args:
    model: the trained model, adapters attached (not merged).
    hf_config: its transformers config.
    task: the task kind (models.registry's key).
    out_dir: folder to write.
    lora_config: the run's `config.lora`.
    trainable: param paths the run trained.
    heads: modules the task adds to the pretrained model (saved in full).
    task_type: PEFT's task type ("SEQ_CLS", "CAUSAL_LM"; None wraps the model as is).
    base_model: what `base_model_name_or_path` records.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  layout = registry.lookup(hf_config.model_type, task).layout
  named = param_paths.named_variables(nnx.state(model, nnx.Param))
  keys = _module_keys(layout, named)
  saved = _saved_modules(heads, trainable)
  tensors, lora_modules = {}, []
  for path, var in named:
    module, name = path.rsplit("/", 1)
    if name in ("lora_a", "lora_b"):
      value = sharding.to_host(var.get_value()).astype(np.float32)
      # PEFT stores lora_A as (rank, in) and lora_B as (out, rank): ours transposed.
      suffix = "lora_A" if name == "lora_a" else "lora_B"
      tensors[f"base_model.model.{keys[module]}.{suffix}.weight"] = value.T.copy()
      lora_modules += [keys[module]] if name == "lora_a" else []
  in_saved = lambda path: any(path.startswith(m + "/") for m in saved)
  for _, key, value in hf.export_tensors(model, layout, keep=in_saved):
    tensors[f"base_model.model.{key}"] = value
  # Head modules are top-level and unprefixed, so their name is their path.
  modules_to_save = sorted(m if m in layout.head_modules else keys[m] for m in saved)
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, PEFT_WEIGHTS), metadata={"format": "pt"})
  peft_config = {
      "peft_type": "LORA", "r": lora_config.rank, "task_type": task_type,
      "lora_alpha": lora_config.alpha, "lora_dropout": lora_config.dropout,
      "target_modules": sorted(lora_modules), "modules_to_save": modules_to_save,
      "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
      "base_model_name_or_path": base_model, "init_lora_weights": True,
      "use_rslora": False, "use_dora": False,
  }
  with open(os.path.join(out_dir, PEFT_CONFIG), "w", encoding="utf-8") as f:
    json.dump(peft_config, f, indent=2)
