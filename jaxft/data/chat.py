"""Supervised fine-tuning examples for causal LMs: tokens plus which ones carry loss.

A conversation (`messages`: role/content dicts) is rendered by the
tokenizer's own chat template. Which tokens are the assistant's is found by
rendering growing prefixes: the tokens between "the conversation so far, with
the generation prompt" and "... plus the assistant's message" are that
message as the template writes it, end-of-turn token included (so the model
learns to stop). Prompt/completion pairs and plain text are the other forms.
Rows are then packed (several documents per row, with segment ids and
per-document positions) or padded to a fixed length.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxft.config import LOSS_ON
from jaxft.errors import UserError



def _ids(tokenizer, messages: Sequence[dict], generation_prompt: bool) -> list[int]:
  out = tokenizer.apply_chat_template(list(messages), tokenize=True,
                                      add_generation_prompt=generation_prompt)
  if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 may return an encoding
    out = out["input_ids"]
  return list(out)


def render_chat(tokenizer, messages: Sequence[dict], loss_on: str = "assistant"
                ) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, loss mask) of one conversation.

  Args:
    tokenizer: a tokenizer with a chat template.
    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
    loss_on: "assistant" (every assistant turn), "last" (the final assistant
      turn only) or "all" (every token).

  Raises:
    UserError: no chat template, or a template whose renderings of a prefix
      are not a prefix of the whole (the assistant span cannot be found).
  """
  if loss_on not in LOSS_ON:
    raise UserError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
  if not getattr(tokenizer, "chat_template", None):
    raise UserError("the tokenizer has no chat template; give prompt/completion or text data")
  full = _ids(tokenizer, messages, generation_prompt=False)
  mask = np.zeros(len(full), bool)
  turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
  if loss_on == "last":
    turns = turns[-1:]
  for t in turns:
    start = len(_ids(tokenizer, messages[:t], generation_prompt=True))
    upto = _ids(tokenizer, messages[:t + 1], generation_prompt=False)
    if full[:len(upto)] != upto:
      raise UserError("the chat template renders a conversation's start differently from "
                      "the whole conversation; cannot tell which tokens are the assistant's")
    mask[start:len(upto)] = True
  if loss_on == "all":
    mask[:] = True
  return np.asarray(full, np.int32), mask


def render_completion(tokenizer, prompt: str, completion: str) -> tuple[np.ndarray, np.ndarray]:
  """(ids, loss mask) of prompt + completion + EOS; loss on the completion and EOS."""
  p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  c = tokenizer(completion, add_special_tokens=False)["input_ids"]
  eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
  ids = np.asarray(p + c + eos, np.int32)
  return ids, np.arange(len(ids)) >= len(p)


def pack(docs: Sequence[tuple[np.ndarray, np.ndarray]], length: int, pad_id: int,
         packing: bool = True) -> dict[str, np.ndarray]:
  """Fixed-length rows of documents.

  With packing, documents (truncated to `length`) fill rows in order and a
  new row starts when the next one does not fit; without, one per row.
  Returns int32 `input_ids`, `positions` (from 0 in each document),
  `segment_ids` (1, 2, ... per document in a row; 0 on padding) and bool
  `loss_mask`.
  """
  rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
  used = length  # Forces a first row.
  for ids, mask in docs:
    ids, mask = ids[:length], mask[:length]
    if not packing or used + len(ids) > length:
      rows.append([])
      used = 0
    rows[-1].append((ids, mask))
    used += len(ids)
  out = {"input_ids": np.full((len(rows), length), pad_id, np.int32),
         "positions": np.zeros((len(rows), length), np.int32),
         "segment_ids": np.zeros((len(rows), length), np.int32),
         "loss_mask": np.zeros((len(rows), length), bool)}
  for r, row in enumerate(rows):
    at = 0
    for s, (ids, mask) in enumerate(row, start=1):
      span = slice(at, at + len(ids))
      out["input_ids"][r, span] = ids
      out["positions"][r, span] = np.arange(len(ids))
      out["segment_ids"][r, span] = s
      out["loss_mask"][r, span] = mask
      at += len(ids)
  return out
