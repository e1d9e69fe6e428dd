"""Data loading, label mapping, tokenization and deterministic batching."""

import json

import datasets
import numpy as np
import pytest
import transformers

from jaxft.data import batches, sources, text
from jaxft.errors import UserError


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_load_split_reads_jsonl_and_csv(tmp_path):
  jl = _write_jsonl(tmp_path / "a.jsonl", [{"t": "x", "y": "pos"}, {"t": "z", "y": "neg"}])
  csv = tmp_path / "a.csv"
  csv.write_text("t,y\nx,pos\nz,neg\n")
  assert sources.load_split(jl, "train")["y"] == ["pos", "neg"]
  assert sources.load_split(str(csv), "train")["t"] == ["x", "z"]


def test_missing_file_and_empty_dataset_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="not found"):
    sources.load_split(str(tmp_path / "missing.jsonl"), "train")
  empty = tmp_path / "empty.csv"
  empty.write_text("t,y\n")
  with pytest.raises(UserError, match="empty"):
    sources.load_split(str(empty), "train")


def test_string_labels_map_to_sorted_ids_and_unknown_labels_fail(tmp_path):
  ds = sources.load_split(_write_jsonl(tmp_path / "a.jsonl", [
      {"t": "a", "y": "pos"}, {"t": "b", "y": "neg"}, {"t": "c", "y": "pos"}]), "train")
  names = text.label_names(ds, "y")
  assert names == ["neg", "pos"]
  np.testing.assert_array_equal(text.label_ids(ds, "y", names, "train"), [1, 0, 1])
  with pytest.raises(UserError, match="not among the training labels"):
    text.label_ids(ds, "y", ["neg", "other"], "eval")


def test_missing_column_names_the_column(tmp_path):
  ds = sources.load_split(_write_jsonl(tmp_path / "a.jsonl", [{"t": "a", "y": 1}]), "train")
  with pytest.raises(UserError, match="'sentence'"):
    text.check_columns(ds, ["sentence", "y"], "train")


def test_tokenize_gives_fixed_shape_int32(tmp_path, minilm_path):
  tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
  ds = sources.load_split(_write_jsonl(tmp_path / "a.jsonl", [
      {"t": "a short one", "y": 0}, {"t": "a much longer sentence " * 20, "y": 1}]), "train")
  ex = text.tokenize(ds, tok, text_key="t", text_pair_key="", max_length=16)
  assert ex["input_ids"].shape == (2, 16) and ex["input_ids"].dtype == np.int32
  assert ex["attention_mask"][0].sum() < 16 and ex["attention_mask"][1].sum() == 16


def _examples(n):
  return {"x": np.arange(n), "label": np.arange(n) % 2}


def test_train_batches_are_a_pure_function_of_seed_and_step():
  a = batches.TrainBatches(_examples(10), 4, seed=3)
  b = batches.TrainBatches(_examples(10), 4, seed=3)
  c = batches.TrainBatches(_examples(10), 4, seed=4)
  np.testing.assert_array_equal(a[7]["x"], b[7]["x"])
  assert any(not np.array_equal(a[s]["x"], c[s]["x"]) for s in range(5))


def test_train_batches_cover_every_example_each_epoch():
  data = batches.TrainBatches(_examples(12), 4, seed=0)
  for epoch in range(3):
    seen = np.concatenate([data[epoch * 3 + i]["x"] for i in range(3)])
    assert sorted(seen) == list(range(12))


def test_eval_batches_keep_every_example_once():
  seen, weights = [], []
  for b in batches.eval_batches(_examples(10), 4):
    assert b["x"].shape == (4,)
    seen.append(b["x"])
    weights.append(b["weight"])
  w = np.concatenate(weights)
  assert w.sum() == 10
  assert sorted(np.concatenate(seen)[w > 0]) == list(range(10))


def test_a_hub_name_loads_that_dataset_and_split(monkeypatch):
  calls = []

  def fake_load_dataset(*args, **kwargs):
    calls.append((args, kwargs))
    return datasets.Dataset.from_dict({"text": ["a"], "label": [0]})

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  ds = sources.load_split("stanfordnlp/imdb", "unsupervised")
  assert calls == [(("stanfordnlp/imdb",), {"split": "unsupervised"})] and len(ds) == 1


def test_an_unreachable_hub_dataset_is_a_user_error(monkeypatch):
  def offline(*args, **kwargs):
    raise ConnectionError("offline")

  monkeypatch.setattr(datasets, "load_dataset", offline)
  with pytest.raises(UserError, match="cannot load dataset no/such"):
    sources.load_split("no/such", "train")
