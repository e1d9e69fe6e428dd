"""Text classification examples: label ids and fixed-length token arrays."""

from __future__ import annotations

from typing import Mapping, Sequence

import datasets
import numpy as np

from jaxft.data.sources import load_split
from jaxft.errors import UserError


def check_columns(ds: datasets.Dataset, keys: Sequence[str], name: str) -> None:
  """Raises UserError naming any of `keys` that `ds` lacks."""
  missing = [k for k in keys if k not in ds.column_names]
  if missing:
    raise UserError(f"{name} data has no column {missing[0]!r}; columns are {ds.column_names}")


def label_names(ds: datasets.Dataset, label_key: str) -> list[str]:
  """Class names in id order: a ClassLabel's names, or the sorted distinct values."""
  feature = ds.features[label_key]
  if isinstance(feature, datasets.ClassLabel):
    return list(feature.names)
  values = set(ds.unique(label_key))
  if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
    if min(values) < 0:
      raise UserError(f"integer labels must be >= 0, got {min(values)}")
    return [str(i) for i in range(max(values) + 1)]
  return sorted(str(v) for v in values)


def label_ids(ds: datasets.Dataset, label_key: str, names: Sequence[str], name: str) -> np.ndarray:
  """Maps the label column to int32 ids under `names`; unknown labels are an error."""
  feature = ds.features[label_key]
  raw = ds[label_key]
  if isinstance(feature, datasets.ClassLabel) or all(isinstance(v, (int, np.integer)) for v in raw):
    ids = np.asarray(raw, np.int32)
    bad = ids[(ids < 0) | (ids >= len(names))]
    if bad.size:
      raise UserError(f"{name} data has label id {int(bad[0])}, outside 0..{len(names) - 1}")
    return ids
  index = {n: i for i, n in enumerate(names)}
  unknown = sorted({str(v) for v in raw} - set(index))
  if unknown:
    raise UserError(f"{name} data has labels {unknown[:5]} not among the training labels {list(names)}")
  return np.asarray([index[str(v)] for v in raw], np.int32)


# The model inputs a tokenizer may give, in the order the arrays are kept.
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _encode(tokenizer, texts: Sequence, pairs: Sequence | None, max_length: int):
  """The one tokenizer call of training, eval and predict: padded and truncated to max_length."""
  return tokenizer(texts, pairs, truncation=True, padding="max_length", max_length=max_length,
                   return_attention_mask=True)


def tokenize(ds: datasets.Dataset, tokenizer, *, text_key: str, text_pair_key: str,
             max_length: int) -> dict[str, np.ndarray]:
  """Tokenizes to fixed-shape int32 arrays (padded and truncated to max_length).

  `datasets.map` caches the result on disk, so a rerun skips tokenization.
  """
  def encode(batch: Mapping[str, list]) -> dict:
    pair = batch[text_pair_key] if text_pair_key else None
    return _encode(tokenizer, batch[text_key], pair, max_length)

  encoded = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names)
  cols = [c for c in _INPUTS if c in encoded.column_names]
  table = encoded.with_format("numpy", columns=cols)[:]
  return {c: np.asarray(table[c], np.int32) for c in cols}


def encode(tokenizer, texts: Sequence, pairs: Sequence | None, *,
           max_length: int) -> dict[str, np.ndarray]:
  """`tokenize`'s arrays for a batch of texts (and their pairs) held in memory.

  No `datasets` cache: for text read a batch at a time (`jaxft predict`).
  """
  enc = _encode(tokenizer, list(texts), None if pairs is None else list(pairs), max_length)
  return {c: np.asarray(enc[c], np.int32) for c in _INPUTS if c in enc}


def prepare(config, tokenizer, labels: Sequence[str] | None = None,
            *, need_train: bool = True) -> tuple[dict | None, dict | None, list[str]]:
  """Loads, checks and tokenizes the train and eval splits of a classification config.

  Returns (train_examples, eval_examples, label_names); each examples dict holds
  int32 arrays `input_ids`, `attention_mask`, maybe `token_type_ids`, and `label`.
  Labels come from `labels` when given (a resumed or evaluated run keeps its
  ids), otherwise from the training split.
  """
  d = config.data
  keys = [d.text_key, d.label_key] + ([d.text_pair_key] if d.text_pair_key else [])
  splits = {}
  if need_train or labels is None:
    splits["train"] = load_split(d.train, d.train_split, required=keys)
  if d.eval:
    splits["eval"] = load_split(d.eval, d.eval_split, required=keys)
  for name, ds in splits.items():
    check_columns(ds, keys, name)
  names = list(labels) if labels is not None else label_names(splits["train"], d.label_key)
  if len(names) < 2:
    raise UserError(f"need at least 2 classes in column {d.label_key!r}, found {names}")
  out = {}
  for name, ds in splits.items():
    ex = tokenize(ds, tokenizer, text_key=d.text_key, text_pair_key=d.text_pair_key,
                  max_length=d.max_length)
    ex["label"] = label_ids(ds, d.label_key, names, name)
    out[name] = ex
  return out.get("train") if need_train else None, out.get("eval"), names
