"""Causal-LM SFT end to end: train, eval (loss, perplexity), samples, export, generate."""

import json
import math

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxft import cli
from jaxft.formats import hf
from jaxft.tasks import causal_lm
from jaxft import steps
from jaxft import train
from jaxft.errors import UserError
from jaxft import run as run_lib
from jaxft.formats import hub
from jaxft import commands
from jaxft import defaults


def tiny_sft_config(root, **train_overrides):
  c = defaults.recipe("sft")
  c.model.path = str(root / "model")
  c.data.train = str(root / "train.jsonl")
  c.data.eval = str(root / "test.jsonl")
  c.data.max_length = 128
  c.train.update(batch_size=4, num_steps=8, log_every=2, eval_batch_size=4)
  c.train.update(train_overrides)
  c.optim.update(lr=2e-2, warmup_frac=0.0, schedule="constant")
  c.eval.update(num_samples=2, max_new_tokens=8)
  c.checkpoint.update(every=0)
  return c


def test_sft_lowers_the_assistant_loss_writes_samples_and_resumes_the_eval(tiny_chat_lm,
                                                                           tmp_path, capsys):
  config = tiny_sft_config(tiny_chat_lm)
  (tmp_path / "fresh").mkdir()
  before = commands.eval_command(config, str(tmp_path / "fresh"))
  # A language model means something untrained: evaluated, and said so.
  assert (f"no checkpoint in {tmp_path / 'fresh'}: evaluating the pretrained model "
          f"{config.model.path}") in capsys.readouterr().err
  result = train.train(config, str(tmp_path / "run"))
  assert set(result) == {"step", "tokens", "loss", "perplexity"} and result["step"] == 8
  assert result["tokens"] == before["tokens"] > 100
  assert result["loss"] < 0.9 * before["loss"]
  assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
  samples = [json.loads(l) for l in (tmp_path / "run" / "samples" / "step_8.jsonl").open()]
  assert len(samples) == 2
  assert samples[0]["prompt"].endswith("<|im_start|>assistant\n")
  assert samples[0]["reference"] and isinstance(samples[0]["generated"], str)
  again = commands.eval_command(config, str(tmp_path / "run"))
  assert again["step"] == 8 and again["loss"] == pytest.approx(result["loss"], rel=1e-6)


def test_packing_on_and_off_give_the_same_eval_loss(tiny_chat_lm, tmp_path):
  losses = {}
  for packing in (True, False):
    config = tiny_sft_config(tiny_chat_lm)
    config.data.packing = packing
    (tmp_path / str(packing)).mkdir()
    losses[packing] = commands.eval_command(config, str(tmp_path / str(packing)))
  assert losses[True]["tokens"] == losses[False]["tokens"]
  assert losses[True]["loss"] == pytest.approx(losses[False]["loss"], rel=1e-5)


def test_grad_accumulation_gives_the_per_token_mean_of_the_whole_batch(tiny_chat_lm):
  from jaxft.tuning import optimizer
  from jaxft.tuning import trainable
  from jaxft.data import sft
  config = tiny_sft_config(tiny_chat_lm)
  config.optim.update(optimizer="sgd", clip_norm=0.0, weight_decay=0.0)
  tokenizer = hub.load_tokenizer(config.model.path)
  rows = sft.prepare(config, tokenizer)[0].rows
  batch = {k: v[:4] for k, v in rows.items()}
  model = hf.load(config.model.path, "causal_lm").model
  split = trainable.split(model, config)
  tx = optimizer.build(config, split.params, split.assignment)
  out = {}
  for accum in (1, 2, 4):
    state = steps.init_state(split.params, split.frozen, tx)
    out[accum] = steps.train_step(state, batch, objective=causal_lm.OBJECTIVE,
                                  graphdef=split.graphdef, rest=split.rest, tx=tx,
                                  grad_accum=accum, dropout_key=jax.random.key(0))[1]
  # Rows hold different numbers of loss tokens: a mean of per-micro-batch means would differ.
  per_row = causal_lm.loss_targets(batch).sum(1)
  assert len(set(per_row.tolist())) > 1
  for accum in (2, 4):
    np.testing.assert_allclose(out[accum]["loss"], out[1]["loss"], rtol=1e-5)
    np.testing.assert_allclose(out[accum]["grad_norm"], out[1]["grad_norm"], rtol=1e-4)


