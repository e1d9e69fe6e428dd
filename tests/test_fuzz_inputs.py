"""Hostile and broken input files end in a UserError naming the file (and the tensor,
key or line), never a hang, a crash deep in a library, or a huge allocation.

One test per named case, then the fuzz: `bench/fuzz_inputs.py` in a subprocess
(its address space capped, each case under a time limit), a few hundred mutated
files across the formats.
"""

import json
import shutil
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from bench import fuzz_inputs
from jaxft.data import image_files
from jaxft.data import sources
from jaxft.errors import UserError
from jaxft.formats import gguf
from jaxft.formats import hf
from jaxft.formats import hub
from jaxft.formats import weights
from tests.helpers import ROOT


def _copy(tiny_bert, tmp_path):
  folder = tmp_path / "model"
  shutil.copytree(tiny_bert.path, folder)
  return folder


def _header(path) -> tuple[int, dict, bytes]:
  """(header length, header, data) of a safetensors file."""
  raw = path.read_bytes()
  n = struct.unpack_from("<Q", raw)[0]
  return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path, header: dict, data: bytes) -> None:
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _load(folder):
  return hf.load(str(folder), "classify", num_labels=2)


# ---------------------------------------------------------------- safetensors


def test_safetensors_header_claiming_a_terabyte_is_a_clear_error_without_allocating(
    tiny_bert, tmp_path):
  folder = _copy(tiny_bert, tmp_path)
  file = folder / "model.safetensors"
  raw = file.read_bytes()
  file.write_bytes(struct.pack("<Q", 10**12) + raw[8:])
  tracemalloc.start()
  try:
    with pytest.raises(UserError) as err:
      _load(folder)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert str(file) in str(err.value)
  assert "header length field says 1,000,000,000,000 bytes, more than the file's" in str(
      err.value)
  assert peak < 50 * 2**20  # Python-side allocations; the header is never read.


def test_safetensors_malformed_json_header_names_the_file(tiny_bert, tmp_path):
  folder = _copy(tiny_bert, tmp_path)
  file = folder / "model.safetensors"
  raw = bytearray(file.read_bytes())
  raw[8] = ord("[")  # The header's opening brace.
  file.write_bytes(bytes(raw))
  with pytest.raises(UserError, match="its JSON header is malformed") as err:
    _load(folder)
  assert str(file) in str(err.value)


def test_safetensors_unknown_dtype_names_file_and_tensor(tiny_bert, tmp_path):
  folder = _copy(tiny_bert, tmp_path)
  file = folder / "model.safetensors"
  _, header, data = _header(file)
  header["classifier.bias"]["dtype"] = "F8_E8M0"
  _write(file, header, data)
  with pytest.raises(UserError) as err:
    _load(folder)
  assert str(err.value).startswith(f"cannot read safetensors file {file}: tensor "
                                   "'classifier.bias' has dtype 'F8_E8M0'; jaxft reads F64")


def test_safetensors_shape_not_matching_its_data_names_the_tensor(tiny_bert, tmp_path):
  folder = _copy(tiny_bert, tmp_path)
  file = folder / "model.safetensors"
  _, header, data = _header(file)
  header["bert.pooler.dense.weight"]["shape"] = [32, 33]
  _write(file, header, data)
  with pytest.raises(UserError) as err:
    _load(folder)
  assert str(err.value) == (
      f"cannot read safetensors file {file}: tensor 'bert.pooler.dense.weight' has shape "
      "[32, 33] of F32 (4,224 bytes) but its data_offsets span 4,096 bytes")


def test_safetensors_truncated_data_names_the_tensor_past_the_end(tiny_bert, tmp_path):
  folder = _copy(tiny_bert, tmp_path)
  file = folder / "model.safetensors"
  n, header, data = _header(file)
  last = max((k for k in header if k != "__metadata__"),
             key=lambda k: header[k]["data_offsets"][1])
  file.write_bytes(file.read_bytes()[:8 + n + len(data) - 100])
  with pytest.raises(UserError, match=f"the data of tensor '{last}' .* runs past the end") as err:
    _load(folder)
  assert str(file) in str(err.value)


def test_a_tensor_of_the_wrong_dtype_for_the_model_names_file_and_tensor(tiny_bert, tmp_path):
  folder = _copy(tiny_bert, tmp_path)
  file = folder / "model.safetensors"
  tensors = weights_of(file)
  tensors["bert.pooler.dense.bias"] = np.zeros(32, np.int64)
  save_file(tensors, str(file), metadata={"format": "pt"})
  with pytest.raises(UserError) as err:
    _load(folder)
  assert str(err.value) == (
      f"Checkpoint tensor 'bert.pooler.dense.bias' in {file} has dtype int64, but our param "
      "'pooler/dense/bias' takes floating-point weights")


