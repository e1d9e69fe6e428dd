"""Preference data for DPO: pairs of a prompt, a chosen and a rejected response -> token rows.

A row of the data file is one pair, in one of these forms:

  a) {"prompt": str, "chosen": str, "rejected": str}: plain text, no chat
     template (TRL's "standard" form); each response ends with EOS.
  b) {"prompt": [messages], "chosen": [messages] | str, "rejected": ...}: the
     prompt is a conversation; each response is one assistant message (TRL's
     "conversational" form) or its text.
  c) {"chosen": [messages], "rejected": [messages]}: two whole conversations;
     the prompt is what comes before the last (assistant) turn.
  d) {"chosen": str, "rejected": str}: Anthropic HH-RLHF transcripts
     ("\\n\\nHuman: ...\\n\\nAssistant: ..."), read as c).

Conversations are rendered by the tokenizer's chat template: the response's
tokens are those the template writes after the prompt and its generation
prompt, end-of-turn tokens included (so the model learns to stop). Each pair
becomes two fixed-length rows, chosen then rejected, which share the prompt.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence, Union

import ml_collections
import numpy as np

from jaxft.data.sources import load_split
from jaxft.errors import UserError

# Column sets a file may have (a row's values then pick among the forms above).
FORMATS = {"prompt": ("prompt", "chosen", "rejected"), "conversations": ("chosen", "rejected")}

Prompt = Union[list[dict[str, str]], str]
Pair = tuple[Prompt, str, str]

# A speaker marker: at the start of the text or after a blank line. A "Human:"
# inside a line is part of what someone said (HH replies sometimes hold one).
_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}
# Conversations per apply_chat_template call: big enough that the fast
# tokenizer works on batches, small enough to bound the memory of one call.
_CHUNK = 512


@dataclasses.dataclass
class Split:
  """One split of preference pairs, tokenized.

  Attributes:
    rows: int32 `input_ids`, `positions`, `segment_ids` (1 on tokens, 0 on
      padding) and bool `loss_mask` (the response's tokens), each
      [pairs, 2, max_length]; index 0 on axis 1 is the chosen sequence, 1 the
      rejected one. Right padding.
    pairs: pairs kept.
    prompt_truncated: kept pairs whose prompt was cut (from the left).
    response_truncated: kept pairs where a response was cut (from the right).
    dropped_identical: pairs dropped because chosen and rejected became the
      same tokens once cut to max_length.
    prompts: the prompt of each kept pair (messages or text), for sampling.
  """
  rows: dict[str, np.ndarray]
  pairs: int
  prompt_truncated: int
  response_truncated: int
  dropped_identical: int
  prompts: list


def parse_transcript(text: str) -> list[dict[str, str]]:
  """Messages of an HH-RLHF transcript ("\\n\\nHuman: a\\n\\nAssistant: b...").

  Each content is stripped. Two turns of one speaker in a row are one turn
  (their texts joined by a blank line): HH replies sometimes hold a second
  "Assistant:" marker, and chat templates expect the roles to alternate.

  Raises:
    ValueError: no "Human:" / "Assistant:" turn, or text before the first.
  """
  parts = _TURN.split(text)
  if len(parts) == 1:
    raise ValueError("it has no '\\n\\nHuman:' or '\\n\\nAssistant:' turns")
  if parts[0].strip():
    raise ValueError(f"it has text before its first 'Human:' turn: {parts[0].strip()[:40]!r}")
  messages: list[dict[str, str]] = []
  for speaker, content in zip(parts[1::2], parts[2::2]):
    role, content = _ROLES[speaker], content.strip()
    if messages and messages[-1]["role"] == role:
      messages[-1]["content"] = "\n\n".join(t for t in (messages[-1]["content"], content) if t)
    else:
      messages.append({"role": role, "content": content})
  return messages


def _where(name: str, row: int) -> str:
  return f"{name} data row {row}"


def _check_columns(columns: Sequence[str], name: str) -> None:
  if not all(c in columns for c in FORMATS["conversations"]):
    raise UserError(f"{name} data needs 'chosen' and 'rejected' columns, and a 'prompt' column "
                    f"unless they hold whole conversations; its columns are {list(columns)}")


def _messages(value, where: str, column: str) -> list[dict[str, str]]:
  ok = isinstance(value, list) and value and all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in value)
  if not ok:
    raise UserError(f"{where}: '{column}' must be a non-empty list of "
                    "{'role': str, 'content': str}")
  # `datasets` fills keys that only other rows have with None; templates want them absent.
  return [{k: v for k, v in m.items() if v is not None} for m in value]


def _conversation(value, where: str, column: str) -> list[dict[str, str]]:
  """Messages of a whole conversation: a list of messages or an HH transcript."""
  if isinstance(value, str):
    try:
      return parse_transcript(value)
    except ValueError as e:
      raise UserError(f"{where}: '{column}' is text but not a '\\n\\nHuman: ...\\n\\nAssistant: "
                      f"...' transcript: {e}") from e
  return _messages(value, where, column)


def _split_last(messages: list[dict[str, str]], where: str, column: str
                ) -> tuple[list[dict[str, str]], str]:
  """(the messages before the last turn, the last turn's text); it must be the assistant's."""
  if not any(m["role"] == "assistant" for m in messages):
    raise UserError(f"{where}: the '{column}' conversation has no assistant turn; it must end "
                    "with the assistant's response")
  if messages[-1]["role"] != "assistant":
    raise UserError(f"{where}: the '{column}' conversation ends with a {messages[-1]['role']} "
                    "turn; it must end with the assistant's response")
  if len(messages) == 1:
    raise UserError(f"{where}: the '{column}' conversation has no prompt before the assistant's "
                    "response")
  return messages[:-1], messages[-1]["content"]


def _response(value, where: str, column: str) -> str:
  """A response next to a messages prompt: its text, or a list of one assistant message."""
  if isinstance(value, str):
    return value
  messages = _messages(value, where, column)
  if len(messages) != 1 or messages[0]["role"] != "assistant":
    raise UserError(f"{where}: with a 'prompt' of messages, '{column}' must be text or a list "
                    "of one assistant message")
  return messages[0]["content"]


def pair_of(example: dict, name: str, row: int) -> Pair:
  """(prompt, chosen response, rejected response) of one row, in any of the module's forms.

  The prompt is a list of messages (to render with the chat template) or, for
  form a), text. Without a 'prompt' column both conversations must have the
  same turns before their last one, which is the response. (The bundled
  HH-RLHF pairs all do once consecutive turns of one speaker are merged, see
  `parse_transcript`; read without merging, 5 of 2,000 would not.)

  Args:
    example: the row, a dict of its columns.
    name: which data this is ("train", "eval"), for messages.
    row: the row's index in its file, for messages.

  Raises:
    UserError: no 'chosen' / 'rejected' column; a value of the wrong type; a
      conversation without an assistant turn, not ending with one, or with no
      prompt before it; chosen and rejected prompts that differ; or the same
      response twice.
  """
  _check_columns(list(example), name)
  where = _where(name, row)
  prompt = example.get("prompt")
  if isinstance(prompt, str):
    if not all(isinstance(example[c], str) for c in ("chosen", "rejected")):
      raise UserError(f"{where}: with a text 'prompt', 'chosen' and 'rejected' must be text")
    chosen, rejected = example["chosen"], example["rejected"]
  elif prompt is not None:
    prompt = _messages(prompt, where, "prompt")
    chosen = _response(example["chosen"], where, "chosen")
    rejected = _response(example["rejected"], where, "rejected")
  else:
    prompt, chosen = _split_last(_conversation(example["chosen"], where, "chosen"), where,
                                 "chosen")
    other, rejected = _split_last(_conversation(example["rejected"], where, "rejected"), where,
                                  "rejected")
    if other != prompt:
      turn = next(i for i, (a, b) in enumerate(zip(prompt + [{}], other + [{}])) if a != b)
      raise UserError(f"{where}: 'chosen' and 'rejected' differ before their last turn (from "
                      f"message {turn} on); a pair must share its prompt and differ only in "
                      "the final assistant response")
  if chosen == rejected:
    raise UserError(f"{where}: 'chosen' and 'rejected' are the same response; a preference "
                    "pair needs two different ones")
  return prompt, chosen, rejected


def _batch_ids(tokenizer, conversations: list[list[dict]], generation_prompt: bool
               ) -> list[list[int]]:
  """Token ids of many conversations by the chat template (one call per chunk: fast)."""
  ids: list[list[int]] = []
  for start in range(0, len(conversations), _CHUNK):
    out = tokenizer.apply_chat_template(conversations[start:start + _CHUNK], tokenize=True,
                                        add_generation_prompt=generation_prompt)
    if hasattr(out, "keys"):  # transformers 5 returns an encoding
      out = out["input_ids"]
    ids += [list(x) for x in out]
  return ids


def _chat_tokens(tokenizer, pairs: Sequence[Pair], labels: Sequence[str]
                 ) -> list[tuple[list[int], list[int], list[int]]]:
  """(prompt ids, chosen ids, rejected ids) of pairs whose prompt is messages."""
  if not getattr(tokenizer, "chat_template", None):
    raise UserError("the tokenizer has no chat template; give 'prompt', 'chosen' and "
                    "'rejected' as plain text")
  prompts = _batch_ids(tokenizer, [p for p, _, _ in pairs], generation_prompt=True)
  fulls = [_batch_ids(tokenizer, [p + [{"role": "assistant", "content": r[i]}]
                                  for p, *r in pairs], generation_prompt=False)
           for i in (0, 1)]
  out = []
  for prompt, chosen, rejected, label in zip(prompts, *fulls, labels):
    if chosen[:len(prompt)] != prompt or rejected[:len(prompt)] != prompt:
      raise UserError(f"{label}: the chat template renders the prompt differently on its own "
                      "than before the response; cannot tell which tokens are the response")
    out.append((prompt, chosen[len(prompt):], rejected[len(prompt):]))
  return out


def _text_tokens(tokenizer, pairs: Sequence[Pair]) -> list[tuple[list[int], list[int], list[int]]]:
  """(prompt ids, chosen ids, rejected ids) of plain-text pairs; responses end with EOS."""
  if not pairs:
    return []
  eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
  columns = [tokenizer([pair[i] for pair in pairs], add_special_tokens=False)["input_ids"]
             for i in range(3)]
  return [(list(p), list(c) + eos, list(r) + eos) for p, c, r in zip(*columns)]


def _tokens(tokenizer, pairs: Sequence[Pair], labels: Sequence[str]
            ) -> list[tuple[list[int], list[int], list[int]]]:
  """(prompt ids, chosen ids, rejected ids) per pair, in order."""
  chat = [i for i, (p, _, _) in enumerate(pairs) if not isinstance(p, str)]
  text = [i for i, (p, _, _) in enumerate(pairs) if isinstance(p, str)]
  out: list = [None] * len(pairs)
  if chat:
    for i, ids in zip(chat, _chat_tokens(tokenizer, [pairs[i] for i in chat],
                                         [labels[i] for i in chat])):
      out[i] = ids
  for i, ids in zip(text, _text_tokens(tokenizer, [pairs[i] for i in text])):
    out[i] = ids
  for (_, chosen, rejected), label in zip(out, labels):
    if not chosen or not rejected:
      raise UserError(f"{label}: a response has no tokens (an empty text and no EOS token); "
                      "give each response some text")
  return out


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
             max_prompt_length: int = 0) -> tuple[list[int], list[int], list[int], bool, bool]:
  """Fits prompt + each response into max_length tokens.

  The prompt keeps its end (next to the response): at most max_prompt_length
  tokens when that is set (> 0), and at most
  max(max_length // 2, max_length - the longer response) when the pair would
  not fit otherwise; then each response keeps its start, up to the room left.

  Returns:
    (prompt, chosen, rejected, whether the prompt was cut, whether a response was).
  """
  keep = min(len(prompt), max_prompt_length or len(prompt))
  longest = max(len(chosen), len(rejected))
  if keep + longest > max_length:
    keep = min(keep, max(max_length // 2, max_length - longest))
  room = max_length - keep
  return (prompt[len(prompt) - keep:], chosen[:room], rejected[:room], keep < len(prompt),
          longest > room)


def _rows(pairs: Sequence[tuple[list[int], list[int], list[int]]], max_length: int,
          pad_id: int) -> dict[str, np.ndarray]:
  """[pairs, 2, max_length] arrays of (already truncated) pairs, right padded."""
  shape = (len(pairs), 2, max_length)
  out = {"input_ids": np.full(shape, pad_id, np.int32),
         "positions": np.zeros(shape, np.int32),
         "segment_ids": np.zeros(shape, np.int32),
         "loss_mask": np.zeros(shape, bool)}
  for i, (prompt, *responses) in enumerate(pairs):
    for j, response in enumerate(responses):
      n = len(prompt) + len(response)
      out["input_ids"][i, j, :n] = prompt + response
      out["positions"][i, j, :n] = np.arange(n)
      out["segment_ids"][i, j, :n] = 1
      out["loss_mask"][i, j, len(prompt):n] = True
  return out


def _pad_id(tokenizer) -> int:
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode(prompt: Prompt, chosen: str, rejected: str, tokenizer, max_length: int,
           max_prompt_length: int = 0) -> tuple[dict[str, np.ndarray], bool, bool]:
  """One pair -> (rows as in `Split.rows` but [2, max_length], prompt cut, response cut)."""
  ids = _tokens(tokenizer, [(prompt, chosen, rejected)], ["the pair"])[0]
  *kept, prompt_cut, response_cut = truncate(*ids, max_length, max_prompt_length)
  rows = _rows([tuple(kept)], max_length, _pad_id(tokenizer))
  return {k: v[0] for k, v in rows.items()}, prompt_cut, response_cut


def load(spec: str, split: str, tokenizer, *, max_length: int, name: str,
         max_prompt_length: int = 0) -> Split:
  """Reads and tokenizes one split of pairs (`name`, e.g. "train": for messages).

  Raises:
    UserError: the data cannot be read or is empty, a row is not a valid pair
      (see `pair_of`), or no pair is left once chosen and rejected are cut to
      max_length.
  """
  ds = load_split(spec, split)
  _check_columns(ds.column_names, name)
  pairs = [pair_of(example, name, row) for row, example in enumerate(ds)]
  labels = [_where(name, row) for row in range(len(pairs))]
  kept, prompts = [], []
  prompt_truncated = response_truncated = dropped = 0
  for pair, ids in zip(pairs, _tokens(tokenizer, pairs, labels)):
    prompt, chosen, rejected, prompt_cut, response_cut = truncate(*ids, max_length,
                                                                      max_prompt_length)
    if chosen == rejected:  # No preference left to learn within max_length.
      dropped += 1
      continue
    prompt_truncated += prompt_cut
    response_truncated += response_cut
    kept.append((prompt, chosen, rejected))
    prompts.append(pair[0])
  if not kept:
    raise UserError(f"{name} data: every pair's chosen and rejected responses are the same "
                    f"within max_length={max_length}; raise data.max_length")
  return Split(_rows(kept, max_length, _pad_id(tokenizer)), len(kept), prompt_truncated,
               response_truncated, dropped, prompts)


def prepare(config: ml_collections.ConfigDict, tokenizer, *, need_train: bool = True
            ) -> tuple[Split | None, Split | None]:
  """(train, eval) splits of a DPO config; None where not needed or not configured."""
  d = config.data
  lengths = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length)
  train = load(d.train, d.train_split, tokenizer, name="train", **lengths) if need_train else None
  evaluation = load(d.eval, d.eval_split, tokenizer, name="eval", **lengths) if d.eval else None
  return train, evaluation
