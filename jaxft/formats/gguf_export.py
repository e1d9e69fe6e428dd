"""Writing a causal LM as one llama.cpp GGUF file: `jaxft export --format=gguf`.

The inverse of the reader (`gguf.py`), after llama.cpp's convert_hf_to_gguf.py
for a Llama: transformers tensors get llama.cpp's names (the reader's `NAMES`
read backwards), Q and K rows are permuted into llama.cpp's RoPE layout, the
hyperparameters go under `llama.*`, and the tokenizer (byte-level BPE, llama.cpp's
"gpt2") with its merges, special ids and chat template under `tokenizer.*`. The
`gguf` package converts, quantizes (`gguf.quants`) and writes (`GGUFWriter`):

  f16:  2-D weights float16.
  q8_0: 2-D weights Q8_0.
  q4_0: 2-D weights Q4_0, except the output layer (output.weight, or
        token_embd when the embeddings are tied): Q8_0. llama.cpp's quantizer
        keeps that layer above 4 bits too (its Q6_K, which gguf-py cannot write).

1-D tensors (the RMSNorm scales) stay float32 in every file: llama.cpp reads
them as float32 only. A weight whose rows are not a multiple of the 32-value
quantization block is written float16, as the converter does.

Supported: model_type llama and mistral (llama.cpp converts both to its llama
architecture) with default RoPE, no biases, SiLU, and a byte-level BPE
tokenizer; anything else is a UserError naming it. The file is written beside
OUT and renamed over it only when whole.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import tempfile
from typing import Any, Iterable, Iterator

import gguf
import numpy as np
import transformers
from flax import nnx

from jaxft import config as config_lib
from jaxft import metrics
from jaxft.errors import UserError
from jaxft.formats import gguf as gguf_reader
from jaxft.formats import hf
from jaxft.formats import hub
from jaxft.models import llama
from jaxft.models import registry
from jaxft.models import rope

QUANTS = config_lib.GGUF_QUANTS
MODEL_TYPES = ("llama", "mistral")
# Metadata key of a jaxft export (JSON: format, quant, step, workdir), written right after
# general.architecture; it tells an earlier export, which a new one replaces, from other files.
MARKER = "jaxft.export"
_ARCH = "llama"
_Q = gguf.GGMLQuantizationType
_WEIGHT_TYPE = {"f16": _Q.F16, "q8_0": _Q.Q8_0, "q4_0": _Q.Q4_0}
_FILE_TYPE = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}

# transformers key pattern -> llama.cpp name template: the reader's table reversed.
_TO_GGUF = tuple((re.escape(theirs).replace(re.escape(r"\1"), r"(\d+)"),
                  ours.replace(r"(\d+)", r"\1").replace("\\.", "."))
                 for ours, theirs in gguf_reader.NAMES)

# llama.cpp names a BPE pre-tokenizer (`tokenizer.ggml.pre`: how text is split before
# the merges) by the hash of the ids a tokenizer gives this text; the text and the
# hashes are convert_hf_to_gguf.py's (get_vocab_base_pre), for the Llama-architecture
# byte-level tokenizers jaxft meets.
_CHKTXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis '
    'concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 '
    'កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български '
    '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? '
    '\'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def gguf_name(key: str) -> str | None:
  """llama.cpp's name for a transformers Llama key (`blk.3.attn_q.weight`), or None."""
  for pattern, template in _TO_GGUF:
    if re.fullmatch(pattern, key):
      return re.sub(pattern, template, key)
  return None


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
  """Interleaves the rotary halves of each head's rows, as llama.cpp's RoPE expects.

  transformers rotates dimension i with i + head_dim/2; llama.cpp rotates
  adjacent pairs (2i, 2i + 1). The reader's `_unpermute` undoes this.
  """
  half = weights.shape[0] // heads // 2
  return (weights.reshape(heads, 2, half, *weights.shape[1:]).swapaxes(1, 2)
          .reshape(weights.shape))


# ---------------------------------------------------------------- checks


