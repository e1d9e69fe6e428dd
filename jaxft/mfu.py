"""Model FLOPs utilisation: the model's training FLOPs per second over the devices' peak.

Training FLOPs per token (the PaLM appendix B convention):

  6 * N + 12 * L * S * A

N counts the parameters that multiply activations: every Linear / conv
`kernel`, plus a tied input embedding when it is also the output layer
(lookup-only embedding tables, norms and biases do no matmuls). 6 = forward
2 + backward 4 per weight per token. The second term is attention's QK^T and
AV for L layers over S positions with A = heads x head_dim. The figure counts
the whole model's work, also for frozen layers (whose weight gradients are
skipped), so it is the conventional MFU, not the share of work done.

Peak: the chip's datasheet dense bf16 figure on TPU / GPU; on CPU, a float32
matmul measured on this machine (what the 2 cores actually reach).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxft.aot import topology

# Dense bf16 peak FLOP/s per GPU (vendor datasheets), by substrings of
# device_kind; TPU chips' are topology.CHIPS', by their exact device_kind.
DATASHEET = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}
_TPU_PEAKS = {chip.device_kind: chip.peak_flops for chip in topology.CHIPS.values()}


def matmul_params(sizes: dict[str, int], output_embedding: str | None = None) -> int:
  """N above, from param path -> element count.

  `output_embedding`: the path of an embedding table that is also the output
  projection (tied), whose elements then count too.
  """
  n = sum(v for p, v in sizes.items() if p.endswith("/kernel"))
  if output_embedding:
    n += sizes[output_embedding]
  return n


def train_flops_per_token(n_matmul: int, layers: int, seq_len: int, attn_dim: int) -> float:
  """6 N + 12 L S A: training FLOPs per token (see the module docstring)."""
  return 6.0 * n_matmul + 12.0 * layers * seq_len * attn_dim


def model_shape(hf_config: Any) -> tuple[int, int]:
  """(layers, heads x head_dim) of a transformers config."""
  layers = getattr(hf_config, "num_hidden_layers", None) or getattr(hf_config, "n_layers")
  heads = getattr(hf_config, "num_attention_heads", None) or getattr(hf_config, "n_heads")
  head_dim = getattr(hf_config, "head_dim", None)
  hidden = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "dim")
  return int(layers), int(heads * head_dim if head_dim else hidden)


_MEASURED: dict[str, float] = {}


def measured_matmul_peak(size: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of the best of `repeats` float32 [size, size] matmuls on the default device.

  Best of 10, not 3: on a shared 2-core VM, best-of-3 read 97 to 161 GFLOP/s
  within one hour as neighbours came and went (about 1 s of matmuls in all).
  """
  if "peak" not in _MEASURED:
    a = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      f(a).block_until_ready()
      best = min(best, time.perf_counter() - t)
    _MEASURED["peak"] = 2.0 * size ** 3 / best
  return _MEASURED["peak"]


def peak_flops(device: Any = None) -> float:
  """Peak FLOP/s of one device: datasheet bf16 for known accelerators, else measured."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  if kind in _TPU_PEAKS:  # Exact: "TPU v5" (v5p) is a prefix of "TPU v5 lite" (v5e).
    return _TPU_PEAKS[kind]
  for name, peak in DATASHEET.items():
    if name.lower() in kind.lower():
      return peak
  return measured_matmul_peak()
