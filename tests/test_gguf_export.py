"""`jaxft export --format=gguf`: one llama.cpp file that transformers and jaxft read back.

The truths: transformers' own GGUF loader (it dequantizes), gguf's GGUFReader
for what the file holds, and jaxft's run (its model and `jaxft.generate`).
The model is the tiny random Llama with SmolLM2's tokenizer (`tiny_chat_lm`),
trained to repeat one reply: greedy decoding then has clear margins (the
smallest is ~0.04 against an f16 logit error of ~0.001) and a varied reply.
"""

import functools
import json
import os

import gguf
import numpy as np
import pytest
import torch
import transformers

from jaxft import commands
from jaxft import config as config_lib
from jaxft import defaults
from jaxft import generate
from jaxft import run as run_lib
from jaxft import train
from jaxft.errors import UserError
from jaxft.formats import gguf as gguf_reader
from jaxft.formats import gguf_export
from jaxft.formats import hf
from jaxft.formats import hub
from jaxft.models import registry
from jaxft.tuning import lora
from tests.helpers import jaxft_in_process

QUANTS = ("f16", "q8_0", "q4_0")
QUESTION = "Hi, how are you doing?"
REPLY = "I am doing well, thanks for asking. How was your weekend?"
NEW_TOKENS = 12


def _sft_config(root, train_file, **train_overrides):
  c = defaults.recipe("sft")
  c.model.path = str(root / "model")
  c.data.train = str(train_file)
  c.data.eval = ""
  c.data.max_length = 64
  c.train.update(batch_size=4, num_steps=20, log_every=10, eval_batch_size=4)
  c.train.update(train_overrides)
  c.optim.update(lr=1e-2, warmup_frac=0.0, schedule="constant")
  c.checkpoint.update(every=0)
  return c


@pytest.fixture(scope="module")
def one_chat(tiny_chat_lm, tmp_path_factory):
  """A jsonl file of one conversation, 16 times: what the tiny model learns to repeat."""
  path = tmp_path_factory.mktemp("gguf_data") / "one.jsonl"
  row = {"messages": [{"role": "user", "content": QUESTION},
                      {"role": "assistant", "content": REPLY}]}
  path.write_text((json.dumps(row) + "\n") * 16)
  return path


@pytest.fixture(scope="module")
def trained(tiny_chat_lm, one_chat, tmp_path_factory):
  """A full fine-tune (20 steps) of the tiny Llama: workdir, merged model, tokenizer."""
  workdir = tmp_path_factory.mktemp("gguf_run") / "run"
  train.train(_sft_config(tiny_chat_lm, one_chat), str(workdir))
  _, run, model_path = run_lib.restore(str(workdir))
  return workdir, lora.merge(run.model()), hub.load_tokenizer(model_path)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  """The run exported by the CLI at each quant: {quant: path}."""
  workdir = trained[0]
  folder = tmp_path_factory.mktemp("gguf_out")
  out = {}
  for quant in QUANTS:
    out[quant] = folder / f"tiny-{quant}.gguf"
    proc = jaxft_in_process("export", f"--workdir={workdir}", f"--out={out[quant]}",
                            "--format=gguf", *([f"--quant={quant}"] if quant != "f16" else []))
    assert proc.returncode == 0, proc.stderr
  return out


def _prompt(tokenizer):
  return generate.chat_prompt(tokenizer, [{"role": "user", "content": QUESTION}])


def _ids(tokenizer):
  return np.asarray(tokenizer(_prompt(tokenizer), add_special_tokens=False)["input_ids"],
                    np.int32)[None]


# Loading a GGUF in transformers parses its 49k-token vocabulary (seconds): once per file.
@functools.lru_cache(maxsize=None)
def _torch_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name).eval()


