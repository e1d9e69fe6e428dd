"""Reading llama.cpp GGUF files: config, tensors (dequantized), tokenizer.

GGUF stores a Llama-architecture model under llama.cpp's names
(`blk.3.attn_q.weight`), quantized, with Q and K rows permuted for its RoPE
layout. `checkpoint` maps names to transformers' and undoes the permutation,
so the rest of jaxft sees a transformers checkpoint; tensors are dequantized
one at a time, when read, with the `gguf` package (numpy; no torch).
"""

from __future__ import annotations

import functools
import os
import re
from typing import Callable

import numpy as np
import transformers

from jaxft.errors import UserError

# llama.cpp tensor name -> transformers state-dict key.
_NAMES = (
    (r"token_embd\.weight", r"model.embed_tokens.weight"),
    (r"output_norm\.weight", r"model.norm.weight"),
    (r"output\.weight", r"lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
)


def is_gguf(path: str) -> bool:
  return path.endswith(".gguf")


def _reader(path: str):
  if not os.path.isfile(path):
    raise UserError(f"GGUF file not found: {path}")
  stat = os.stat(path)
  return _parsed(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


# Parsing the metadata (every vocabulary string and merge, one numpy view
# each) takes ~6 s for SmolLM2 on a CPU core, and one load needs the reader
# for its config, its tensors and its tokenizer check: parse once per file
# version. The reader memory-maps the file, so keeping it is cheap.
@functools.lru_cache(maxsize=2)
def _parsed(path: str, mtime_ns: int, size: int):
  del mtime_ns, size  # Part of the cache key only: a rewritten file is parsed again.
  import gguf  # pylint: disable=g-import-not-at-top
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # A truncated or foreign file: many error types.
    raise UserError(f"cannot read GGUF file {path}: {e}") from e


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def read_config(path: str) -> transformers.PretrainedConfig:
  """A transformers LlamaConfig from the GGUF metadata.

  Raises:
    UserError: missing file, or an architecture other than llama.
  """
  reader = _reader(path)
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (llama is)")
  get = lambda key, default=None: _field(reader, f"llama.{key}", default)
  names = {t.name for t in reader.tensors}
  vocab = get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
  return transformers.LlamaConfig(
      vocab_size=int(vocab), hidden_size=int(get("embedding_length")),
      intermediate_size=int(get("feed_forward_length")),
      num_hidden_layers=int(get("block_count")),
      num_attention_heads=int(get("attention.head_count")),
      num_key_value_heads=int(get("attention.head_count_kv", get("attention.head_count"))),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      max_position_embeddings=int(get("context_length", 2048)),
      tie_word_embeddings="output.weight" not in names,
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"))


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's interleaving of the rotary halves of each head's rows."""
  half = weights.shape[0] // heads // 2
  return (weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2)
          .reshape(weights.shape))


def checkpoint(path: str) -> dict[str, Callable[[], np.ndarray]]:
  """transformers key -> a function returning that tensor, dequantized to float32."""
  import gguf  # pylint: disable=g-import-not-at-top
  reader = _reader(path)
  config = read_config(path)
  readers = {}
  for tensor in reader.tensors:
    key = next((re.sub(p, t, tensor.name) for p, t in _NAMES if re.fullmatch(p, tensor.name)),
               None)
    if key is None:
      continue  # e.g. rope_freqs: derived from the config instead.
    heads = (config.num_attention_heads if key.endswith("q_proj.weight") else
             config.num_key_value_heads if key.endswith("k_proj.weight") else 0)

    def read(tensor=tensor, heads=heads) -> np.ndarray:
      w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
      w = w.reshape(tuple(int(n) for n in reversed(tensor.shape)))
      return _unpermute(w, heads) if heads else w
    readers[key] = read
  return readers


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
  """The tokenizer (with its chat template) embedded in the GGUF file."""
  _reader(path)
  try:
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"cannot load the tokenizer embedded in {path}: {e}") from e
