"""Causal LMs (Llama, Mistral, Qwen2, Qwen3, GPT-2) against transformers PyTorch, fp32."""

import numpy as np
import pytest
import torch
import transformers

from jaxft.formats import hf

TOL = 1e-4
SIZES = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    "llama-gqa-llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=LLAMA3_ROPE)),
    "llama-biases-tied": ("LlamaConfig", "LlamaForCausalLM",
                          dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "llama-linear-rope-mha": ("LlamaConfig", "LlamaForCausalLM",
                              dict(num_key_value_heads=4,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM",
                   dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 16})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    # max_position_embeddings 8 < the 12-token test batch, so the NTK base grows.
    "qwen2-dynamic-rope": ("Qwen2Config", "Qwen2ForCausalLM",
                           dict(max_position_embeddings=8,
                                rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "qwen3-head-dim": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=100)),
}


def _checkpoint(case, tmp_path, **overrides):
  """The case's transformers model, saved to tmp_path; `overrides` change its config."""
  config_cls, model_cls, extra = CASES[case]
  sizes = {} if config_cls == "GPT2Config" else SIZES
  config = getattr(transformers, config_cls)(**{**sizes, **extra, **overrides})
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():  # HF init hides scale/bias mix-ups: perturb every tensor.
    for p in model.parameters():
      p.add_(torch.randn(p.shape) * 0.1)
  model.save_pretrained(tmp_path)
  return model


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 100, (3, 12)).astype(np.int32)
  mask = np.ones((3, 12), np.int32)
  mask[1, 8:] = 0
  mask[2, 4:] = 0
  return ids, mask


def _torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
  ref = _checkpoint(case, tmp_path)
  loaded = hf.load(str(tmp_path), "causal_lm")
  assert not loaded.report.missing and not loaded.report.unexpected
  ids, mask = _batch()
  ours = np.asarray(loaded.model(ids, mask))
  keep = mask.astype(bool)  # Padded positions' logits are arbitrary on both sides.
  assert np.abs(ours - _torch_logits(ref, ids, mask))[keep].max() <= TOL


@pytest.mark.parametrize("case", ["llama-gqa-llama3-rope", "qwen3-head-dim", "gpt2"])
def test_export_loads_in_transformers_with_the_same_logits(case, tmp_path):
  _checkpoint(case, tmp_path / "in")
  loaded = hf.load(str(tmp_path / "in"), "causal_lm")
  hf.export(loaded.model, loaded.hf_config, "causal_lm", str(tmp_path / "out"), tokenizer_path=None)
  back, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ids, mask = _batch()
  keep = mask.astype(bool)
  assert np.abs(np.asarray(loaded.model(ids, mask))
                - _torch_logits(back.eval(), ids, mask))[keep].max() <= TOL


def test_packed_documents_never_attend_across_segments(tmp_path):
  # Two documents packed in one row, each with its own positions, give the
  # logits each gives alone; so no attention crosses the segment boundary.
  _checkpoint("llama-gqa-llama3-rope", tmp_path)
  model = hf.load(str(tmp_path), "causal_lm").model
  ids, _ = _batch()
  a, b = ids[0, :7], ids[1, :5]
  packed = np.concatenate([a, b])[None]
  segments = np.array([[1] * 7 + [2] * 5], np.int32)
  positions = np.array([list(range(7)) + list(range(5))], np.int32)
  together = np.asarray(model(packed, positions=positions, segment_ids=segments))[0]
  alone_a = np.asarray(model(a[None]))[0]
  alone_b = np.asarray(model(b[None]))[0]
  np.testing.assert_allclose(together[:7], alone_a, atol=1e-5)
  np.testing.assert_allclose(together[7:], alone_b, atol=1e-5)
  # Without segment ids the second document does see the first.
  mixed = np.asarray(model(packed, positions=positions))[0]
  assert np.abs(mixed[7:] - alone_b).max() > 1e-3


@pytest.mark.parametrize("case", ["llama-yarn", "qwen2-dynamic-rope"])
def test_scaled_rope_cases_really_change_transformers_logits(case, tmp_path):
  # Guards the parity cases: transformers must not silently drop the scaling.
  scaled = _checkpoint(case, tmp_path / "scaled")
  unscaled = _checkpoint(case, tmp_path / "unscaled", rope_scaling=None)
  assert unscaled.config.rope_parameters["rope_type"] == "default"
  ids, mask = _batch()
  assert np.abs(_torch_logits(scaled, ids, mask) - _torch_logits(unscaled, ids, mask)).max() > 1e-3


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
ROPE_PARAMETERS = {
    "yarn": YARN,
    # No factor: it is max_position_embeddings / original (64 / 32).
    "yarn-no-factor": {**YARN, "factor": None, "original_max_position_embeddings": 32},
    "yarn-attention-factor": {**YARN, "attention_factor": 0.8},
    "yarn-mscale-betas-untruncated": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5,
                                      "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.mark.parametrize("name", sorted(ROPE_PARAMETERS))
def test_rope_frequencies_and_attention_factor_match_transformers(name):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from jaxft.models import llama, rope
  config = transformers.LlamaConfig(**SIZES, rope_parameters=dict(ROPE_PARAMETERS[name]))
  params = llama.rope_parameters(config)
  inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config)
  ours = rope.rope_inverse_frequencies(params, llama.head_dim(config),
                                         config.max_position_embeddings)
  np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)
  assert rope.rope_attention_scaling(params, config.max_position_embeddings) == pytest.approx(
      attention_factor, rel=1e-12)


