"""Preference pairs for DPO: row forms, token rows, truncation, errors and the bundled HH data."""

from __future__ import annotations

import copy
import json
import pathlib

import ml_collections
import numpy as np
import pytest

from jaxft.data import chat
from jaxft.data import preference
from jaxft.errors import UserError

HH = pathlib.Path(__file__).resolve().parents[1] / "data" / "hh-rlhf-harmless"
TRANSCRIPT = ("\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?"
              "\n\nAssistant: {}")
PROMPT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "How do I bake bread?"}]
CHOSEN, REJECTED = "Mix flour, water, yeast and salt, then bake.", "Buy some."


def _write(path: pathlib.Path, rows: list[dict]) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _key(prompt) -> str:
  return json.dumps(prompt, sort_keys=True)


def test_hh_transcript_parses_into_stripped_turns_merging_a_speakers_consecutive_turns():
  text = ("\n\nHuman:  a  \n\nAssistant: b\n\nHuman: c says Human: hi\n\n"
          "Assistant: d1\n\nAssistant:   d2 \n")
  assert preference.parse_transcript(text) == [
      {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "user", "content": "c says Human: hi"},
      {"role": "assistant", "content": "d1\n\nd2"}]
  # Without the leading blank line too.
  assert preference.parse_transcript("Human: q\n\nAssistant: r") == [
      {"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]


def test_transcript_without_turns_or_with_a_preamble_is_a_value_error():
  with pytest.raises(ValueError, match="no '.*Human:'"):
    preference.parse_transcript("just some text")
  with pytest.raises(ValueError, match="text before its first"):
    preference.parse_transcript("Intro\n\nHuman: q\n\nAssistant: r")


def test_the_row_forms_mean_the_same_pair_and_give_the_same_tokens(smollm2_tokenizer):
  forms = [
      {"chosen": TRANSCRIPT.format(CHOSEN), "rejected": TRANSCRIPT.format(REJECTED)},
      {"chosen": PROMPT + [{"role": "assistant", "content": CHOSEN}],
       "rejected": PROMPT + [{"role": "assistant", "content": REJECTED}]},
      {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": CHOSEN}],
       "rejected": [{"role": "assistant", "content": REJECTED}]},
      {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
  ]
  pairs = [preference.pair_of(f, "train", 0) for f in forms]
  assert all(p == (PROMPT, CHOSEN, REJECTED) for p in pairs)
  rows = [preference.encode(*p, smollm2_tokenizer, max_length=96)[0] for p in pairs]
  for r in rows[1:]:
    for k in r:
      np.testing.assert_array_equal(r[k], rows[0][k])


def test_loss_mask_covers_exactly_the_response_and_its_end_of_turn(smollm2_tokenizer):
  tok = smollm2_tokenizer
  rows, prompt_cut, response_cut = preference.encode(PROMPT, CHOSEN, REJECTED, tok, 96)
  assert rows["input_ids"].shape == (2, 96) and rows["input_ids"].dtype == np.int32
  assert rows["loss_mask"].dtype == bool and not (prompt_cut or response_cut)
  prompt_ids = chat._ids(tok, PROMPT, generation_prompt=True)
  for j, response in enumerate((CHOSEN, REJECTED)):
    ids, mask = rows["input_ids"][j], rows["loss_mask"][j]
    n = int(rows["segment_ids"][j].sum())
    full = chat._ids(tok, PROMPT + [{"role": "assistant", "content": response}], False)
    assert ids[:n].tolist() == full and n == len(full)
    assert tok.decode(ids[mask]) == response + "<|im_end|>\n"
    assert np.flatnonzero(mask).tolist() == list(range(len(prompt_ids), n))
    assert rows["positions"][j, :n].tolist() == list(range(n))
    assert (rows["segment_ids"][j, n:] == 0).all() and (ids[n:] == tok.pad_token_id).all()


def test_text_pairs_skip_the_template_and_end_responses_with_eos(smollm2_tokenizer):
  tok = smollm2_tokenizer
  pair = preference.pair_of({"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}, "train", 0)
  rows, _, _ = preference.encode(*pair, tok, 16)
  prompt = tok("2 + 2 =", add_special_tokens=False)["input_ids"]
  for j, answer in enumerate((" 4", " 5")):
    n = int(rows["segment_ids"][j].sum())
    expected = prompt + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert rows["input_ids"][j, :n].tolist() == expected
    assert np.flatnonzero(rows["loss_mask"][j]).tolist() == list(range(len(prompt), n))


def test_truncation_keeps_the_prompts_end_and_the_responses_start():
  # Prompt too long: it keeps max(8 // 2, 8 - 4) = 4 tokens, its last ones.
  assert preference.truncate(list(range(10)), [1] * 4, [2] * 2, 8) == (
      [6, 7, 8, 9], [1] * 4, [2] * 2, True, False)
  # A short prompt stays whole; the long response gets the rest.
  assert preference.truncate([0] * 3, list(range(10)), [2] * 2, 8) == (
      [0] * 3, [0, 1, 2, 3, 4], [2] * 2, False, True)
  # Both long: the prompt keeps half.
  assert preference.truncate([0] * 10, [1] * 10, [2] * 10, 8) == (
      [0] * 4, [1] * 4, [2] * 4, True, True)
  assert preference.truncate([0] * 3, [1] * 5, [2], 8) == ([0] * 3, [1] * 5, [2], False, False)


def test_max_prompt_length_caps_the_prompt_and_gives_the_room_to_the_responses():
  # The prompt keeps its last 2 tokens even where the pair would fit whole.
  assert preference.truncate(list(range(5)), [1] * 2, [2], 8, max_prompt_length=2) == (
      [3, 4], [1] * 2, [2], True, False)
  # A long response gets the 6 tokens the capped prompt leaves (not 8 // 2).
  assert preference.truncate(list(range(10)), list(range(10)), [2], 8, max_prompt_length=2) == (
      [8, 9], list(range(6)), [2], True, True)
  # Above what the row allows anyway, the cap changes nothing.
  assert preference.truncate([0] * 10, [1] * 10, [2] * 10, 8, max_prompt_length=6) == (
      [0] * 4, [1] * 4, [2] * 4, True, True)
  assert preference.truncate([0] * 3, [1] * 5, [2], 8, max_prompt_length=3) == (
      [0] * 3, [1] * 5, [2], False, False)


def test_load_cuts_long_prompts_from_the_left_and_long_responses_from_the_right(
    smollm2_tokenizer, tmp_path):
  tok = smollm2_tokenizer
  long_prompt = [{"role": "user", "content": "Tell me about bread. " * 40}]
  spec = _write(tmp_path / "pairs.jsonl", [
      {"prompt": long_prompt, "chosen": "Bread is baked.", "rejected": "No."},
      {"prompt": PROMPT, "chosen": "Knead it well. " * 40, "rejected": "No."},
      {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}])
  split = preference.load(spec, "train", tok, max_length=128, name="train")
  assert (split.pairs, split.prompt_truncated, split.response_truncated) == (3, 1, 1)
  assert split.prompts == [long_prompt, PROMPT, PROMPT]
  assert all(v.shape == (3, 2, 128) for v in split.rows.values())
  ids, mask = split.rows["input_ids"], split.rows["loss_mask"]
  # Pair 0: the prompt keeps its end (the generation prompt), the response is whole.
  assert tok.decode(ids[0, 0, ~mask[0, 0]]).endswith("bread. <|im_end|>\n<|im_start|>assistant\n")
  assert tok.decode(ids[0, 0, mask[0, 0]]) == "Bread is baked.<|im_end|>\n"
  # Pair 1: the prompt is whole, the long response fills the row and loses its end.
  prompt_ids = chat._ids(tok, PROMPT, generation_prompt=True)
  assert ids[1, 0, :len(prompt_ids)].tolist() == prompt_ids
  assert mask[1, 0, len(prompt_ids):].all() and split.rows["segment_ids"][1, 0].all()
  assert tok.decode(ids[1, 1, mask[1, 1]]) == "No.<|im_end|>\n"


def test_pairs_that_become_identical_when_cut_are_dropped_and_counted(smollm2_tokenizer,
                                                                        tmp_path):
  same_start = "The same long opening sentence, again and again. " * 10
  identical = {"prompt": PROMPT, "chosen": same_start + "Yes.", "rejected": same_start + "No."}
  spec = _write(tmp_path / "pairs.jsonl", [identical, {"prompt": PROMPT, "chosen": CHOSEN,
                                                       "rejected": REJECTED}])
  split = preference.load(spec, "train", smollm2_tokenizer, max_length=96, name="train")
  assert (split.pairs, split.dropped_identical) == (1, 1)
  assert (split.prompt_truncated, split.response_truncated) == (0, 0)  # Of the pairs kept.
  assert split.prompts == [PROMPT] and split.rows["input_ids"].shape == (1, 2, 96)
  only = _write(tmp_path / "only.jsonl", [identical])
  with pytest.raises(UserError, match="eval data: every pair.*raise data.max_length"):
    preference.load(only, "train", smollm2_tokenizer, max_length=96, name="eval")


@pytest.mark.parametrize("row, match", [
    ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"},
     r"train data row 3: the 'chosen' conversation has no assistant turn"),
    ({"chosen": "hello", "rejected": "\n\nHuman: hi\n\nAssistant: yo"},
     r"train data row 3: 'chosen' is text but not a .*transcript: it has no"),
    ({"chosen": PROMPT, "rejected": PROMPT + [{"role": "assistant", "content": "x"}]},
     r"row 3: the 'chosen' conversation ends with a user turn"),
    ({"chosen": [{"role": "assistant", "content": "x"}],
      "rejected": [{"role": "assistant", "content": "y"}]},
     r"row 3: the 'chosen' conversation has no prompt"),
    ({"chosen": TRANSCRIPT.format("Same."), "rejected": TRANSCRIPT.format("Same.")},
     r"train data row 3: 'chosen' and 'rejected' are the same response"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, r"row 3: .* are the same response"),
    ({"chosen": TRANSCRIPT.format("A."), "rejected": "\n\nHuman: Other\n\nAssistant: B."},
     r"train data row 3: 'chosen' and 'rejected' differ before their last turn "
     r"\(from message 0 on\); a pair must share its prompt"),
    ({"prompt": PROMPT, "chosen": [{"role": "user", "content": "x"}], "rejected": "y"},
     r"row 3: with a 'prompt' of messages, 'chosen' must be text or a list of one assistant"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"},
     r"row 3: with a text 'prompt', 'chosen' and 'rejected' must be text"),
    ({"prompt": [{"role": "user"}], "chosen": "x", "rejected": "y"},
     r"row 3: 'prompt' must be a non-empty list of \{'role': str, 'content': str\}"),
    ({"prompt": "q", "answer": "a"},
     r"train data needs 'chosen' and 'rejected' columns.*its columns are \['prompt', 'answer'\]"),
])
def test_bad_rows_are_user_errors_naming_the_row_and_what_is_expected(row, match):
  with pytest.raises(UserError, match=match):
    preference.pair_of(row, "train", 3)


def test_missing_columns_are_reported_for_the_file_before_any_row(smollm2_tokenizer, tmp_path):
  spec = _write(tmp_path / "pairs.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
  with pytest.raises(UserError, match=r"^eval data needs 'chosen' and 'rejected' columns.*"
                                      r"\['question', 'good', 'bad'\]$"):
    preference.load(spec, "train", smollm2_tokenizer, max_length=32, name="eval")
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(UserError, match="is empty"):
    preference.load(str(empty), "train", smollm2_tokenizer, max_length=32, name="train")


def test_chat_pairs_need_a_template_whose_prompt_is_a_prefix_of_the_whole(smollm2_tokenizer):
  tok = copy.copy(smollm2_tokenizer)  # A shallow copy: the session's tokenizer keeps its template.
  tok.chat_template = None
  with pytest.raises(UserError, match="the tokenizer has no chat template; give 'prompt', "):
    preference.encode(PROMPT, CHOSEN, REJECTED, tok, 96)
  tok.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant says:{% endif %}")
  with pytest.raises(UserError, match="renders the prompt differently on its own"):
    preference.encode(PROMPT, CHOSEN, REJECTED, tok, 96)
  assert smollm2_tokenizer.chat_template


def test_batched_tokens_equal_the_chat_templates_on_real_hh_pairs(smollm2_tokenizer):
  tok = smollm2_tokenizer
  lines = (HH / "eval.jsonl").read_text().splitlines()[:40]
  pairs = [preference.pair_of(json.loads(l), "eval", i) for i, l in enumerate(lines)]
  for (prompt, chosen, rejected), (p, c, r) in zip(
      pairs, preference._tokens(tok, pairs, ["eval"] * len(pairs))):
    assert p == chat._ids(tok, prompt, generation_prompt=True)
    assert p + c == chat._ids(tok, prompt + [{"role": "assistant", "content": chosen}], False)
    assert p + r == chat._ids(tok, prompt + [{"role": "assistant", "content": rejected}], False)


def test_bundled_hh_splits_load_with_no_prompt_in_both(smollm2_tokenizer):
  config = ml_collections.ConfigDict({"data": {
      "train": str(HH / "train.jsonl"), "train_split": "train",
      "eval": str(HH / "eval.jsonl"), "eval_split": "test", "max_length": 256,
      "max_prompt_length": 0}})
  train, evaluation = preference.prepare(config, smollm2_tokenizer)
  assert (train.pairs, evaluation.pairs) == (1800, 200)
  assert train.rows["input_ids"].shape == (1800, 2, 256)
  assert train.rows["loss_mask"].any(axis=2).all()  # Every sequence has a response.
  assert not {_key(p) for p in train.prompts} & {_key(p) for p in evaluation.prompts}
  assert preference.prepare(config, smollm2_tokenizer, need_train=False)[0] is None
