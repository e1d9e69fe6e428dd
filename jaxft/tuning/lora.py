"""LoRA: low-rank adapters on the Linear layers a regex selects.

`attach` gives each matching `layers.Linear` two `LoRAParam`s, `lora_a`
(in, rank) and `lora_b` (rank, out), and the scale `alpha / rank`, as PEFT's
LoRA does (`lora_b` starts at zero, so the model is unchanged until trained).
The base kernel keeps its path and layout, so checkpoints load as before; the
optimizer rules freeze it (see `tuning/rules.py`), and with
config.model.frozen_dtype int8 / nf4 it is stored quantized (QLoRA,
`tuning/quantize.py`). `merge` folds the adapters
into the kernels for a plain HF export; `formats/peft.py` writes them as a
PEFT adapter.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import UserError
from jaxft.models import dropout
from jaxft.models import layers
from jaxft.models import stack

ADAPTER_PATH = r".*/lora_[ab]"  # Param paths of every adapter matrix.


def linear_modules(model: nnx.Module) -> list[tuple[str, layers.Linear]]:
  """[(module path, Linear)] of every Linear in `model`."""
  return [("/".join(map(str, path)), m) for path, m in nnx.iter_modules(model)
          if isinstance(m, layers.Linear)]


def targets(model: nnx.Module, pattern: str) -> list[str]:
  """Paths of the Linear modules whose path `pattern` fully matches."""
  return [p for p, _ in linear_modules(model) if re.fullmatch(pattern, p)]


def in_last_layers(model: nnx.Module, paths: list[str], last_layers: int) -> list[str]:
  """The `paths` outside every layer stack or in one of its last `last_layers` layers.

  0 keeps every path. A stack with fewer layers keeps all of them.
  """
  if not last_layers:
    return paths
  first = {}  # Stack path prefix -> its first kept layer index.
  for container, blocks in stack.layer_lists(model):
    first["/".join(map(str, container)) + "/"] = max(len(blocks) - last_layers, 0)
  def kept(path: str) -> bool:
    for prefix, start in first.items():
      if path.startswith(prefix):
        return int(path[len(prefix):].split("/", 1)[0]) >= start
    return True
  return [p for p in paths if kept(p)]


def target_pattern(targets_regex: str) -> str:
  """Param paths of the base kernels and biases LoRA freezes (config.lora.targets)."""
  return rf"(?:{targets_regex})/(?:kernel|bias)"


def attach(model: nnx.Module, *, targets_regex: str, rank: int, alpha: float,
           dropout_rate: float, seed: int, last_layers: int = 0) -> list[str]:
  """Adds rank-`rank` adapters to the Linears `targets_regex` selects, in place.

  The settings are config.lora's; `last_layers` > 0 keeps only the targets in
  the last that many layers of each layer stack (`in_last_layers`). `lora_a`
  is Kaiming-uniform as in PEFT (bound 1/sqrt(in)), `lora_b` zero; the adapter
  output is scaled by alpha / rank and its input dropped out at `dropout_rate`
  in training. Works on abstract models under `nnx.eval_shape`. Returns the
  module paths.

  Raises:
    UserError: the targets regex matches no Linear layer.
  """
  chosen = in_last_layers(model, targets(model, targets_regex), last_layers)
  if not chosen:
    names = ", ".join(p for p, _ in linear_modules(model)[:6])
    raise UserError(f"config.lora.targets={targets_regex!r} matches no Linear layer "
                    f"(module paths look like: {names}, ...)")
  key = jax.random.fold_in(jax.random.key(seed), 0x10A)  # Apart from the head init's stream.
  modules = dict(linear_modules(model))
  for i, path in enumerate(chosen):
    m = modules[path]
    k = jax.random.fold_in(key, i)
    bound = 1.0 / math.sqrt(m.in_features)
    # A kernel the load quantized (QLoRA) holds codes; its scales, the float dtype.
    dtype = (m.kernel_scale if m.quantized else m.kernel)[...].dtype
    a = jax.random.uniform(k, (m.in_features, rank), dtype, -bound, bound)
    # The rank (8-64) is too small to shard: the other dimension takes the
    # fsdp axis too where the base layer's name for it does not (an MLP's
    # columns, attention heads), or every fsdp device would hold it whole.
    m.lora_a = layers.LoRAParam(a, logical_axes=((m.axes[0], "embed"), None))
    m.lora_b = layers.LoRAParam(jnp.zeros((rank, m.out_features), dtype),
                                logical_axes=(None, (m.axes[1], "embed")))
    m.lora_scale = alpha / rank
    m.lora_dropout = dropout.dropout(dropout_rate)
  return chosen


def _delta(m: layers.Linear) -> jax.Array:
  a = jnp.asarray(m.lora_a[...], jnp.float32)
  b = jnp.asarray(m.lora_b[...], jnp.float32)
  return m.lora_scale * (a @ b)


def without_adapters(model: nnx.Module) -> nnx.Module:
  """A view of `model` with its adapters off: the base model, sharing its arrays.

  The reference model of preference and RL tuning with LoRA: the same
  weights, no second copy in memory, and exactly the base model's outputs
  (the adapter terms are skipped, not multiplied by zero). Works under jit.
  """
  graphdef, state = nnx.split(model)
  view = nnx.merge(graphdef, state)
  for _, m in linear_modules(view):
    m.lora_a = m.lora_b = None
    m.lora_scale = 0.0
  return view


def merge(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its kernel (dense float32, dequantized) and removes it, in place.

  Quantized kernels without an adapter stay quantized (`hf.export_tensors`
  writes them dense).
  """
  for _, m in linear_modules(model):
    if m.lora_a is None:
      continue
    m.set_weight(m.weight(jnp.float32) + _delta(m))
    m.lora_a = m.lora_b = None
    m.lora_scale = 0.0
  return model