def _torch_logits(path, ids):
  with torch.no_grad():
    return _torch_model(path)(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


def _fields(path):
  reader = gguf.GGUFReader(path)
  big = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
  return reader, {k: f.contents() for k, f in reader.fields.items() if k not in big}


def test_f16_export_gives_transformers_the_runs_logits_reply_and_tokenizer(trained, exported):
  _, model, tokenizer = trained
  ids = _ids(tokenizer)
  theirs = _torch_logits(exported["f16"], ids)
  diff = np.abs(np.asarray(model(ids)) - theirs).max()
  print(f"f16 export vs jaxft: max |logit diff| {diff:.2e}")
  assert diff < 1e-2
  ours = generate.complete(model, tokenizer, [_prompt(tokenizer)], max_new_tokens=NEW_TOKENS)[0]
  assert len(set(ours.split())) >= 5, ours  # A varied reply, not one token repeated.
  loaded = transformers.AutoTokenizer.from_pretrained(exported["f16"].parent,
                                                      gguf_file=exported["f16"].name)
  assert loaded.chat_template == tokenizer.chat_template
  assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
      tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
  assert loaded(_prompt(loaded), add_special_tokens=False)["input_ids"] == ids[0].tolist()
  assert loaded(QUESTION)["input_ids"] == tokenizer(QUESTION)["input_ids"]  # Adds no BOS.
  with torch.no_grad():
    tokens = _torch_model(exported["f16"]).generate(
        torch.from_numpy(ids.astype(np.int64)), max_new_tokens=NEW_TOKENS, do_sample=False,
        pad_token_id=loaded.pad_token_id)
  assert loaded.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True) == ours


