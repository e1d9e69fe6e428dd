"""LoRA: adapters where the targets say, merged and PEFT exports equal to jaxft's logits."""

import json

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from jaxft import config as config_lib
from jaxft import hf
from jaxft import lora
from jaxft import train
from jaxft import trainable
from jaxft.errors import UserError
from tests.test_train import tiny_config

TARGETS = r".*/(query|value|q_lin|v_lin)"


def _lora_config(rank=4, targets=TARGETS, rules=()):
  c = config_lib.base()
  c.lora.update(rank=rank, alpha=8.0, targets=targets)
  c.optim.rules = rules
  return c


def _logits(model, batch):
  return np.asarray(model(batch["input_ids"], batch["attention_mask"],
                          batch.get("token_type_ids")))


def _randomize(model, chosen, seed=0):
  """Gives the params `chosen(path)` selects random values."""
  key = jax.random.key(seed)
  for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
    if chosen("/".join(map(str, path))):
      value = var.get_value()
      var.set_value(0.1 * jax.random.normal(jax.random.fold_in(key, i), value.shape, value.dtype))


def test_attach_adds_zero_effect_adapters_only_to_the_targets(tiny_bert):
  model = hf.load_classifier(tiny_bert.path, num_labels=2).model
  batch = tiny_bert.batch()
  before = _logits(model, batch)
  chosen = lora.attach(model, _lora_config(), seed=0)
  assert chosen == [f"encoder/layer/{i}/attention/self/{n}" for i in range(2)
                    for n in ("query", "value")]
  np.testing.assert_array_equal(_logits(model, batch), before)
  adapters = [p for p, _ in lora.linear_modules(model) if _.lora_a is not None]
  assert adapters == chosen


def test_targets_that_match_no_linear_are_an_error(tiny_bert):
  model = hf.load_classifier(tiny_bert.path, num_labels=2).model
  with pytest.raises(UserError, match="matches no Linear layer"):
    lora.attach(model, _lora_config(targets=r".*/qkv"), seed=0)


def test_lora_dropout_acts_only_in_training(tiny_bert):
  c = _lora_config()
  c.lora.dropout = 0.5
  model = hf.load_classifier(tiny_bert.path, num_labels=2).model
  lora.attach(model, c, seed=0)
  _randomize(model, lambda p: p.endswith("lora_b"))
  batch = tiny_bert.batch()
  eval1, eval2 = _logits(model, batch), _logits(model, batch)
  train_logits = np.asarray(model(batch["input_ids"], batch["attention_mask"],
                                  batch["token_type_ids"], deterministic=False,
                                  rngs=nnx.Rngs(dropout=0)))
  np.testing.assert_array_equal(eval1, eval2)
  assert not np.allclose(train_logits, eval1, atol=1e-4)


def _trained_lora_model(tiny, rules=()):
  """A model with LoRA whose trainable params (adapters included) hold random values."""
  c = _lora_config(rules=rules)
  model = hf.load_classifier(tiny.path, num_labels=2).model
  trainable.with_adapters(model, c)
  trained = trainable.split(model, c, tiny.config.model_type).assignment.trainable()
  _randomize(model, trained.__contains__)
  return c, model, trained


FAMILIES = ["tiny_bert", "tiny_roberta", "tiny_distilbert"]


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_loads_in_transformers_with_the_same_logits(family, request, tmp_path):
  tiny = request.getfixturevalue(family)
  _, model, _ = _trained_lora_model(tiny)
  batch = tiny.batch()
  expected = _logits(model, batch)
  hf_config = hf.load_hf_config(tiny.path, num_labels=2)
  hf.export_classifier(lora.merge(model), hf_config, str(tmp_path), tokenizer_path=None)
  loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  tiny_pt = type(tiny)(str(tmp_path), loaded.eval(), tiny.config)
  np.testing.assert_allclose(tiny_pt.torch_logits(batch), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_export_loads_with_peft_and_gives_the_same_logits(family, request, tmp_path):
  tiny = request.getfixturevalue(family)
  inner = {"tiny_distilbert": "transformer/layer/1/output_layer_norm/.*"}.get(
      family, "encoder/layer/1/output/LayerNorm/.*")
  head = {"tiny_distilbert": "(pre_classifier|classifier)/.*"}.get(family, "classifier/.*")
  c, model, trained = _trained_lora_model(tiny, rules=((inner, 1.0), (head, 1.0), (".*", None)))
  batch = tiny.batch()
  expected = _logits(model, batch)
  hf_config = hf.load_hf_config(tiny.path, num_labels=2)
  lora.export_peft(model, hf_config, c, trained, str(tmp_path), base_model=tiny.path)
  saved = json.loads((tmp_path / lora.PEFT_CONFIG).read_text())
  assert saved["r"] == 4 and saved["lora_alpha"] == 8.0 and saved["peft_type"] == "LORA"
  base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny.path, num_labels=2)
  peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
  ids = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}
  with torch.no_grad():
    got = peft_model(**ids).logits.numpy()
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_lora_run_exports_merged_and_peft_equal_to_the_restored_model(tiny_setup, tmp_path):
  config = tiny_config(tiny_setup, num_steps=6)
  config.optim.lr = 1e-2
  config.lora.rank = 4
  workdir = str(tmp_path / "w")
  train.train(config, workdir)
  run = train.open_run(config, workdir, config.model.path, train.read_labels(workdir), quiet=True)
  run.checkpointer.close()
  model = run.model()
  lora_b = [v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if p[-1] == "lora_b"]
  assert lora_b and all(np.any(np.asarray(v.get_value()) != 0) for v in lora_b)
  tok = transformers.AutoTokenizer.from_pretrained(config.model.path)
  rows = [json.loads(l) for l in (tiny_setup / "test.jsonl").read_text().splitlines()][:8]
  enc = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=16,
            return_tensors="np")
  batch = {k: v.astype(np.int32) for k, v in enc.items()}
  expected = _logits(model, batch)
  pt = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}

  train.export_command(workdir, str(tmp_path / "hf"), "hf")
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
  train.export_command(workdir, str(tmp_path / "peft"), "peft")
  base = transformers.AutoModelForSequenceClassification.from_pretrained(
      config.model.path, num_labels=2)
  adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
  with torch.no_grad():
    np.testing.assert_allclose(merged(**pt).logits.numpy(), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(adapter(**pt).logits.numpy(), expected, atol=1e-4, rtol=0)

  # Outside the adapted kernels the merged export is the pretrained model, bit for bit.
  from safetensors.numpy import load_file
  pretrained = load_file(str(tiny_setup / "model" / "model.safetensors"))
  exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
  for key, value in pretrained.items():
    ours = exported.get(key, exported.get(f"bert.{key}"))
    if ours is None:  # Buffers such as position_ids.
      continue
    adapted = key.endswith(("query.weight", "value.weight"))
    assert np.array_equal(ours, value) != adapted, key


def test_peft_export_of_a_run_without_lora_is_an_error(tiny_setup, tmp_path):
  train.train(tiny_config(tiny_setup, num_steps=1), str(tmp_path / "w"))
  with pytest.raises(UserError, match="--format=peft needs a LoRA run"):
    train.export_command(str(tmp_path / "w"), str(tmp_path / "out"), "peft")