def test_a_tensor_of_the_wrong_rank_for_the_model_names_file_and_tensor(tiny_bert, tmp_path):
  folder = _copy(tiny_bert, tmp_path)
  file = folder / "model.safetensors"
  tensors = weights_of(file)
  tensors["bert.pooler.dense.weight"] = np.zeros(32 * 32, np.float32)
  save_file(tensors, str(file), metadata={"format": "pt"})
  with pytest.raises(UserError) as err:
    _load(folder)
  assert str(err.value).startswith(
      f"Checkpoint tensor 'bert.pooler.dense.weight' in {file} has shape (1024,)")
  assert f"the model built from {folder}/config.json expects (32, 32)" in str(err.value)


def weights_of(file) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return dict(load_file(str(file)))


def test_float8_safetensors_tensors_read_as_stored(tmp_path):
  import ml_dtypes
  value = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
  file = tmp_path / "model.safetensors"
  f8 = value.astype(ml_dtypes.float8_e4m3fn)
  _write(file, {"w": {"dtype": "F8_E4M3", "shape": [3, 4], "data_offsets": [0, 12]}},
         f8.tobytes())
  with weights.open_weights(str(tmp_path)) as ckpt:
    np.testing.assert_array_equal(ckpt.read("w"), f8)
    np.testing.assert_array_equal(ckpt.read("w", (slice(1, 2), slice(None))), f8[1:2])


def test_weight_index_naming_a_file_outside_the_folder_is_a_clear_error(tiny_bert, tmp_path):
  folder = _copy(tiny_bert, tmp_path)
  index = folder / weights.SAFETENSORS_INDEX
  index.write_text(json.dumps({"weight_map": {"classifier.bias": "../../etc/passwd"}}))
  with pytest.raises(UserError, match=r"lists weight file '\.\./\.\./etc/passwd'") as err:
    _load(folder)
  assert str(index) in str(err.value)
  index.write_text("{not json")
  with pytest.raises(UserError, match="cannot read the weight index"):
    _load(folder)


# ---------------------------------------------------------------- GGUF


@pytest.fixture
def tiny_gguf(tmp_path):
  path = tmp_path / "model.gguf"
  fuzz_inputs.tiny_llama_gguf(str(path))
  return path


def _gguf_field_offset(path, key: str) -> int:
  """Where metadata `key`'s value starts (after its key and type), by gguf's reader."""
  import gguf as gguf_lib
  field = gguf_lib.GGUFReader(str(path)).fields[key]
  return field.offset + 8 + len(key) + 4


def test_tiny_gguf_loads(tiny_gguf):
  loaded = hf.load(str(tiny_gguf), "causal_lm")
  assert loaded.report.missing == [] and loaded.hf_config.num_hidden_layers == 2


def test_gguf_truncated_tensor_data_names_the_tensor(tiny_gguf):
  raw = tiny_gguf.read_bytes()
  tiny_gguf.write_bytes(raw[:len(raw) - 1000])
  with pytest.raises(UserError) as err:
    hf.load(str(tiny_gguf), "causal_lm")
  assert str(err.value).startswith(f"cannot read GGUF file {tiny_gguf}: tensor "
                                   "'blk.1.ffn_down.weight' (")
  assert "runs past the end of the file" in str(err.value)


@pytest.mark.parametrize("at, name", [(8, "tensor"), (16, "metadata")])
def test_gguf_absurd_counts_are_a_clear_error(tiny_gguf, at, name):
  raw = bytearray(tiny_gguf.read_bytes())
  struct.pack_into("<Q", raw, at, 2**63)
  tiny_gguf.write_bytes(bytes(raw))
  with pytest.raises(UserError, match=f"header claims .*9,223,372,036,854,775,808 {name}") as err:
    hf.load(str(tiny_gguf), "causal_lm")
  assert str(tiny_gguf) in str(err.value)


