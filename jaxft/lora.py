"""LoRA: low-rank adapters on the Linear layers a regex selects.

`attach` gives each matching `layers.Linear` two `LoRAParam`s, `lora_a`
(in, rank) and `lora_b` (rank, out), and the scale `alpha / rank`, as PEFT's
LoRA does (`lora_b` starts at zero, so the model is unchanged until trained).
The base kernel keeps its path and layout, so checkpoints load as before; the
optimizer rules freeze it (see `jaxft.rules`). `merge` folds the adapters
into the kernels for a plain HF export; `export_peft` writes the adapter as
PEFT's `adapter_config.json` + `adapter_model.safetensors`.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import transformers
from flax import nnx

from jaxft import params as params_lib
from jaxft import sharding
from jaxft.errors import UserError
from jaxft.models import layers
from jaxft.models import registry

ADAPTER_PATH = r".*/lora_[ab]"  # Param paths of every adapter matrix.
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the config asks for LoRA (`config.lora.rank > 0`)."""
  return "lora" in config and config.lora.rank > 0


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for LoRA settings that cannot work."""
  if "lora" not in config:
    return
  c = config.lora
  if c.rank < 0:
    raise UserError(f"config.lora.rank must be >= 0 (0: no LoRA), got {c.rank}")
  if not enabled(config):
    return
  if c.alpha <= 0:
    raise UserError(f"config.lora.alpha must be > 0, got {c.alpha}")
  if not 0 <= c.dropout < 1:
    raise UserError(f"config.lora.dropout must be in [0, 1), got {c.dropout}")
  try:
    re.compile(c.targets)
  except re.error as e:
    raise UserError(f"config.lora.targets is not a regex ({e}): {c.targets!r}") from e


def linear_modules(model: nnx.Module) -> list[tuple[str, layers.Linear]]:
  """[(module path, Linear)] of every Linear in `model`."""
  return [("/".join(map(str, path)), m) for path, m in nnx.iter_modules(model)
          if isinstance(m, layers.Linear)]


def targets(model: nnx.Module, pattern: str) -> list[str]:
  """Paths of the Linear modules whose path `pattern` fully matches."""
  return [p for p, _ in linear_modules(model) if re.fullmatch(pattern, p)]


def target_pattern(config: ml_collections.ConfigDict) -> str:
  """Param paths of the base kernels and biases LoRA freezes."""
  return rf"(?:{config.lora.targets})/(?:kernel|bias)"


def attach(model: nnx.Module, config: ml_collections.ConfigDict,
           seed: int) -> list[str]:
  """Adds adapters to the Linears `config.lora.targets` selects, in place.

  `lora_a` is Kaiming-uniform as in PEFT (bound 1/sqrt(in)), `lora_b` zero.
  Works on abstract models under `nnx.eval_shape`. Returns the module paths.

  Raises:
    UserError: the targets regex matches no Linear layer.
  """
  c = config.lora
  chosen = targets(model, c.targets)
  if not chosen:
    names = ", ".join(p for p, _ in linear_modules(model)[:6])
    raise UserError(f"config.lora.targets={c.targets!r} matches no Linear layer "
                    f"(module paths look like: {names}, ...)")
  key = jax.random.fold_in(jax.random.key(seed), 0x10A)  # Apart from the head init's stream.
  modules = dict(linear_modules(model))
  for i, path in enumerate(chosen):
    m = modules[path]
    k = jax.random.fold_in(key, i)
    bound = 1.0 / math.sqrt(m.in_features)
    dtype = m.kernel[...].dtype
    a = jax.random.uniform(k, (m.in_features, c.rank), dtype, -bound, bound)
    m.lora_a = layers.LoRAParam(a, logical_axes=(m.axes[0], None))
    m.lora_b = layers.LoRAParam(jnp.zeros((c.rank, m.out_features), dtype),
                                logical_axes=(None, m.axes[1]))
    m.lora_scale = c.alpha / c.rank
    m.lora_dropout = layers.dropout(c.dropout)
  return chosen


def _delta(m: layers.Linear) -> jax.Array:
  a = jnp.asarray(m.lora_a[...], jnp.float32)
  b = jnp.asarray(m.lora_b[...], jnp.float32)
  return m.lora_scale * (a @ b)


def merge(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its kernel (float32) and removes it, in place."""
  for _, m in linear_modules(model):
    if m.lora_a is None:
      continue
    kernel = jnp.asarray(m.kernel[...], jnp.float32) + _delta(m)
    m.kernel.set_value(kernel)
    m.lora_a = m.lora_b = None
    m.lora_scale = 0.0
  return model