def check_model(hf_config: transformers.PretrainedConfig) -> None:
  """Raises UserError unless llama.cpp's llama architecture computes what this model does."""
  kind = hf_config.model_type
  if kind not in MODEL_TYPES:
    raise UserError(f"--format=gguf exports model_type {' or '.join(MODEL_TYPES)}; this run's "
                    f"model is {kind!r}: export --format=hf and convert that folder with "
                    "llama.cpp's convert_hf_to_gguf.py")
  rope_kind = rope.rope_type(llama.rope_parameters(hf_config))
  unsupported = {
      f"rope_type {rope_kind!r} (the export writes default RoPE only)": rope_kind != "default",
      "attention_bias": bool(getattr(hf_config, "attention_bias", False)),
      "mlp_bias": bool(getattr(hf_config, "mlp_bias", False)),
      f"hidden_act {getattr(hf_config, 'hidden_act', 'silu')!r} (llama.cpp's llama uses silu)":
          getattr(hf_config, "hidden_act", "silu") != "silu",
  }
  found = [what for what, present in unsupported.items() if present]
  if found:
    raise UserError(f"--format=gguf cannot export this {kind} model: it has {', '.join(found)}; "
                    "export --format=hf instead")


def _is_earlier_export(path: str) -> bool:
  try:
    return isinstance(json.loads(gguf_reader.field(path, MARKER) or "null"), dict)
  except (UserError, ValueError):  # Not GGUF, corrupt, or a marker that is not ours.
    return False


def check_target(out: str, overwrite: bool, base_model: str = "") -> None:
  """Raises UserError unless the GGUF export may be written to the file `out`.

  `out` is a local path ending in .gguf, not a folder. An existing file is
  replaced if it is an earlier jaxft GGUF export, any other only with
  `overwrite`, and never the run's base model `base_model` (config.model.path).
  """
  if out.startswith("gs://"):
    raise UserError(f"--format=gguf writes a local file, not {out}: export here, then copy it")
  if not gguf_reader.is_gguf(out):
    raise UserError(f"--format=gguf writes one file: --out must end in .gguf, got {out}")
  if os.path.isdir(out):
    raise UserError(f"{out} is a folder; --format=gguf writes a file: choose another --out")
  if not os.path.exists(out):
    return
  if base_model and os.path.exists(base_model) and os.path.samefile(out, base_model):
    raise UserError(f"{out} is this run's base model (config.model.path), which the run needs: "
                    "choose another --out")
  if not overwrite and not _is_earlier_export(out):
    raise UserError(f"{out} exists and is no earlier jaxft GGUF export: pass --overwrite to "
                    "replace it, or choose another --out")


# ---------------------------------------------------------------- metadata


def _add_hparams(writer: gguf.GGUFWriter, c: transformers.PretrainedConfig, quant: str) -> None:
  """The `llama.*` keys llama.cpp (and the reader, `gguf.read_config`) build the model from."""
  heads = c.num_attention_heads
  head_dim = llama.head_dim(c)
  writer.add_context_length(c.max_position_embeddings)
  writer.add_embedding_length(c.hidden_size)
  writer.add_block_count(c.num_hidden_layers)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(heads)
  writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or heads)
  writer.add_rope_freq_base(float(llama.rope_parameters(c).get("rope_theta", 10000.0)))
  writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
  writer.add_file_type(_FILE_TYPE[quant])
  writer.add_vocab_size(c.vocab_size)
  writer.add_rope_dimension_count(head_dim)
  if head_dim != c.hidden_size // heads:  # llama.cpp assumes hidden_size / heads otherwise.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _has_type(node: Any, kind: str) -> bool:
  """Whether a tokenizer.json component (or one nested in a Sequence) is of type `kind`."""
  if isinstance(node, dict):
    return node.get("type") == kind or any(_has_type(v, kind) for v in node.values())
  return isinstance(node, list) and any(_has_type(v, kind) for v in node)