def test_train_loss_and_gradient_equal_transformers_on_the_same_rows(tiny_chat_lm):
  # The loss comes from hidden states chunk by chunk (jaxft.tasks.lm_loss), never
  # from full logits: pin it, and the gradient of the tied embedding (input
  # and output layer), to transformers' loss on logits with -100 labels.
  from jaxft.tuning import trainable
  from jaxft.data import sft
  config = tiny_sft_config(tiny_chat_lm)
  config.data.packing = False  # One document per row: what transformers' loss sees.
  rows = sft.prepare(config, hub.load_tokenizer(config.model.path))[0].rows
  batch = {k: v[:4] for k, v in rows.items()}
  split = trainable.split(hf.load(config.model.path, "causal_lm").model, config)
  units = causal_lm.OBJECTIVE.units(batch)
  loss, _, grads, _ = steps.loss_and_grads(causal_lm.OBJECTIVE, split.graphdef, split.rest,
                                        split.params, split.frozen, batch, None, units)
  theirs = transformers.LlamaForCausalLM.from_pretrained(config.model.path).eval()
  ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
  keep = torch.from_numpy((batch["loss_mask"] & (batch["segment_ids"] > 0)).astype(bool))
  out = theirs(input_ids=ids, attention_mask=torch.from_numpy(batch["segment_ids"] > 0).long(),
               labels=torch.where(keep, ids, -100))
  out.loss.backward()
  np.testing.assert_allclose(float(loss), out.loss.item(), atol=1e-5)
  ours = np.asarray(grads["model"]["embed_tokens"]["embedding"].get_value())
  want = theirs.model.embed_tokens.weight.grad.numpy()
  # torch's nn.Embedding(padding_idx=pad) gives the pad token's row no input-side
  # gradient, even where it is a real token (SmolLM2's pad is its <|im_end|>).
  pad = theirs.config.pad_token_id
  assert (batch["input_ids"][batch["segment_ids"] > 0] == pad).any()
  np.testing.assert_allclose(np.delete(ours, pad, 0), np.delete(want, pad, 0), atol=1e-6)


def _greedy_torch(folder, prompt, n):
  model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
  with torch.no_grad():
    out = model.generate(ids, max_new_tokens=n, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
  return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_export_loads_in_transformers_and_replies_as_jaxft_generate(tiny_chat_lm, tmp_path,
                                                                     capsys):
  # Two small steps: trained weights whose greedy output is still varied text.
  config = tiny_sft_config(tiny_chat_lm, num_steps=2)
  config.optim.lr = 1e-3
  train.train(config, str(tmp_path / "run"))
  commands.export_command(str(tmp_path / "run"), str(tmp_path / "hf"))
  exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  assert exported.chat_template == hub.load_tokenizer(config.model.path).chat_template
  prompt = "hey! what did you do this weekend? i"  # Raw text, as `jaxft generate` takes it.
  theirs = _greedy_torch(tmp_path / "hf", prompt, 12)
  assert theirs.strip()
  for source in (f"--workdir={tmp_path / 'run'}", f"--model={tmp_path / 'hf'}"):
    capsys.readouterr()
    assert cli.run(["jaxft", "generate", source, f"--prompt={prompt}",
                    "--max_new_tokens=12", "--temperature=0"]) == 0
    assert capsys.readouterr().out == theirs + "\n", source


def test_data_without_a_known_format_or_assistant_turn_is_a_clear_error(tiny_chat_lm,
                                                                        tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
  config = tiny_sft_config(tiny_chat_lm)
  config.data.train = str(bad)
  with pytest.raises(UserError, match="needs a 'messages' column"):
    train.train(config, str(tmp_path / "a"))
  bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
  with pytest.raises(UserError, match="row 0: the conversation has no assistant turn"):
    train.train(config, str(tmp_path / "b"))


def test_lora_sft_exports_merged_and_peft_with_the_restored_models_logits(tiny_chat_lm,
                                                                          tmp_path):
  import peft
  config = tiny_sft_config(tiny_chat_lm, num_steps=3)
  config.lora.update(rank=4, alpha=8.0)
  workdir = str(tmp_path / "run")
  train.train(config, workdir)
  _, run, _ = run_lib.restore(workdir)
  trained = run.split.assignment.trainable()
  # Adapters on q/v only: the (tied) embeddings and lm_head of a language model stay frozen.
  assert trained and all(p.rsplit("/", 1)[1] in ("lora_a", "lora_b") for p in trained)
  ids = np.random.default_rng(0).integers(0, 1000, (2, 9)).astype(np.int32)
  ours = np.asarray(run.model()(ids))
  commands.export_command(workdir, str(tmp_path / "merged"))
  commands.export_command(workdir, str(tmp_path / "peft"), "peft")
  saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert saved["task_type"] == "CAUSAL_LM" and saved["modules_to_save"] == []
  base = transformers.AutoModelForCausalLM.from_pretrained(config.model.path)
  models = {"merged": transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged"),
            "peft": peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"))}
  for name, model in models.items():
    with torch.no_grad():
      theirs = model.eval()(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4, name


def test_inspect_reports_the_lm_step_without_loading_weights(tiny_chat_lm):
  from jaxft import inspect
  config = tiny_sft_config(tiny_chat_lm)
  out = inspect.inspect(config)
  model = hf.load(config.model.path, "causal_lm").model
  from flax import nnx
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert out["params_total"] == out["params_trainable"] == total
  assert out["step_flops"] > 6 * total * config.train.batch_size * config.data.max_length * 0.5


def test_missing_gguf_file_or_bad_loss_on_is_a_clear_error(tiny_chat_lm, tmp_path):
  config = tiny_sft_config(tiny_chat_lm)
  config.model.path = str(tmp_path / "missing.gguf")
  with pytest.raises(UserError, match="GGUF file not found"):
    train.train(config, str(tmp_path / "a"))
  config = tiny_sft_config(tiny_chat_lm)
  config.data.loss_on = "user"
  with pytest.raises(UserError, match="config.data.loss_on must be one of"):
    train.train(config, str(tmp_path / "b"))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
