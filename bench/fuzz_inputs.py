"""Fuzz jaxft's input loaders with mutated real files: every outcome must be a load or a
clear UserError naming the file.

  python -m bench.fuzz_inputs                     # 1000 mutated files per format
  python -m bench.fuzz_inputs --per-format 60 --json out.json

Makes one small real file per format (a tiny BERT's model.safetensors and its
config.json, a tiny Llama GGUF with Q8_0 and F32 tensors and a vocabulary, a
JSON Lines and a CSV text-classification file, a PNG in an image folder), then,
seeded, mutates each many times: bit flips, truncation at random points, and
edits of the structure (the safetensors header length and JSON fields, GGUF
counts, lengths and offsets, config.json values of the wrong type or size, a
JSON Lines row missing its label or not an object, a CSV row with a field too
few or too many or an open quote, a PNG's dimensions). Each mutated file goes
through the loader a user's run calls, in this process (`hf.load`;
`sources.load_split`, every row then read back; `image_files.load_folder`), and
is counted as

  ok          loaded (a mutation can be harmless: a flipped bit in a weight),
  user_error  a UserError whose message names the mutated file,
  failure     anything else: another exception (a crash), a UserError that
              does not name the file, a case over --timeout-s (a hang, by
              SIGALRM), or a MemoryError anywhere in the exception's chain
              (the process's address space is capped at what the loaders
              needed for the unmutated files plus --memory-gb, so an attempt
              to allocate by a corrupt size fails there).

A case that kills the process (a segfault in native code) ends the run: with
--progress, the file's last line is that case. Prints a table of the counts per
format and the first failures (with the mutation that caused each); exits 1 if
any case failed. tests/test_fuzz_inputs.py runs it with fewer cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zlib
from typing import Callable

import numpy as np

FORMATS = ("safetensors", "gguf", "config", "jsonl", "csv", "png")

Mutation = tuple[bytes, str]  # (the mutated file's bytes, what was done)


class _Hang(BaseException):
  """Raised by SIGALRM; a BaseException so no loader's `except Exception` takes it."""


# ---------------------------------------------------------------- sample files


@dataclasses.dataclass
class Sample:
  """A pristine file to mutate, inside a folder the loader reads.

  folder: copied whole for each case; file: the mutated file, relative to it;
  load: the loader, given the case's folder; mutations: each makes a mutated file
  from the pristine bytes, picked at random (a repeat weighs it more).
  """
  folder: str
  file: str
  load: Callable[[str], object]
  mutations: tuple[Callable[[bytes, random.Random], Mutation], ...]


def _tiny_bert(folder: str) -> None:
  import transformers  # pylint: disable=g-import-not-at-top
  from jaxft.formats import hf  # pylint: disable=g-import-not-at-top
  config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, vocab_size=100,
                                   max_position_embeddings=64, num_labels=2)
  hf.export(hf.init_model(config, "classify").model, config, "classify", folder)


def tiny_llama_gguf(path: str) -> None:
  """A 2-layer Llama (hidden 32, 4 heads, 2 KV heads, vocab 32) as llama.cpp writes it:
  Q8_0 attention-query and MLP kernels, F32 elsewhere, a token list with scores."""
  import gguf  # pylint: disable=g-import-not-at-top
  hidden, heads, kv_heads, ff, layers, vocab = 32, 4, 2, 64, 2, 32
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_context_length(64)
  writer.add_embedding_length(hidden)
  writer.add_block_count(layers)
  writer.add_feed_forward_length(ff)
  writer.add_head_count(heads)
  writer.add_head_count_kv(kv_heads)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_rope_freq_base(10000.0)
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list([f"t{i}" for i in range(vocab)])
  writer.add_token_scores([0.0] * vocab)
  writer.add_token_types([1] * vocab)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  rng = np.random.default_rng(0)

  def tensor(name: str, shape: tuple[int, ...], quantized: bool = False) -> None:
    value = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    if quantized:
      q8 = gguf.GGMLQuantizationType.Q8_0
      writer.add_tensor(name, gguf.quants.quantize(value, q8), raw_dtype=q8)
    else:
      writer.add_tensor(name, value)

  kv = kv_heads * hidden // heads
  tensor("token_embd.weight", (vocab, hidden))
  tensor("output_norm.weight", (hidden,))
  for i in range(layers):
    tensor(f"blk.{i}.attn_norm.weight", (hidden,))
    tensor(f"blk.{i}.ffn_norm.weight", (hidden,))
    tensor(f"blk.{i}.attn_q.weight", (hidden, hidden), quantized=True)
    tensor(f"blk.{i}.attn_k.weight", (kv, hidden))
    tensor(f"blk.{i}.attn_v.weight", (kv, hidden))
    tensor(f"blk.{i}.attn_output.weight", (hidden, hidden))
    tensor(f"blk.{i}.ffn_gate.weight", (ff, hidden), quantized=True)
    tensor(f"blk.{i}.ffn_up.weight", (ff, hidden))
    tensor(f"blk.{i}.ffn_down.weight", (hidden, ff), quantized=True)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _jsonl(path: str, rows: int = 200) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for i in range(rows):
      f.write(json.dumps({"text": f"review number {i} was {'good' if i % 2 else 'bad'}",
                          "label": i % 2}) + "\n")