def test_the_file_holds_llama_cpps_metadata_names_and_rope_layout(trained, exported, tiny_chat_lm):
  workdir, model, tokenizer = trained
  reader, fields = _fields(exported["f16"])
  config = transformers.AutoConfig.from_pretrained(tiny_chat_lm / "model")
  assert {k: v for k, v in fields.items() if k.startswith(("general.", "llama."))} == {
      "general.architecture": "llama", "general.type": "model", "general.name": "run",
      "general.file_type": gguf.LlamaFileType.MOSTLY_F16,
      "general.quantization_version": gguf.GGML_QUANT_VERSION,
      "llama.context_length": 512, "llama.embedding_length": 32, "llama.block_count": 2,
      "llama.feed_forward_length": 64, "llama.attention.head_count": 4,
      "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 8,
      "llama.rope.freq_base": pytest.approx(config.rope_parameters["rope_theta"]),
      "llama.attention.layer_norm_rms_epsilon": pytest.approx(config.rms_norm_eps),
      "llama.vocab_size": len(tokenizer)}
  assert json.loads(fields[gguf_export.MARKER]) == {
      "format": "gguf", "quant": "f16", "step": 20, "workdir": str(workdir)}
  assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
  assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
          fields["tokenizer.ggml.padding_token_id"]) == (
              tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
  assert fields["tokenizer.ggml.add_bos_token"] is False
  assert fields["tokenizer.chat_template"] == tokenizer.chat_template
  tokens = reader.fields["tokenizer.ggml.tokens"].contents()
  types = reader.fields["tokenizer.ggml.token_type"].contents()
  assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and types[:3] == [3] * 3
  assert len(reader.fields["tokenizer.ggml.merges"].contents()) > 40_000
  # Tied embeddings: no output.weight (llama.cpp and transformers then tie them too).
  names = {t.name for t in reader.tensors}
  assert names == {"token_embd.weight", "output_norm.weight", *(
      f"blk.{i}.{n}.weight" for i in range(2) for n in (
          "attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
          "ffn_up", "ffn_down"))}
  # Q and K rows interleaved by rotary pair: jaxft's reader, which undoes that, gets the
  # run's tensors back (f16-rounded); without the permutation the logits above would differ.
  read = {key: get() for key, get in gguf_reader.checkpoint(str(exported["f16"])).items()}
  for _, key, want in hf.export_tensors(model, registry.lookup("llama", "causal_lm").layout):
    np.testing.assert_allclose(read[key], want, atol=1e-3 * max(1.0, np.abs(want).max()),
                               err_msg=key)


@pytest.mark.parametrize("quant,weight_type,bound", [("q8_0", "Q8_0", 0.1), ("q4_0", "Q4_0", 0.5)])
def test_quantized_exports_hold_the_asked_types_and_stay_close_to_f16(trained, exported, quant,
                                                                     weight_type, bound):
  ids = _ids(trained[2])
  reader, fields = _fields(exported[quant])
  assert fields["general.file_type"] == getattr(gguf.LlamaFileType, f"MOSTLY_{weight_type}")
  types = {t.name: t.tensor_type.name for t in reader.tensors}
  for name, kind in types.items():
    if name.endswith("norm.weight"):
      assert kind == "F32", name  # 1-D: llama.cpp reads norms as float32 only.
    elif name == "token_embd.weight" and quant == "q4_0":
      assert kind == "Q8_0"  # The (tied) output layer stays above 4 bits.
    else:
      assert kind == weight_type, name
  diff = np.abs(_torch_logits(exported[quant], ids) - _torch_logits(exported["f16"], ids)).max()
  size = os.path.getsize(exported[quant]) / os.path.getsize(exported["f16"])
  print(f"{quant} vs f16: max |logit diff| {diff:.3f}, file {size:.2f}x f16's")
  assert diff < bound
  assert size < 0.75


def test_the_export_reimports_into_jaxft_and_trains_on(trained, exported, one_chat, tmp_path):
  _, model, tokenizer = trained
  ids = _ids(tokenizer)
  reimported = hf.load(str(exported["f16"]), "causal_lm").model
  diff = np.abs(np.asarray(reimported(ids)) - np.asarray(model(ids))).max()
  print(f"f16 export re-imported vs the run: max |logit diff| {diff:.2e}")
  assert diff < 1e-2
  config = _sft_config(exported["f16"].parent, one_chat, num_steps=3, log_every=1)
  config.model.path = str(exported["f16"])
  assert train.train(config, str(tmp_path / "again"))["step"] == 3
  events = [json.loads(l) for l in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
  losses = [e["loss"] for e in events if e["split"] == "train"]
  assert len(losses) == 3 and np.isfinite(losses).all(), losses


def test_a_lora_run_exports_its_adapters_merged(tiny_chat_lm, one_chat, tmp_path):
  config = _sft_config(tiny_chat_lm, one_chat, num_steps=3)
  config.lora.update(rank=4, alpha=8.0)
  workdir = str(tmp_path / "lora")
  train.train(config, workdir)
  _, run, model_path = run_lib.restore(workdir)
  assert any(p.endswith("lora_b") for p in run.split.assignment.trainable())
  commands.export_command(workdir, str(tmp_path / "lora.gguf"), "gguf")
  ids = _ids(hub.load_tokenizer(model_path))
  ours = np.asarray(run.model()(ids))
  base = np.asarray(hf.load(config.model.path, "causal_lm").model(ids))
  theirs = _torch_logits(tmp_path / "lora.gguf", ids)
  print(f"LoRA f16 export vs the run: max |logit diff| {np.abs(ours - theirs).max():.2e} "
        f"(the adapters move them by {np.abs(ours - base).max():.2e})")
  assert np.abs(ours - theirs).max() < 1e-2 < np.abs(ours - base).max()


def test_an_untied_model_gets_an_output_layer_and_its_own_head_dim(tiny_chat_lm, tmp_path):
  # head_dim 16, not hidden_size / heads = 8: llama.cpp then reads it from key_length.
  tokenizer = hub.load_tokenizer(str(tiny_chat_lm / "model"))
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
      tie_word_embeddings=False, initializer_range=0.3, pad_token_id=tokenizer.pad_token_id)
  torch.manual_seed(1)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
  loaded = hf.load(str(tmp_path / "model"), "causal_lm")
  ids = _ids(tokenizer)
  ours = np.asarray(loaded.model(ids))
  for quant in ("f16", "q4_0"):
    path = tmp_path / f"untied-{quant}.gguf"
    gguf_export.export(loaded.model, loaded.hf_config, str(path),
                       tokenizer_path=str(tiny_chat_lm / "model"), quant=quant)
    reader, fields = _fields(path)
    assert (fields["llama.rope.dimension_count"], fields["llama.attention.key_length"],
            fields["llama.attention.value_length"]) == (16, 16, 16)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert (types["token_embd.weight"], types["output.weight"]) == (
        ("F16", "F16") if quant == "f16" else ("Q4_0", "Q8_0"))
  diff = np.abs(_torch_logits(tmp_path / "untied-f16.gguf", ids) - ours).max()
  print(f"untied f16 export vs jaxft: max |logit diff| {diff:.2e} (logits up to "
        f"{np.abs(ours).max():.1f})")
  assert diff < 1e-2 * np.abs(ours).max()  # f16 rounding of large random weights; a wrong
  # head_dim or layout is off by the logits' own size.


def _error(proc):
  assert proc.returncode == 2, proc.stderr
  return proc.stderr.strip().splitlines()[-1]


def test_a_classifier_a_bad_quant_or_a_bad_target_is_a_clear_error(trained, exported, tmp_path):
  workdir = trained[0]
  classifier = tmp_path / "classifier"
  classifier.mkdir()
  (classifier / "config.json").write_text(config_lib.to_json(defaults.recipe("classify")))
  export = lambda *a: jaxft_in_process("export", *a)
  assert _error(export(f"--workdir={classifier}", f"--out={tmp_path / 'c.gguf'}",
                       "--format=gguf")) == (
      f"jaxft: error: --format=gguf exports language models (runs of task causal_lm, dpo, "
      f"grpo); {classifier} trained a classify model: use --format=hf or peft")
  assert "--quant=q5_k: value should be one of <f16|q8_0|q4_0>" in _error(export(f"--workdir={workdir}", f"--out={tmp_path / 'q.gguf'}",
                                         "--format=gguf", "--quant=q5_k"))
  assert _error(export(f"--workdir={workdir}", f"--out={tmp_path / 'hf'}", "--quant=q8_0")) == (
      "jaxft: error: --quant is for --format=gguf; --format=hf writes float32 weights")
  assert "add --format=gguf" in _error(export(f"--workdir={workdir}",
                                              f"--out={tmp_path / 'x.gguf'}"))
  assert "--out must end in .gguf" in _error(export(f"--workdir={workdir}",
                                                    f"--out={tmp_path / 'x.bin'}",
                                                    "--format=gguf"))
  (tmp_path / "dir.gguf").mkdir()
  assert "is a folder" in _error(export(f"--workdir={workdir}", f"--out={tmp_path / 'dir.gguf'}",
                                        "--format=gguf"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier", "dir.gguf"]


def test_an_earlier_export_is_replaced_anything_else_needs_overwrite(trained, exported, tmp_path):
  workdir, out = trained[0], tmp_path / "model.gguf"
  out.write_text("my notes")
  args = (f"--workdir={workdir}", f"--out={out}", "--format=gguf", "--quant=q8_0")
  assert "exists and is no earlier jaxft GGUF export: pass --overwrite" in _error(
      jaxft_in_process("export", *args))
  assert out.read_text() == "my notes"
  assert jaxft_in_process("export", *args, "--overwrite").returncode == 0
  assert jaxft_in_process("export", *args[:-1]).returncode == 0  # An earlier export: replaced.
  assert json.loads(_fields(out)[1][gguf_export.MARKER])["quant"] == "f16"
  umask = os.umask(0)
  os.umask(umask)
  assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # Not mkstemp's 0600.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # No .part left.


def test_a_failed_write_leaves_the_earlier_file_whole(trained, exported, tmp_path, monkeypatch):
  out = tmp_path / "model.gguf"
  out.write_bytes(exported["q4_0"].read_bytes())

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
  with pytest.raises(UserError, match=f"writing {out} failed: .*No space left on device.*"
                                      f"{out} is unchanged"):
    commands.export_command(str(trained[0]), str(out), "gguf")
  assert out.read_bytes() == exported["q4_0"].read_bytes()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_the_base_model_is_never_the_target(exported):
  with pytest.raises(UserError, match="is this run's base model"):
    gguf_export.check_target(str(exported["f16"]), True, base_model=str(exported["f16"]))


def test_models_llama_cpps_llama_cannot_run_are_refused():
  with pytest.raises(UserError, match="exports model_type llama or mistral; this run's model "
                                      "is 'qwen2'"):
    gguf_export.check_model(transformers.Qwen2Config())
  scaled = transformers.LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})
  with pytest.raises(UserError, match="rope_type 'linear'"):
    gguf_export.check_model(scaled)
  with pytest.raises(UserError, match="attention_bias"):
    gguf_export.check_model(transformers.LlamaConfig(attention_bias=True))
  gguf_export.check_model(transformers.MistralConfig())
