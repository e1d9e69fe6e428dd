"""SFT data: a file of conversations, prompt/completion pairs or plain text -> packed rows.

The format follows the columns: `messages` (a list of {"role", "content"},
rendered by the tokenizer's chat template), `prompt` + `completion`, or
`text` (every token carries loss; long texts are cut into max_length chunks).
Rows are fixed-length int32 arrays as `chat.pack` builds them, ready for
`batches.TrainBatches`.
"""

from __future__ import annotations

import dataclasses

import datasets
import ml_collections
import numpy as np

from jaxft.data import chat
from jaxft.data.sources import load_split
from jaxft.errors import UserError

FORMATS = {"messages": ("messages",), "completion": ("prompt", "completion"), "text": ("text",)}


@dataclasses.dataclass
class Split:
  """One split, tokenized and packed.

  Attributes:
    rows: `input_ids`, `positions`, `segment_ids`, `loss_mask`, [rows, max_length].
    documents: how many conversations / pairs / text chunks went in.
    truncated: how many documents were longer than max_length and cut.
    samples: (prompt text, reference reply) pairs for generation at eval.
    records: the split's rows as read (what a metric such as pass@1 needs).
  """
  rows: dict[str, np.ndarray]
  documents: int
  truncated: int
  samples: list[tuple[str, str]]
  records: list[dict]


def data_format(ds: datasets.Dataset, name: str) -> str:
  """Which of FORMATS the columns of `ds` hold; UserError if none."""
  for fmt, columns in FORMATS.items():
    if all(c in ds.column_names for c in columns):
      return fmt
  raise UserError(f"{name} data needs a 'messages' column, 'prompt' and 'completion' columns, "
                  f"or a 'text' column; its columns are {ds.column_names}")


def _check_messages(messages, name: str, row: int) -> None:
  ok = isinstance(messages, list) and messages and all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in messages)
  if not ok:
    raise UserError(f"{name} data row {row}: 'messages' must be a non-empty list of "
                    "{'role': str, 'content': str}")
  if not any(m["role"] == "assistant" for m in messages):
    raise UserError(f"{name} data row {row}: the conversation has no assistant turn to learn")


def _text_chunks(tokenizer, text: str, length: int) -> list[tuple[np.ndarray, np.ndarray]]:
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  if tokenizer.eos_token_id is not None:
    ids = ids + [tokenizer.eos_token_id]
  ids = np.asarray(ids, np.int32)
  return [(ids[i:i + length], np.ones(len(ids[i:i + length]), bool))
          for i in range(0, len(ids), length)]


def documents(ds: datasets.Dataset, tokenizer, *, length: int, loss_on: str, name: str
              ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[str, str]]]:
  """(token ids, loss mask) per document, and (prompt, reference) pairs."""
  fmt = data_format(ds, name)
  docs, samples = [], []
  for row, ex in enumerate(ds):
    if fmt == "messages":
      messages = ex["messages"]
      _check_messages(messages, name, row)
      docs.append(chat.render_chat(tokenizer, messages, loss_on))
      last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
      samples.append((tokenizer.apply_chat_template(messages[:last], tokenize=False,
                                                    add_generation_prompt=True),
                      messages[last]["content"]))
    elif fmt == "completion":
      docs.append(chat.render_completion(tokenizer, str(ex["prompt"]), str(ex["completion"])))
      samples.append((str(ex["prompt"]), str(ex["completion"])))
    else:
      docs += _text_chunks(tokenizer, str(ex["text"]), length)
  return docs, samples


def load(spec: str, split: str, tokenizer, *, max_length: int, loss_on: str, packing: bool,
         name: str) -> Split:
  """Reads, renders and packs one split: rows of `max_length` tokens (`name`: for messages)."""
  ds = load_split(spec, split)
  docs, samples = documents(ds, tokenizer, length=max_length, loss_on=loss_on, name=name)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  rows = chat.pack(docs, max_length, pad, packing=packing)
  if not rows["loss_mask"][:, 1:].any():
    raise UserError(f"{name} data has no token to learn within max_length={max_length}")
  truncated = sum(len(ids) > max_length for ids, _ in docs)
  records = ds.to_list() if samples else []  # Aligned with samples, one per row.
  return Split(rows, len(docs), truncated, samples, records)


def prepare(config: ml_collections.ConfigDict, tokenizer, *, need_train: bool = True
            ) -> tuple[Split | None, Split | None]:
  """(train, eval) splits of an SFT config; None where not needed or not configured."""
  d = config.data
  kw = dict(max_length=d.max_length, loss_on=d.loss_on, packing=d.packing)
  train = load(d.train, d.train_split, tokenizer, name="train", **kw) if need_train else None
  evaluation = load(d.eval, d.eval_split, tokenizer, name="eval", **kw) if d.eval else None
  return train, evaluation