def _csv(path: str, rows: int = 200) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write("text,label\n")
    for i in range(rows):
      f.write(f"\"review number {i}, {'good' if i % 2 else 'bad'}\",{i % 2}\n")


def _image_folder(folder: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for name in ("cat", "dog"):
    os.makedirs(os.path.join(folder, name))
    for i in range(2):
      pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(folder, name, f"{i}.png"))


def make_samples(root: str) -> dict[str, Sample]:
  """One sample per format under `root`, each loaded once unmutated (which must work)."""
  from jaxft.data import image_files  # pylint: disable=g-import-not-at-top
  from jaxft.data import sources  # pylint: disable=g-import-not-at-top
  from jaxft.formats import hf  # pylint: disable=g-import-not-at-top
  bert = os.path.join(root, "bert")
  _tiny_bert(bert)
  os.makedirs(os.path.join(root, "gguf"))
  tiny_llama_gguf(os.path.join(root, "gguf", "model.gguf"))
  os.makedirs(os.path.join(root, "jsonl"))
  _jsonl(os.path.join(root, "jsonl", "train.jsonl"))
  os.makedirs(os.path.join(root, "csv"))
  _csv(os.path.join(root, "csv", "train.csv"))
  _image_folder(os.path.join(root, "png"))
  load_bert = lambda folder: hf.load(folder, "classify", num_labels=2)
  samples = {
      "safetensors": Sample(bert, "model.safetensors", load_bert, _SAFETENSORS_MUTATIONS),
      "gguf": Sample(os.path.join(root, "gguf"), "model.gguf",
                     lambda folder: hf.load(os.path.join(folder, "model.gguf"), "causal_lm"),
                     _GGUF_MUTATIONS),
      "config": Sample(bert, "config.json", load_bert, _CONFIG_MUTATIONS),
      # Every row read back too, as tokenizing would: a value `datasets` stored but
      # cannot give back is a failure of the load.
      "jsonl": Sample(os.path.join(root, "jsonl"), "train.jsonl",
                      lambda folder: sources.load_split(
                          os.path.join(folder, "train.jsonl"), "train",
                          required=["text", "label"]).to_list(),
                      _JSONL_MUTATIONS),
      "csv": Sample(os.path.join(root, "csv"), "train.csv",
                    lambda folder: sources.load_split(
                        os.path.join(folder, "train.csv"), "train",
                        required=["text", "label"]).to_list(),
                    _CSV_MUTATIONS),
      "png": Sample(os.path.join(root, "png"), os.path.join("cat", "0.png"),
                    image_files.load_folder, _PNG_MUTATIONS),
  }
  for sample in samples.values():
    sample.load(sample.folder)
  return samples


# ---------------------------------------------------------------- mutations

# Sizes, counts and offsets a corrupt or hostile file might hold.
_HOSTILE_NUMBERS = (0, 1, 7, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 10**12,
                    2**40, 2**62, 2**63, 2**64 - 1)