def test_gguf_number_array_longer_than_the_file_is_a_clear_error_not_a_hang(tiny_gguf):
  # An array of 2**40 bytes: gguf's own reader loops on empty reads past the end
  # of the file, 2**40 times.
  raw = bytearray(tiny_gguf.read_bytes())
  at = _gguf_field_offset(tiny_gguf, "tokenizer.ggml.scores")
  struct.pack_into("<IQ", raw, at, 0, 2**40)  # Element type UINT8, count.
  tiny_gguf.write_bytes(bytes(raw))
  with pytest.raises(UserError) as err:
    gguf.read_config(str(tiny_gguf))
  assert str(err.value).startswith(f"cannot read GGUF file {tiny_gguf}: metadata "
                                   "'tokenizer.ggml.scores' (1,099,511,627,776 bytes at offset")


def test_gguf_tensor_offset_beyond_the_file_names_the_tensor(tiny_gguf):
  import gguf as gguf_lib
  tensor = gguf_lib.GGUFReader(str(tiny_gguf)).tensors[0]
  raw = bytearray(tiny_gguf.read_bytes())
  # The tensor description ends with its data offset (8 bytes).
  end = tensor.field.offset + sum(p.nbytes for p in tensor.field.parts)
  struct.pack_into("<Q", raw, end - 8, 2**50)
  tiny_gguf.write_bytes(bytes(raw))
  with pytest.raises(UserError, match=f"tensor '{tensor.name}' .* runs past the end") as err:
    hf.load(str(tiny_gguf), "causal_lm")
  assert str(tiny_gguf) in str(err.value)


def test_gguf_metadata_of_the_wrong_type_names_the_key(tmp_path):
  import gguf as gguf_lib
  path = tmp_path / "model.gguf"
  writer = gguf_lib.GGUFWriter(str(path), "llama")
  writer.add_uint32("llama.vocab_size", 32)
  writer.add_string("llama.embedding_length", "wide")
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(UserError) as err:
    gguf.read_config(str(path))
  assert str(err.value) == (f"{path}: GGUF metadata llama.embedding_length is 'wide'; "
                            "expected an integer >= 1")


# ---------------------------------------------------------------- config.json


def _config(folder, **changes):
  path = folder / "config.json"
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config, indent=2))
  return path


def test_config_json_that_is_not_json_names_file_and_line(tiny_bert, tmp_path):
  folder = _copy(tiny_bert, tmp_path)
  path = folder / "config.json"
  lines = path.read_text().splitlines()
  assert lines[1].endswith(",")
  lines[1] = lines[1][:-1]  # A missing comma at the end of line 2.
  path.write_text("\n".join(lines))
  with pytest.raises(UserError) as err:
    _load(folder)
  assert str(err.value) == f"{path} is not valid JSON: Expecting ',' delimiter (line 3 column 3)"


@pytest.mark.parametrize("key, value, why", [
    ("hidden_size", "abc", "expected an integer, got str"),
    ("hidden_size", [32], "expected an integer, got list"),
    ("num_hidden_layers", -2, "expected 1..1,024"),
    ("num_hidden_layers", 10**6, "expected 1..1,024"),
    ("intermediate_size", 2.5, "expected an integer, got float"),
    ("vocab_size", 10**12, "expected 1..2,147,483,647"),
    ("num_attention_heads", True, "expected an integer, got bool"),
])
def test_config_json_sizes_of_the_wrong_type_or_size_name_the_key(tiny_bert, tmp_path, key,
                                                                  value, why):
  folder = _copy(tiny_bert, tmp_path)
  path = _config(folder, **{key: value})
  with pytest.raises(UserError) as err:
    _load(folder)
  assert str(err.value) == f"{path}: {key} is {value!r}; {why}"


def test_config_json_other_problems_name_the_file_and_key(tiny_bert, tmp_path):
  folder = _copy(tiny_bert, tmp_path)
  path = _config(folder, layer_norm_eps="tiny")
  with pytest.raises(UserError, match="layer_norm_eps is 'tiny'; expected a number > 0"):
    _load(folder)
  _config(folder, layer_norm_eps=1e-12, hidden_size=33)
  with pytest.raises(UserError) as err:
    _load(folder)
  assert str(err.value) == f"{path}: hidden_size 33 is not a multiple of num_attention_heads 4"
  _config(folder, hidden_size=32, hidden_act="swishy")
  with pytest.raises(UserError, match=f"^{path}: Unsupported hidden_act 'swishy'"):
    _load(folder)
  _config(folder, hidden_act="gelu", is_decoder="yes")  # transformers' own check.
  with pytest.raises(UserError, match=f"^Cannot read a model config from {path}: .*is_decoder"):
    _load(folder)
  _config(folder, is_decoder=False, model_type=["bert"])
  with pytest.raises(UserError, match=r"model_type is \['bert'\]; expected a string"):
    _load(folder)
  path.write_text("[1, 2]")
  with pytest.raises(UserError, match=f"^{path} is not a JSON object of settings$"):
    hub.load_hf_config(str(folder))