def _check_byte_level_bpe(tokenizer: Any) -> None:
  spec = json.loads(tokenizer.backend_tokenizer.to_str())
  if spec["model"].get("type") != "BPE" or not (_has_type(spec.get("pre_tokenizer"), "ByteLevel")
                                                or _has_type(spec.get("decoder"), "ByteLevel")):
    raise UserError("--format=gguf exports byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM "
                    f"style); this model's is a {spec['model'].get('type')} tokenizer without "
                    "ByteLevel: export --format=hf and convert it with llama.cpp's "
                    "convert_hf_to_gguf.py")


def _looks_special(token: str) -> bool:
  # Added tokens some tokenizers fail to mark special (convert_hf_to_gguf's list, abridged).
  return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))


def _vocab(tokenizer: Any, size: int) -> tuple[list[str], list[int]]:
  """Token strings and llama.cpp token types for ids 0..size-1 (get_vocab_base's rules)."""
  by_id = {i: t for t, i in tokenizer.get_vocab().items()}
  if max(by_id) >= size:
    raise UserError(f"the tokenizer has token id {max(by_id)}, beyond the model's "
                    f"vocab_size {size}")
  added = tokenizer.added_tokens_decoder
  tokens, types = [], []
  for i in range(size):
    token = by_id.get(i)
    if token is None:  # Embedding rows past the tokenizer's vocabulary.
      tokens.append(f"[PAD{i}]")
      types.append(gguf.TokenType.UNUSED)
      continue
    if i in added:
      # llama.cpp matches added tokens in raw text: spell them as the text they stand for.
      if not added[i].normalized:
        token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
      if added[i].special or _looks_special(token):
        types.append(gguf.TokenType.CONTROL)
      else:
        token = token.replace("\u2581", " ")
        types.append(gguf.TokenType.USER_DEFINED)
    else:
      types.append(gguf.TokenType.NORMAL)
    tokens.append(token)
  return tokens, types


def _pre_tokenizer(tokenizer: Any, source: str) -> str:
  """llama.cpp's name for how the tokenizer splits text: a GGUF source's own, else by hash."""
  if gguf_reader.is_gguf(source):
    pre = gguf_reader.field(source, "tokenizer.ggml.pre")
    if isinstance(pre, str) and pre:
      return pre
  digest = hashlib.sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
  if digest in _PRE_TOKENIZERS:
    return _PRE_TOKENIZERS[digest]
  metrics.log(f"warning: the GGUF export does not know this tokenizer's pre-tokenizer (llama.cpp "
              f"hash {digest[:16]}...): written as 'default'; llama.cpp may split text unlike "
              "transformers")
  return "default"


def _adds_bos_eos(tokenizer: Any) -> dict[str, bool]:
  """Whether encoding text adds BOS / EOS: llama.cpp then does the same."""
  ids = tokenizer("a")["input_ids"]
  return {"bos": tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id,
          "eos": tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id}


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, source: str,
                   hf_config: transformers.PretrainedConfig) -> None:
  """`tokenizer.*`: vocabulary, types, merges, special ids and flags, chat template."""
  _check_byte_level_bpe(tokenizer)
  tokens, types = _vocab(tokenizer, hf_config.vocab_size)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(_pre_tokenizer(tokenizer, source))
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  # gguf's SpecialVocab reads merges, special ids and the chat template from a saved
  # tokenizer folder (with config.json for ids the tokenizer lacks), as the converter does.
  with tempfile.TemporaryDirectory() as folder:
    tokenizer.save_pretrained(folder)
    hf_config.to_json_file(os.path.join(folder, "config.json"))
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
  special.add_special_token.update(_adds_bos_eos(tokenizer))
  if special.chat_template is None:
    special.chat_template = getattr(tokenizer, "chat_template", None)
  special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------- tensors


def _tensor_type(name: str, ndim: int, quant: str, tied: bool) -> gguf.GGMLQuantizationType:
  if ndim < 2:
    return _Q.F32
  if quant == "q4_0" and name == ("token_embd.weight" if tied else "output.weight"):
    return _Q.Q8_0
  return _WEIGHT_TYPE[quant]