def test_dynamic_rope_frequencies_match_transformers_past_max_positions():
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from jaxft.models import llama, rope
  config = transformers.LlamaConfig(**SIZES, rope_parameters=dict(ROPE_PARAMETERS["dynamic"]))
  params, dim, limit = llama.rope_parameters(config), llama.head_dim(config), 64
  static = rope.rope_inverse_frequencies(params, dim, limit)
  settings = rope.dynamic_rope_settings(params, limit)
  for length in (1, 64, 65, 100, 1000):
    positions = np.arange(length, dtype=np.int32)[None]
    ours = np.asarray(rope.dynamic_rope_inverse_frequencies(positions, static, settings))
    theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, seq_len=torch.tensor(length))
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)


def test_unsupported_rope_type_is_a_clear_error(tmp_path):
  from jaxft.errors import UserError
  config = transformers.LlamaConfig(**SIZES, rope_scaling={"rope_type": "longrope",
                                                           "short_factor": [1.0] * 4,
                                                           "long_factor": [1.0] * 4})
  with pytest.raises(UserError, match="rope_type 'longrope' is not supported"):
    hf.build_model(config, "causal_lm")


@pytest.mark.parametrize("case", ["llama-gqa-llama3-rope", "llama-yarn", "qwen2",
                                  "qwen2-dynamic-rope", "qwen3-head-dim", "gpt2"])
def test_greedy_generation_equals_transformers_generate(case, tmp_path):
  # For qwen2-dynamic-rope (max_position_embeddings 8) decoding runs to
  # position 37, so the NTK base keeps growing step by step.
  from jaxft import generate
  ref = _checkpoint(case, tmp_path)
  model = hf.load(str(tmp_path), "causal_lm").model
  rng = np.random.default_rng(1)
  ids = rng.integers(1, 100, (2, 6)).astype(np.int32)
  mask = np.ones_like(ids)
  ids[1, :2], mask[1, :2] = 0, 0  # Left padding, as generation wants.
  ours = generate.generate(model, ids, mask, max_new_tokens=32, eos_ids=[])
  with torch.no_grad():
    theirs = ref.generate(input_ids=torch.from_numpy(ids.astype(np.int64)),
                          attention_mask=torch.from_numpy(mask.astype(np.int64)),
                          max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=0).numpy()[:, 6:]
  np.testing.assert_array_equal(ours, theirs)


def test_sampling_top_k_1_and_tiny_top_p_are_greedy_and_eos_stops_a_row(tmp_path):
  from jaxft import generate
  _checkpoint("qwen2", tmp_path)
  model = hf.load(str(tmp_path), "causal_lm").model
  ids = np.random.default_rng(2).integers(1, 100, (2, 5)).astype(np.int32)
  mask = np.ones_like(ids)
  greedy = generate.generate(model, ids, mask, max_new_tokens=8, eos_ids=[])
  for sampling in (generate.Sampling(temperature=1.0, top_k=1),
                   generate.Sampling(temperature=1.0, top_p=1e-6)):
    np.testing.assert_array_equal(
        generate.generate(model, ids, mask, max_new_tokens=8, eos_ids=[], sampling=sampling),
        greedy)
  hot = generate.Sampling(temperature=2.0)
  a = generate.generate(model, ids, mask, max_new_tokens=8, eos_ids=[], sampling=hot, seed=1)
  b = generate.generate(model, ids, mask, max_new_tokens=8, eos_ids=[], sampling=hot, seed=1)
  np.testing.assert_array_equal(a, b)
  # Make row 0's third greedy token the EOS: that row then repeats it.
  eos = int(greedy[0, 2])
  stopped = generate.generate(model, ids, mask, max_new_tokens=8, eos_ids=[eos])
  first = int(np.argmax(stopped[0] == eos))
  assert first <= 2 and (stopped[0, first:] == eos).all()


def test_smollm2_gguf_matches_transformers_and_generates_the_same_reply(smollm2_path,
                                                                         smollm2_tokenizer):
  # The real 30-layer model, dequantized from Q4_1 / Q8_0 by both sides.
  from jaxft import generate
  import os
  loaded = hf.load(smollm2_path, "causal_lm")
  assert not loaded.report.missing and loaded.hf_config.num_hidden_layers == 30
  tok = smollm2_tokenizer
  text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                 tokenize=False, add_generation_prompt=True)
  ids = np.asarray(tok(text)["input_ids"], np.int32)[None]
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path)).eval()
  with torch.no_grad():
    theirs = ref(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    reply = ref.generate(torch.from_numpy(ids.astype(np.int64)), max_new_tokens=32,
                         do_sample=False).numpy()[0, ids.shape[1]:]
  assert np.abs(np.asarray(loaded.model(ids)) - theirs).max() <= 1e-3
  ours = generate.generate(loaded.model, ids, np.ones_like(ids), max_new_tokens=32,
                           eos_ids=[tok.eos_token_id])[0]
  np.testing.assert_array_equal(ours[:len(reply)], reply)
  assert "Paris" in tok.decode(reply)


def test_a_corrupt_gguf_file_is_a_clear_error(tmp_path):
  from jaxft.errors import UserError
  bad = tmp_path / "model.gguf"
  bad.write_bytes(b"GGUF not really")
  with pytest.raises(UserError, match="cannot read GGUF file"):
    hf.load(str(bad), "causal_lm")


def test_stop_strings_cut_after_the_replys_leading_whitespace():
  from jaxft import generate
  assert generate.cut_at_stop("\n\nThe sum.\nMore", ["\n"]) == "\n\nThe sum."
  assert generate.cut_at_stop("    return x\ndef f():", ["\ndef ", "\nclass "]) == "    return x"
  assert generate.cut_at_stop("no stop here", ["\n"]) == "no stop here"
  assert generate.cut_at_stop("a STOP b STOP", ["STOP", ""]) == "a "