def bit_flips(data: bytes, rng: random.Random, region: int | None = None) -> Mutation:
  """1 to 8 random bits flipped, within the first `region` bytes when given."""
  out = bytearray(data)
  end = min(region or len(data), len(data))
  spots = sorted(rng.randrange(end) * 8 + rng.randrange(8) for _ in range(rng.randint(1, 8)))
  for spot in spots:
    out[spot // 8] ^= 1 << (spot % 8)
  return bytes(out), f"bits flipped at {[s // 8 for s in spots]}"


def truncation(data: bytes, rng: random.Random, region: int | None = None) -> Mutation:
  """The file cut at a random point (within the first `region` bytes when given)."""
  cut = rng.randrange(min(region or len(data), len(data)))
  return data[:cut], f"truncated to {cut} of {len(data)} bytes"


def garbage(data: bytes, rng: random.Random) -> Mutation:
  """A run of random bytes over a random part of the file."""
  start = rng.randrange(len(data))
  run = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
  return data[:start] + run + data[start + len(run):], f"{len(run)} random bytes at {start}"


def _in_head(fn: Callable, head: Callable[[bytes], int]) -> Callable[[bytes, random.Random],
                                                                       Mutation]:
  """`fn` confined to the header (`head(data)` bytes) 3 times in 4; anywhere otherwise.

  Most of a weights file is tensor data, where a flip is harmless; the parsers' risks
  are in the header.
  """
  def mutate(data: bytes, rng: random.Random) -> Mutation:
    return fn(data, rng, head(data) if rng.random() < 0.75 else None)
  mutate.__name__ = fn.__name__
  return mutate


# safetensors: 8-byte header length, JSON header, data.

def _st_header(data: bytes) -> tuple[int, dict]:
  n = struct.unpack_from("<Q", data)[0]
  return n, json.loads(data[8:8 + n])


def _st_with_header(data: bytes, header: dict) -> bytes:
  n = _st_header(data)[0]
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def st_length(data: bytes, rng: random.Random) -> Mutation:
  """The header length field set to a hostile value (a terabyte, 2**64 - 1, 0, ...)."""
  n = _st_header(data)[0]
  value = rng.choice(_HOSTILE_NUMBERS + (n - 1, n + 1, len(data)))
  return struct.pack("<Q", value) + data[8:], f"header length {n} -> {value}"


def st_field(data: bytes, rng: random.Random) -> Mutation:
  """One field of one tensor's header entry replaced, or the entry renamed or dropped."""
  header = _st_header(data)[1]
  name = rng.choice([k for k in header if k != "__metadata__"])
  entry = header[name]
  what = rng.choice(("dtype", "shape", "data_offsets", "drop_key", "rename", "entry"))
  if what == "dtype":
    entry["dtype"] = rng.choice(("F99", "I64", "I32", "BOOL", "U8", "F16", "BF16", "F8_E8M0",
                                 "C64", "F4", "", 5, None, [], {}))
  elif what == "shape":
    shape = list(entry["shape"])
    i = rng.randrange(len(shape))
    shape[i] = rng.choice((0, 1, -1, shape[i] + 1, shape[i] * 2, 10**12, "8", None, 2.5))
    entry["shape"] = rng.choice((shape, shape + [1], shape[:-1], "x"))
  elif what == "data_offsets":
    begin, end = entry["data_offsets"]
    entry["data_offsets"] = rng.choice(([end, begin], [begin, end * 2], [0, 10**15], [begin],
                                        [begin, end + 4], [-1, end], "x", [begin, 2**64]))
  elif what == "drop_key":
    entry.pop(rng.choice(list(entry)))
  elif what == "rename":
    header[name + ".x"] = header.pop(name)
  else:
    header[name] = rng.choice(([], "x", None, 5))
  return _st_with_header(data, header), f"header of {name!r}: {what} -> {header.get(name)!r}"


def st_text(data: bytes, rng: random.Random) -> Mutation:
  """One byte of the JSON header replaced by a JSON-significant character."""
  n = _st_header(data)[0]
  at = 8 + rng.randrange(n)
  char = rng.choice(b'{}[]",:0123456789-e ')
  return data[:at] + bytes([char]) + data[at + 1:], f"header byte {at} -> {chr(char)!r}"


_st_head = lambda data: 8 + struct.unpack_from("<Q", data)[0]
_SAFETENSORS_MUTATIONS = (_in_head(bit_flips, _st_head), _in_head(truncation, _st_head),
                          st_length, st_field, st_field, st_text)


# GGUF: magic, version, tensor count, metadata count, metadata, tensor infos, data.

@functools.lru_cache(maxsize=1)
def _gguf_head(data: bytes) -> int:
  """Where the tensor data of the (pristine) GGUF file `data` starts: the header's end."""
  import gguf  # pylint: disable=g-import-not-at-top
  with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
    f.write(data)
    f.flush()
    return int(gguf.GGUFReader(f.name).data_offset)


def gguf_count(data: bytes, rng: random.Random) -> Mutation:
  """The tensor or metadata count set to a hostile value."""
  at, name = rng.choice(((8, "tensor count"), (16, "metadata count")))
  value = rng.choice(_HOSTILE_NUMBERS)
  return data[:at] + struct.pack("<Q", value) + data[at + 8:], f"{name} -> {value}"


def gguf_number(data: bytes, rng: random.Random) -> Mutation:
  """A 4- or 8-byte number somewhere in the header (a length, count, dimension, type
  or offset, or part of one) overwritten with a hostile value."""
  size = rng.choice((4, 8))
  at = rng.randrange(24, _gguf_head(data) - size)
  value = rng.choice(_HOSTILE_NUMBERS) % 2 ** (8 * size)
  packed = struct.pack("<I" if size == 4 else "<Q", value)
  return data[:at] + packed + data[at + size:], f"{size}-byte number at {at} -> {value}"


_GGUF_MUTATIONS = (_in_head(bit_flips, _gguf_head), _in_head(truncation, _gguf_head),
                   gguf_count, gguf_number, gguf_number, garbage)


# config.json

_CONFIG_VALUES = ("abc", [32], -32, 0, 10**12, 2**40, None, 2.5, True, {}, "", 33, 3, 1e300)


def config_value(data: bytes, rng: random.Random) -> Mutation:
  """One key set to a value of the wrong type or size, dropped, or model_type changed."""
  config = json.loads(data)
  what = rng.random()
  if what < 0.15:
    config["model_type"] = rng.choice(("gpt2", "llama", "bertx", 5, None, "", ["bert"]))
    change = f"model_type -> {config['model_type']!r}"
  elif what < 0.3:
    key = rng.choice(list(config))
    del config[key]
    change = f"{key} dropped"
  else:
    key = rng.choice(list(config))
    config[key] = rng.choice(_CONFIG_VALUES)
    change = f"{key} -> {config[key]!r}"
  return json.dumps(config, indent=2).encode(), change


def config_text(data: bytes, rng: random.Random) -> Mutation:
  """Not a config at all: another JSON value, text, or nothing."""
  text = rng.choice((b"[1, 2, 3]", b'"bert"', b"null", b"hello", b"", b"{", b"\xff\xfe{}"))
  return text, f"replaced by {text!r}"


_CONFIG_MUTATIONS = (bit_flips, truncation, config_value, config_value, config_value,
                     config_text)


# JSON Lines data

def jsonl_row(data: bytes, rng: random.Random) -> Mutation:
  """One row without its label, with a label or text of the wrong type, not an object,
  or cut short."""
  lines = data.decode().split("\n")
  i = rng.randrange(len(lines) - 1)
  row = json.loads(lines[i])
  what = rng.choice(("no_label", "label", "text", "not_object", "cut", "extra", "blank"))
  if what == "no_label":
    del row["label"]
  elif what == "label":
    row["label"] = rng.choice((None, "x", [1], {}, 2.5, True, -1))
  elif what == "text":
    row["text"] = rng.choice((None, 5, ["a"], {}))
  elif what == "extra":
    row["other"] = 1
  lines[i] = {"not_object": rng.choice(("[1, 2]", "5", "null", '"text"')),
              "cut": lines[i][:rng.randrange(1, len(lines[i]))],
              "blank": ""}.get(what, json.dumps(row))
  return "\n".join(lines).encode(), f"line {i + 1}: {what} -> {lines[i]!r}"


def not_utf8(data: bytes, rng: random.Random) -> Mutation:
  """A byte that is never UTF-8 (0xff) somewhere."""
  at = rng.randrange(len(data))
  return data[:at] + b"\xff" + data[at + 1:], f"byte {at} -> 0xff"


_JSONL_MUTATIONS = (bit_flips, truncation, jsonl_row, jsonl_row, jsonl_row, not_utf8)


# CSV data

def csv_row(data: bytes, rng: random.Random) -> Mutation:
  """One row without its label, with a field too many, an open quote, or cut short."""
  lines = data.decode().split("\n")
  i = rng.randrange(1, len(lines) - 1)
  text, label = lines[i].rsplit(",", 1)
  what = rng.choice(("no_label", "extra", "open_quote", "cut", "no_comma", "header"))
  lines[i] = {"no_label": f"{text},", "extra": f"{text},{label},3",
              "open_quote": f"{text[:5]},{label}", "cut": lines[i][:rng.randrange(len(lines[i]))],
              "no_comma": text}.get(what, lines[i])
  if what == "header":
    i, lines[0] = 0, rng.choice(("text", "text,label,other", "", "label,label"))
  return "\n".join(lines).encode(), f"line {i + 1}: {what} -> {lines[i]!r}"


_CSV_MUTATIONS = (bit_flips, truncation, csv_row, csv_row, csv_row, not_utf8)


# PNG

def png_with_size(data: bytes, width: int, height: int) -> bytes:
  """The PNG `data` with its IHDR width and height replaced, CRC fixed (so they are
  believed)."""
  ihdr = bytearray(data[12:29])  # Chunk type and 13 bytes of IHDR data.
  struct.pack_into(">II", ihdr, 4, width, height)
  return data[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + data[33:]


def png_size(data: bytes, rng: random.Random) -> Mutation:
  """The IHDR width and height set to hostile values."""
  width, height = (rng.choice(_HOSTILE_NUMBERS[:10]) % 2**32 for _ in range(2))
  return png_with_size(data, width, height), f"IHDR size -> {width} x {height}"


def not_an_image(data: bytes, rng: random.Random) -> Mutation:
  text = rng.choice((b"not an image", b"", b"\x89PNG\r\n\x1a\n", b"GIF89a" + b"\0" * 20,
                     b"\xff\xd8\xff\xe0" + b"\0" * 30, b"BM" + b"\xff" * 60))
  return text, f"replaced by {text[:16]!r}"


_PNG_MUTATIONS = (_in_head(bit_flips, lambda d: 64), truncation, png_size, garbage,
                  not_an_image)


# ---------------------------------------------------------------- running cases


@dataclasses.dataclass
class Tally:
  """Outcomes of one format's cases."""
  tried: int = 0
  ok: int = 0
  user_error: int = 0
  failures: list[str] = dataclasses.field(default_factory=list)
  messages: list[str] = dataclasses.field(default_factory=list)  # Of the UserErrors.


def run_case(sample: Sample, data: bytes, case_dir: str, timeout_s: int) -> tuple[str, str]:
  """(outcome, detail) of loading `data` as the sample's file, in a copy of its folder.

  outcome: "ok", "user_error" or "failure". Each case has its own folder, so no cache
  keyed by path and modification time (the GGUF reader's, `datasets`') sees an old file.
  """
  from jaxft import errors  # pylint: disable=g-import-not-at-top
  shutil.copytree(sample.folder, case_dir)
  path = os.path.join(case_dir, sample.file)
  with open(path, "wb") as f:
    f.write(data)
  signal.alarm(timeout_s)
  try:
    sample.load(case_dir)
    return "ok", ""
  except _Hang:
    return "failure", f"no outcome after {timeout_s} s (hang)"
  except errors.UserError as e:
    if errors.caused_by(e, MemoryError):
      return "failure", f"MemoryError behind a UserError: {e}"
    if path not in str(e):
      return "failure", f"UserError without the file's path: {e}"
    return "user_error", str(e)
  except Exception as e:  # pylint: disable=broad-except
    kind = ("MemoryError (an oversized allocation)" if errors.caused_by(e, MemoryError)
            else "crash")
    where = traceback.extract_tb(e.__traceback__)[-1]
    return "failure", (f"{kind}: {type(e).__name__}: {str(e)[:300]} "
                       f"(at {where.filename}:{where.lineno})")
  finally:
    signal.alarm(0)
    shutil.rmtree(case_dir, ignore_errors=True)


def _on_alarm(signum: int, frame: object) -> None:
  raise _Hang()


def _cap_address_space(extra_gb: float) -> None:
  """Caps this process's address space at its present size plus `extra_gb`."""
  with open("/proc/self/status") as f:
    vm_kb = next(int(l.split()[1]) for l in f if l.startswith("VmSize:"))
  limit = vm_kb * 1024 + int(extra_gb * 2**30)
  resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _isolate(work: str) -> None:
  """A private dataset cache, no network, the CPU: set before `datasets` and JAX load.

  File loading needs no accelerator, and the address-space cap would trip a GPU runtime.
  """
  os.environ["HF_DATASETS_CACHE"] = os.path.join(work, "datasets-cache")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def fuzz(work: str, per_format: int, seed: int, formats: tuple[str, ...] = FORMATS,
         memory_gb: float = 4.0, timeout_s: int = 60,
         progress: str | None = None) -> dict[str, Tally]:
  """Runs `per_format` mutated files of each format in folder `work`; their outcomes by
  format. Caps this process's address space (`_cap_address_space`) and sets SIGALRM's
  handler: run it in a process of its own (`main`).

  `progress`: a file to which each case is written before it runs, so that one
  that kills the process (a segfault in native code) is known.
  """
  import logging  # pylint: disable=g-import-not-at-top
  logging.disable(logging.WARNING)  # transformers' and datasets' warnings on bad input.
  samples = make_samples(os.path.join(work, "samples"))
  _cap_address_space(memory_gb)
  signal.signal(signal.SIGALRM, _on_alarm)
  tallies = {}
  for fmt in formats:
    sample, tally = samples[fmt], Tally()
    rng = random.Random(f"{seed}-{fmt}")
    with open(os.path.join(sample.folder, sample.file), "rb") as f:
      pristine = f.read()
    for i in range(per_format):
      mutate = rng.choice(sample.mutations)
      data, change = mutate(pristine, rng)
      if progress:
        with open(progress, "a") as f:
          f.write(f"{fmt} case {i} ({mutate.__name__}: {change})\n")
      outcome, detail = run_case(sample, data, os.path.join(work, f"{fmt}-{i}"), timeout_s)
      tally.tried += 1
      if outcome == "failure":
        tally.failures.append(f"case {i} ({mutate.__name__}: {change}): {detail}")
      else:
        setattr(tally, outcome, getattr(tally, outcome) + 1)
      if outcome == "user_error":
        tally.messages.append(detail.replace(work, "$WORK"))
    tallies[fmt] = tally
  return tallies


def _table(tallies: dict[str, Tally]) -> str:
  rows = ["| format | mutated files tried | loaded fine | clean UserError | other failures |",
          "|---|---:|---:|---:|---:|"]
  for fmt, t in tallies.items():
    rows.append(f"| {fmt} | {t.tried} | {t.ok} | {t.user_error} | {len(t.failures)} |")
  return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--per-format", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
  parser.add_argument("--memory-gb", type=float, default=4.0,
                      help="address space allowed beyond what loading the samples took")
  parser.add_argument("--timeout-s", type=int, default=60, help="per case")
  parser.add_argument("--json", help="also write the counts and failures here")
  parser.add_argument("--progress", help="append each case here before it runs")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  work = tempfile.mkdtemp(prefix="jaxft-fuzz-")
  _isolate(work)
  try:
    tallies = fuzz(work, args.per_format, args.seed, tuple(args.formats), args.memory_gb,
                   args.timeout_s, args.progress)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  wall = time.perf_counter() - start
  print(_table(tallies))
  print(f"\nseed {args.seed}, {wall:.1f} s wall")
  for fmt, t in tallies.items():
    for failure in t.failures[:10]:
      print(f"FAIL {fmt}: {failure}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"seed": args.seed, "wall_s": wall,
                 "formats": {fmt: dataclasses.asdict(t) for fmt, t in tallies.items()}}, f,
                indent=1)
  return 1 if any(t.failures for t in tallies.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
