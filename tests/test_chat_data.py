"""SFT data: which tokens carry loss, packing, and a loss that packing does not change."""

import numpy as np
import transformers

from jaxft.formats import hf
from jaxft.tasks import causal_lm
from jaxft.data import chat

TWO_TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]


def test_loss_falls_on_the_assistant_tokens_of_each_turn_under_smollm2s_template(
    smollm2_tokenizer):
  tok = smollm2_tokenizer
  ids, mask = chat.render_chat(tok, TWO_TURNS)
  # SmolLM2's template adds its default system turn; each assistant span is the
  # reply, <|im_end|> and the newline after it, as the template writes them.
  assert len(ids) == 51
  assert np.flatnonzero(mask).tolist() == [31, 32, 33, 34, 46, 47, 48, 49, 50]
  assert tok.decode(ids[31:35]) == "Hello!<|im_end|>\n"
  assert tok.decode(ids[46:51]) == "See you.<|im_end|>\n"
  _, last = chat.render_chat(tok, TWO_TURNS, loss_on="last")
  assert np.flatnonzero(last).tolist() == [46, 47, 48, 49, 50]
  assert chat.render_chat(tok, TWO_TURNS, loss_on="all")[1].all()


def test_prompt_completion_pairs_carry_loss_on_completion_and_eos(smollm2_tokenizer):
  tok = smollm2_tokenizer
  ids, mask = chat.render_completion(tok, "2 + 2 =", " 4")
  n_prompt = len(tok("2 + 2 =", add_special_tokens=False)["input_ids"])
  assert ids[-1] == tok.eos_token_id
  assert not mask[:n_prompt].any() and mask[n_prompt:].all()


def test_packing_fills_rows_in_order_with_segments_and_positions():
  docs = [(np.arange(1, 4), np.ones(3, bool)), (np.arange(4, 9), np.ones(5, bool)),
          (np.arange(9, 11), np.zeros(2, bool))]
  packed = chat.pack(docs, length=8, pad_id=0)
  assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 0, 0, 0, 0, 0, 0]]
  assert packed["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 0, 0, 0, 0, 0, 0]]
  assert packed["positions"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
  padded = chat.pack(docs, length=8, pad_id=0, packing=False)
  assert padded["input_ids"].shape == (3, 8) and padded["segment_ids"][1].tolist() == [1] * 5 + [0] * 3


def test_packing_on_and_off_give_the_same_loss(tmp_path):
  config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=37,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
  model = hf.load(str(tmp_path), "causal_lm").model
  rng = np.random.default_rng(0)
  docs = [(rng.integers(1, 100, n).astype(np.int32), rng.random(n) < 0.7) for n in (5, 9, 3, 7, 6)]

  def mean_loss(packing):
    rows = chat.pack(docs, length=16, pad_id=0, packing=packing)
    logits = model(rows["input_ids"], positions=rows["positions"],
                   segment_ids=rows["segment_ids"])
    total, count = causal_lm.token_loss_sum(logits, rows)
    return float(total) / float(count), rows["input_ids"].shape[0]

  (packed, n_packed), (padded, n_padded) = mean_loss(True), mean_loss(False)
  assert n_packed < n_padded == 5
  assert abs(packed - padded) <= 1e-5 * padded