def _module_keys(layout: layers.CheckpointLayout,
                 named: list[tuple[str, Any]]) -> dict[str, str]:
  """Our module path -> transformers module name, for modules holding params."""
  keys = {}
  for path, _ in named:
    if not re.fullmatch(ADAPTER_PATH, path):
      key, _ = layout.export_name(path)
      keys[path.rsplit("/", 1)[0]] = key.rsplit(".", 1)[0]
  return keys


def _saved_modules(layout: layers.CheckpointLayout, trainable: set[str],
                   task: str) -> set[str]:
  """A classifier's head, plus the parent module of each other trained non-adapter param."""
  heads = set() if task == registry.CAUSAL_LM else set(layout.head_modules)
  owners = {p.rsplit("/", 1)[0] for p in trainable if not re.fullmatch(ADAPTER_PATH, p)}
  return heads | {m for m in owners if m.split("/", 1)[0] not in heads}


def export_peft(model: nnx.Module, hf_config: transformers.PretrainedConfig,
                config: ml_collections.ConfigDict, trainable: set[str],
                out_dir: str, base_model: str, task: str = registry.CLASSIFY) -> None:
  """Writes the adapters and the other trained modules as a PEFT LoRA adapter.

  `PeftModel.from_pretrained(AutoModelForSequenceClassification(base_model),
  out_dir)` (AutoModelForCausalLM for `task` causal-lm) then computes what
  `model` computes. Modules with a trainable
  non-adapter param, and the classification head (fresh in the base model),
  go to `modules_to_save` in full.

  Args:
    model: the trained model, adapters attached (not merged).
    hf_config: its transformers config.
    config: the run's config (`config.lora`).
    trainable: param paths the run trained.
    out_dir: folder to write.
    base_model: what `base_model_name_or_path` records.
    task: registry.CLASSIFY or registry.CAUSAL_LM.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  layout = registry.lookup(hf_config.model_type, task).layout
  named = params_lib.named_variables(nnx.state(model, nnx.Param))
  keys = _module_keys(layout, named)
  saved = _saved_modules(layout, trainable, task)
  tensors, lora_modules = {}, []
  for path, var in named:
    module, name = path.rsplit("/", 1)
    value = sharding.to_host(var.get_value()).astype(np.float32)
    if name in ("lora_a", "lora_b"):
      # PEFT stores lora_A as (rank, in) and lora_B as (out, rank): ours transposed.
      suffix = "lora_A" if name == "lora_a" else "lora_B"
      tensors[f"base_model.model.{keys[module]}.{suffix}.weight"] = value.T.copy()
      lora_modules += [keys[module]] if name == "lora_a" else []
    elif any(path.startswith(m + "/") for m in saved):
      key, transform = layout.export_name(path)
      tensors[f"base_model.model.{key}"] = np.ascontiguousarray(transform.to_theirs(value))
  # Head modules are top-level and unprefixed, so their name is their path.
  modules_to_save = sorted(m if m in layout.head_modules else keys[m] for m in saved)
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, PEFT_WEIGHTS), metadata={"format": "pt"})
  peft_config = {
      "peft_type": "LORA", "r": config.lora.rank,
      # PEFT has no image-classification task type: None wraps the model as is.
      "task_type": {registry.CLASSIFY: "SEQ_CLS", registry.CAUSAL_LM: "CAUSAL_LM"}.get(task),
      "lora_alpha": config.lora.alpha, "lora_dropout": config.lora.dropout,
      "target_modules": sorted(lora_modules), "modules_to_save": modules_to_save,
      "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
      "base_model_name_or_path": base_model, "init_lora_weights": True,
      "use_rslora": False, "use_dora": False,
  }
  with open(os.path.join(out_dir, PEFT_CONFIG), "w", encoding="utf-8") as f:
    json.dump(peft_config, f, indent=2)