def _converted(name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType
               ) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
  try:
    return gguf.quants.quantize(array, qtype), qtype
  except gguf.quants.QuantError:  # Rows not a multiple of the block: the converter's fallback.
    metrics.log(f"{name}: rows of {array.shape[-1]} values do not split into {qtype.name} "
                "blocks; written float16")
    return array.astype(np.float16), _Q.F16


def _gguf_tensors(named: Iterable[tuple[str, str, np.ndarray]],
                  hf_config: transformers.PretrainedConfig, quant: str
                  ) -> Iterator[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
  """(llama.cpp name, data, type) for each (path, transformers key, float32 array)."""
  heads = hf_config.num_attention_heads
  kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
  for _, key, array in named:
    name = gguf_name(key)
    if name is None:
      raise UserError(f"--format=gguf has no llama.cpp name for the tensor {key}")
    if key.endswith("q_proj.weight"):
      array = permute(array, heads)
    elif key.endswith("k_proj.weight"):
      array = permute(array, kv_heads)
    qtype = _tensor_type(name, array.ndim, quant, hf_config.tie_word_embeddings)
    yield (name, *_converted(name, array, qtype))


# ---------------------------------------------------------------- writing


def _write(writer: gguf.GGUFWriter, out: str) -> None:
  """Writes the file beside `out`, then renames it over `out`: never half a file there."""
  folder = os.path.dirname(os.path.abspath(out))
  os.makedirs(folder, exist_ok=True)
  fd, part = tempfile.mkstemp(prefix=".jaxft-export-", suffix=".part", dir=folder)
  os.close(fd)
  try:
    writer.write_header_to_file(path=part)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(part, "rb+") as f:
      os.fsync(f.fileno())  # On disk before the rename makes it the export.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(part, 0o666 & ~umask)  # mkstemp's 0600 is not an export's mode.
    os.replace(part, out)
  except OSError as e:  # A full disk, a read-only folder...
    raise UserError(f"writing {out} failed: {e}; {out} is unchanged (the file is written "
                    "aside and renamed into place only when whole)") from e
  finally:
    writer.close()
    if os.path.exists(part):
      os.remove(part)


def export(model: nnx.Module, hf_config: transformers.PretrainedConfig, out: str, *,
           tokenizer_path: str, quant: str = "f16", name: str | None = None,
           info: dict[str, Any] | None = None, primary: bool = True) -> None:
  """Writes `model` (LoRA already merged) as the llama.cpp GGUF file `out`.

  `tokenizer_path`: the checkpoint folder or .gguf file whose tokenizer (and
  chat template) goes in. `quant`: one of QUANTS (module docstring). `name`:
  general.name. `info`: recorded under MARKER (format, step, workdir). Every
  process must call this (sharded params are gathered); only `primary` writes.

  Raises:
    UserError: a model or tokenizer llama.cpp's llama architecture cannot
      run (`check_model`), an unknown quant, or a failed write.
  """
  if quant not in QUANTS:
    raise UserError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
  check_model(hf_config)
  named = hf.export_tensors(model, registry.lookup(hf_config.model_type, "causal_lm").layout)
  if not primary:
    collections.deque(named, maxlen=0)  # Takes part in gathering the sharded params.
    return
  # use_temp_file: each tensor goes to disk as it comes, not all of them into memory first.
  writer = gguf.GGUFWriter(path=None, arch=_ARCH, use_temp_file=True)
  if info is not None:
    writer.add_string(MARKER, json.dumps(info))
  writer.add_type(gguf.GGUFType.MODEL)
  if name:
    writer.add_name(name)
  _add_hparams(writer, hf_config, quant)
  _add_tokenizer(writer, hub.load_tokenizer(tokenizer_path), tokenizer_path, hf_config)
  for tensor_name, data, qtype in _gguf_tensors(named, hf_config, quant):
    writer.add_tensor(tensor_name, data, raw_dtype=qtype)
  _write(writer, out)