def test_a_model_too_big_for_the_device_is_a_clear_error_before_allocating():
  import transformers
  config = transformers.BertConfig(vocab_size=2**31 - 1, hidden_size=2**20,
                                   num_attention_heads=1, intermediate_size=8,
                                   num_hidden_layers=1, num_labels=2)
  with pytest.raises(UserError, match=r"initialising the model's parameters needs [\d,.]+ GiB "
                     r"per device, more than the [\d,.]+ GiB a device has"):
    hf.init_model(config, "classify")


@pytest.mark.parametrize("settings, message", [
    ({"image_mean": "half"}, "image_mean is 'half'; expected a number or a list of numbers"),
    ({"image_std": [0.5, None, 0.5]},
     "image_std is [0.5, None, 0.5]; expected a number or a list of numbers"),
    ({"size": {"height": "224", "width": 224}},
     "size.height is '224'; expected an integer in 1..65536"),
    ({"size": 10**9}, "size is 1000000000; expected an integer in 1..65536"),
])
def test_preprocessor_config_of_the_wrong_types_names_the_key(tmp_path, settings, message):
  from jaxft.data import image_prep
  path = tmp_path / "preprocessor_config.json"
  path.write_text(json.dumps(settings))
  with pytest.raises(UserError) as err:
    image_prep.processor_stats(str(tmp_path))
  assert str(err.value) == f"{path}: {message}"


# ---------------------------------------------------------------- data files


def _rows(n=6000):
  return [{"text": f"row {i}", "label": i % 2} for i in range(n)]


def _jsonl(path, rows):
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_jsonl_missing_label_at_line_5000_names_the_line(tmp_path):
  rows = _rows()
  del rows[4999]["label"]
  path = tmp_path / "train.jsonl"
  _jsonl(path, rows)
  with pytest.raises(UserError) as err:
    sources.load_split(str(path), "train", required=["text", "label"])
  assert str(err.value) == f"{path} line 5000: no value for 'label' (every row needs one)"
  assert len(sources.load_split(str(path), "train")) == 6000  # Only `required` checks.


def test_jsonl_malformed_line_5000_names_the_line(tmp_path):
  rows = _rows()
  rows[4999] = '{"text": "row", "label": 1'
  path = tmp_path / "train.jsonl"
  _jsonl(path, rows)
  with pytest.raises(UserError) as err:
    sources.load_split(str(path), "train")
  assert str(err.value) == f"{path} line 5000: Expecting ',' delimiter (column 27)"


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "expected a JSON object, got an array"),
    ('{"text": "row", "label": "one"}',
     "'label' is a string, but the first row's 'label' is a number"),
    ('{"text": 5, "label": 1}', "'text' is a number, but the first row's 'text' is a string"),
])
def test_jsonl_row_of_another_kind_names_the_line(tmp_path, line, message):
  rows = _rows(100)
  rows[49] = line
  path = tmp_path / "train.jsonl"
  _jsonl(path, rows)
  with pytest.raises(UserError) as err:
    sources.load_split(str(path), "train", required=["text", "label"])
  assert str(err.value) == f"{path} line 50: {message}"


def test_jsonl_bytes_that_are_not_utf8_name_the_line(tmp_path):
  path = tmp_path / "train.jsonl"
  _jsonl(path, _rows(100))
  raw = path.read_bytes()
  at = raw.index(b"row 70")
  path.write_bytes(raw[:at] + b"\xff" + raw[at + 1:])
  with pytest.raises(UserError) as err:
    sources.load_split(str(path), "train")
  assert str(err.value) == f"{path} line 71: not UTF-8 text (invalid start byte at column 11)"


def test_csv_missing_label_names_the_line(tmp_path):
  path = tmp_path / "train.csv"
  lines = ["text,label"] + [f"row {i},{i % 2}" for i in range(6000)]
  lines[5000] = '"row 4999, quoted\nover two lines",'  # An empty label, on lines 5001-5002.
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(UserError) as err:
    sources.load_split(str(path), "train", required=["text", "label"])
  assert str(err.value) == f"{path} line 5001: no value for 'label' (every row needs one)"


