"""The PyTorch + transformers side of a bench row: the textbook training step.

The same job as the jaxft side, read from the same jaxft config: the model in
train mode (dropout as its config says), AdamW from bench/torch_classify.py
(no decay on biases and LayerNorm weights), global-norm clipping, bf16
autocast when the config computes in bf16, PEFT LoRA when config.lora.rank
is set. Imports neither JAX nor jaxft's models, so a memory child of this
side measures torch alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Before transformers: nothing from a hub.

import ml_collections  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bench import rows as rows_lib  # noqa: E402
from bench import torch_classify  # noqa: E402
from jaxft.formats import gguf  # noqa: E402  (numpy + transformers: no JAX)


@dataclasses.dataclass
class TorchSide:
  """A torch model, its optimizer and a fixed batch.

  Attributes:
    model: the (PEFT-wrapped, for LoRA) model in train mode.
    optimizer: AdamW over the trainable parameters.
    params: the trainable parameters (clipped together).
    batch: model inputs and labels, on the device.
    clip: global-norm limit (<= 0: none).
    autocast: bf16 autocast, or None for float32.
    device: "cuda" or "cpu".
    weights: "loaded" or "random" (where the checkpoint is not a torch one).
  """
  model: torch.nn.Module
  optimizer: torch.optim.Optimizer
  params: list[torch.nn.Parameter]
  batch: dict[str, torch.Tensor]
  clip: float
  autocast: torch.dtype | None
  device: str
  weights: str

  @property
  def trainable(self) -> int:
    return sum(p.numel() for p in self.params)

  def step(self) -> float:
    """One timed step: forward, backward, clip, update (synchronised on a GPU)."""
    start = time.perf_counter()
    context = (torch.autocast(self.device, dtype=self.autocast) if self.autocast
               else contextlib.nullcontext())
    with context:
      loss = self.model(**self.batch).loss
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.optimizer.step()
    if self.device == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - start


def _causal_lm(path: str) -> tuple[torch.nn.Module, str]:
  """(model, "loaded" | "random") for an HF folder or a GGUF file.

  A GGUF holds llama.cpp's quantized tensors, which transformers does not
  read without the `gguf` torch path; timing does not depend on the values,
  so the torch side builds the same architecture from the config jaxft reads
  (what hub.load_hf_config returns for a .gguf) with random weights.
  """
  if gguf.is_gguf(path):
    config = gguf.read_config(path)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32), "random"
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), "loaded"


def _with_lora(model: torch.nn.Module, config: ml_collections.ConfigDict, row: rows_lib.Row,
               classify: bool) -> torch.nn.Module:
  """PEFT LoRA matching config.lora; the row's head modules train in full.

  jaxft's targets regex runs over `/`-separated module paths without the
  `bert.` prefix; with `.` for `/` it full-matches PEFT's dotted module
  names (`bert.encoder.layer.0.attention.self.query`) thanks to its `.*`.
  """
  import peft  # pylint: disable=g-import-not-at-top
  lora = config.lora
  peft_config = peft.LoraConfig(
      task_type=peft.TaskType.SEQ_CLS if classify else peft.TaskType.CAUSAL_LM,
      r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
      target_modules=lora.targets.replace("/", r"\."),
      modules_to_save=list(row.torch_heads) or None)
  return peft.get_peft_model(model, peft_config)


def _batch(config: ml_collections.ConfigDict, model_config: Any, row: rows_lib.Row,
           device: str) -> dict[str, torch.Tensor]:
  """The jaxft side's synthetic batch (same seed), as transformers' keyword arguments.

  A causal LM gets labels = input_ids: transformers shifts them and averages
  the cross-entropy over all B x (L-1) next-token predictions, the tokens
  jaxft's loss covers for one document per row with loss on every token.
  """
  shape = (config.train.batch_size, config.data.max_length)
  if row.causal_lm:
    keys = ("input_ids",)  # Its labels are its inputs; the ids come first, as the jaxft side's.
  else:
    # Token types where the tokenizer gives them, as jaxft's Classify.abstract_batch decides.
    names = transformers.AutoTokenizer.from_pretrained(config.model.path).model_input_names
    keys = ("input_ids", "attention_mask",
            *(("token_type_ids",) if "token_type_ids" in names else ()), "label")
  arrays = rows_lib.synthetic_batch(keys, shape, model_config.vocab_size, row.num_labels)
  tensor = lambda x: torch.from_numpy(x.astype("int64")).to(device)
  if row.causal_lm:
    return {"input_ids": tensor(arrays["input_ids"]), "labels": tensor(arrays["input_ids"])}
  out = {k: tensor(v) for k, v in arrays.items() if k != "label"}
  out["labels"] = tensor(arrays["label"])
  return out


def build(row: rows_lib.Row, config: ml_collections.ConfigDict, model_path: str) -> TorchSide:
  """The torch model, optimizer and batch of a row."""
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cuda":
    # XLA's default precision runs float32 matmuls on TF32 tensor cores; torch's
    # does not. The same arithmetic on both sides: TF32 here too.
    torch.set_float32_matmul_precision("high")
  classify = not row.causal_lm
  torch.manual_seed(config.train.seed)  # The fresh head and LoRA initialisation.
  if classify:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=row.num_labels, dtype=torch.float32)
    weights = "loaded"
  else:
    model, weights = _causal_lm(model_path)
  batch = _batch(config, model.config, row, device)
  for name in row.torch_frozen:
    model.get_submodule(name).requires_grad_(False)
  if config.lora.rank > 0:
    model = _with_lora(model, config, row, classify)
  model.to(device).train()
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch_classify.make_optimizer(model, config.optim.lr, config.optim.weight_decay)
  autocast = torch.bfloat16 if config.model.dtype == "bfloat16" else None
  return TorchSide(model, optimizer, params, batch, config.optim.clip_norm, autocast, device,
                   weights)


def set_threads(threads: int) -> None:
  torch.set_num_threads(threads)


def peak_memory_mb() -> float | None:
  """Peak bytes torch allocated on the GPU (None on CPU, where RSS is the measure)."""
  if not torch.cuda.is_available():
    return None
  return torch.cuda.max_memory_allocated() / 2**20