@pytest.mark.parametrize("line, message", [
    ("row,1,2", "line 5001: expected 2 fields, found 3"),
    ('"row 4999,1', "line 5001: a quoted field starts here and never ends"),
])
def test_csv_malformed_line_5000_names_the_line(tmp_path, line, message):
  path = tmp_path / "train.csv"
  lines = ["text,label"] + [f"row {i},{i % 2}" for i in range(6000)]
  lines[5000] = line
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(UserError) as err:
    sources.load_split(str(path), "train")
  assert str(err.value) == f"{path} {message}"


@pytest.mark.parametrize("name, text, where", [
    ("train.jsonl", 'null\n{"text": "a", "label": 1}\n', "line 1"),
    ("train.jsonl", '{"text": "a", "label": 1}\n\n  null\n', "line 3"),
    ("train.json", '[{"text": "a", "label": 1}, null]', "record 2"),
])
def test_a_null_record_is_a_clear_error_not_a_segfault(tmp_path, name, text, where):
  # pyarrow's JSON reader, under `datasets`, segfaults on a block starting with null.
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(UserError) as err:
    sources.load_split(str(path), "train")
  assert str(err.value) == f"{path} {where}: expected a JSON object, got null"


# ---------------------------------------------------------------- images


def _image_folder(root):
  for name in ("cat", "dog"):
    (root / name).mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / name / "a.png")


def test_image_file_that_is_not_an_image_names_the_file(tmp_path):
  _image_folder(tmp_path)
  bad = tmp_path / "dog" / "b.png"
  bad.write_text("not an image")
  with pytest.raises(UserError, match=f"^cannot read image {bad}: UnidentifiedImageError"):
    image_files.load(str(tmp_path))


def test_image_claiming_a_huge_size_names_the_file(tmp_path):
  _image_folder(tmp_path)
  bad = tmp_path / "dog" / "a.png"
  bad.write_bytes(fuzz_inputs.png_with_size(bad.read_bytes(), 2**31 - 1, 2**31 - 1))
  with pytest.raises(UserError, match=f"^cannot read image {bad}: DecompressionBombError"):
    image_files.load(str(tmp_path))


def test_image_table_row_missing_its_label_names_the_row(tmp_path):
  import datasets
  pictures = [Image.fromarray(np.zeros((4, 4), np.uint8)) for _ in range(3)]
  ds = datasets.Dataset.from_dict(
      {"image": pictures, "label": ["cat", None, "dog"]},
      features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}))
  path = tmp_path / "pets.parquet"
  ds.to_parquet(str(path))
  with pytest.raises(UserError) as err:
    image_files.load(str(path))
  assert str(err.value) == f"{path} row 1: no value for 'label' (every row needs one)"


# ---------------------------------------------------------------- the fuzz


FUZZ_PER_FORMAT = 50  # x 6 formats: 300 mutated files, ~30 s.


def test_fuzzed_files_load_or_fail_with_a_user_error_naming_the_file(tmp_path):
  out, progress = tmp_path / "fuzz.json", tmp_path / "progress.txt"
  proc = subprocess.run(
      [sys.executable, "-m", "bench.fuzz_inputs", "--per-format", str(FUZZ_PER_FORMAT),
       "--json", str(out), "--progress", str(progress)],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  print(proc.stdout)  # The table of counts per format (pytest -s shows it).
  last = progress.read_text().splitlines()[-1:] if progress.exists() else []
  assert proc.returncode == 0, f"last case: {last}\n{proc.stdout}\n{proc.stderr[-3000:]}"
  formats = json.loads(out.read_text())["formats"]
  assert list(formats) == list(fuzz_inputs.FORMATS)
  for fmt, tally in formats.items():
    assert tally["tried"] == FUZZ_PER_FORMAT, fmt
    assert tally["failures"] == [], fmt
    assert tally["ok"] + tally["user_error"] == FUZZ_PER_FORMAT, fmt
    assert tally["user_error"] >= FUZZ_PER_FORMAT // 3, fmt  # The mutations do break files.


def test_a_classifier_run_names_a_row_missing_its_label(tiny_setup, tmp_path):
  from jaxft import train
  from tests.helpers import tiny_config
  rows = (tiny_setup / "train.jsonl").read_text().splitlines()
  record = json.loads(rows[40])
  del record["label"]
  rows[40] = json.dumps(record)
  data = tmp_path / "train.jsonl"
  data.write_text("\n".join(rows) + "\n")
  config = tiny_config(tiny_setup)
  config.data.train = str(data)
  with pytest.raises(UserError, match=rf"{data} line 41: no value for 'label'"):
    train.train(config, str(tmp_path / "run"))
