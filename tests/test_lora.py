"""LoRA: adapters where the targets say, merged and PEFT exports equal to jaxft's logits."""

import json

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from jaxft import config as config_lib
from jaxft.formats import hf
from jaxft.formats import peft as peft_export
from jaxft import tasks
from jaxft.tuning import lora
from jaxft import train
from jaxft.tuning import trainable
from jaxft.errors import UserError
from jaxft.models import layers
from tests.helpers import tiny_config
from jaxft.formats import weights
from jaxft import run as run_lib
from jaxft.formats import hub
from jaxft import commands

TOL = 1e-4
TARGETS = r".*/(query|value|q_lin|v_lin)"
FAMILIES = ["tiny_bert", "tiny_roberta", "tiny_distilbert"]


# lora.attach's settings as _lora_config() gives them.
_ATTACH = dict(targets_regex=TARGETS, rank=4, alpha=8.0, dropout_rate=0.0, seed=0)


def _lora_config(rank=4, targets=TARGETS, rules=()):
  c = config_lib.base()
  c.lora.update(rank=rank, alpha=8.0, targets=targets)
  c.optim.rules = rules
  return c


def _logits(model, batch):
  return np.asarray(model(batch["input_ids"], batch["attention_mask"],
                          batch.get("token_type_ids")))


def _torch_logits(model, batch):
  with torch.no_grad():
    return model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}
                 ).logits.numpy()


def _params(model):
  return {"/".join(map(str, p)): v
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _perturb(model, chosen, seed=0):
  """Adds N(0, 0.1) noise to the params `chosen(path)` selects (lora_b stops being zero)."""
  key = jax.random.key(seed)
  for i, (path, var) in enumerate(sorted(_params(model).items())):
    if chosen(path):
      value = var.get_value()
      noise = 0.1 * jax.random.normal(jax.random.fold_in(key, i), value.shape, value.dtype)
      var.set_value(value + noise)


def _adapted(model):
  return [p for p, m in lora.linear_modules(model) if m.lora_a is not None]


# --- attach ------------------------------------------------------------------

def test_attach_adds_zero_effect_adapters_only_to_the_targets(tiny_bert):
  model = hf.load(tiny_bert.path, "classify", num_labels=2).model
  batch = tiny_bert.batch()
  before = _logits(model, batch)
  chosen = lora.attach(model, **_ATTACH)
  assert chosen == [f"encoder/layer/{i}/attention/self/{n}" for i in range(2)
                    for n in ("query", "value")]
  assert _adapted(model) == chosen
  np.testing.assert_array_equal(_logits(model, batch), before)
  for path, m in lora.linear_modules(model):
    if path in chosen:
      assert isinstance(m.lora_a, layers.LoRAParam) and isinstance(m.lora_b, layers.LoRAParam)
      assert m.lora_a.shape == (32, 4) and m.lora_b.shape == (4, 32)
      assert np.any(np.asarray(m.lora_a[...]) != 0)
      np.testing.assert_array_equal(np.asarray(m.lora_b[...]), 0)
      assert m.lora_scale == 8.0 / 4
  adapter_params = sorted(p for p in _params(model) if p.rsplit("/", 1)[1].startswith("lora_"))
  assert adapter_params == sorted(f"{m}/{n}" for m in chosen for n in ("lora_a", "lora_b"))


@pytest.mark.parametrize("targets, expected", [
    ("encoder/layer/0/attention/self/query", ["encoder/layer/0/attention/self/query"]),
    (r"encoder/layer/1/.*dense", ["encoder/layer/1/attention/output/dense",
                                  "encoder/layer/1/intermediate/dense",
                                  "encoder/layer/1/output/dense"]),
])
def test_attach_targets_fullmatch_module_paths(targets, expected, tiny_bert):
  model = hf.load(tiny_bert.path, "classify", num_labels=2).model
  assert lora.attach(model, **{**_ATTACH, "targets_regex": targets}) == expected
  assert _adapted(model) == expected


@pytest.mark.parametrize("last_layers, expected_layers", [(0, [0, 1]), (1, [1]), (2, [0, 1]),
                                                         (5, [0, 1])])
def test_last_layers_keeps_only_the_targets_in_the_top_layers(last_layers, expected_layers,
                                                              tiny_bert):
  model = hf.load(tiny_bert.path, "classify", num_labels=2).model
  chosen = lora.attach(model, **_ATTACH, last_layers=last_layers)
  assert chosen == [f"encoder/layer/{i}/attention/self/{n}" for i in expected_layers
                    for n in ("query", "value")]
  assert _adapted(model) == chosen


def test_last_layers_leaves_modules_outside_the_stack_to_the_targets(tiny_bert):
  model = hf.load(tiny_bert.path, "classify", num_labels=2).model
  chosen = lora.attach(model, **{**_ATTACH, "targets_regex": r"pooler/dense|.*/query"},
                       last_layers=1)
  assert chosen == ["encoder/layer/1/attention/self/query", "pooler/dense"]


def test_negative_last_layers_is_a_config_error():
  config = _lora_config()
  config.lora.last_layers = -1
  with pytest.raises(UserError, match="last_layers must be >= 0"):
    config_lib.validate_lora(config)


@pytest.mark.parametrize("targets", [
    r".*/qkv",  # No such module.
    r"query",  # Matches inside a path, but fullmatch needs the whole path.
    r".*/attention/self",  # A module, but not a Linear.
])
def test_targets_that_match_no_linear_are_an_error(targets, tiny_bert):
  model = hf.load(tiny_bert.path, "classify", num_labels=2).model
  with pytest.raises(UserError, match="matches no Linear layer"):
    lora.attach(model, **{**_ATTACH, "targets_regex": targets})
  assert _adapted(model) == []


def test_lora_dropout_acts_only_in_training(tiny_bert):
  model = hf.load(tiny_bert.path, "classify", num_labels=2).model
  lora.attach(model, **{**_ATTACH, "dropout_rate": 0.5})
  _perturb(model, lambda p: p.endswith("lora_b"))
  batch = tiny_bert.batch()
  eval1, eval2 = _logits(model, batch), _logits(model, batch)
  train_logits = np.asarray(model(batch["input_ids"], batch["attention_mask"],
                                  batch["token_type_ids"], deterministic=False,
                                  rngs=nnx.Rngs(dropout=0)))
  np.testing.assert_array_equal(eval1, eval2)
  assert not np.allclose(train_logits, eval1, atol=TOL)


# --- exports of a LoRA model -------------------------------------------------

def _trained_lora_model(tiny, rules=()):
  """A LoRA model whose trainable params (adapters, head, ...) all hold perturbed values."""
  c = _lora_config(rules=rules)
  model = hf.load(tiny.path, "classify", num_labels=2).model
  trainable.with_adapters(model, c)
  heads = tasks.of(c).fresh_heads(tiny.config)
  trained = trainable.split(model, c, heads).assignment.trainable()
  _perturb(model, trained.__contains__)
  return c, model, trained


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_loads_in_transformers_with_the_same_logits(family, request, tmp_path):
  tiny = request.getfixturevalue(family)
  _, model, _ = _trained_lora_model(tiny)
  batch = tiny.batch()
  expected = _logits(model, batch)
  hf_config = hub.load_hf_config(tiny.path, num_labels=2)
  hf.export(lora.merge(model), hf_config, "classify", str(tmp_path), tokenizer_path=None)
  assert _adapted(model) == []
  assert not any("lora" in k for k in load_file(str(tmp_path / weights.SAFETENSORS)))
  loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  np.testing.assert_allclose(_torch_logits(loaded.eval(), batch), expected, atol=TOL, rtol=0)
  # The adapters matter: the base model alone computes something else.
  assert not np.allclose(tiny.torch_logits(batch), expected, atol=TOL)


# Per family: (rules training an inner module too, the modules_to_save they give).
_INNER = {
    "tiny_bert": ("encoder/layer/1/output/LayerNorm/.*", "classifier/.*",
                  ["bert.encoder.layer.1.output.LayerNorm", "classifier"]),
    "tiny_roberta": ("encoder/layer/1/output/LayerNorm/.*", "classifier/.*",
                     ["classifier", "roberta.encoder.layer.1.output.LayerNorm"]),
    "tiny_distilbert": ("transformer/layer/1/output_layer_norm/.*",
                        "(pre_classifier|classifier)/.*",
                        ["classifier", "distilbert.transformer.layer.1.output_layer_norm",
                         "pre_classifier"]),
}
_HEADS = {"tiny_bert": ["classifier"], "tiny_roberta": ["classifier"],
          "tiny_distilbert": ["classifier", "pre_classifier"]}


@pytest.mark.parametrize("rules", ["default", "inner_module"])
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_export_loads_with_peft_and_gives_the_same_logits(
    family, rules, request, tmp_path):
  tiny = request.getfixturevalue(family)
  if rules == "default":  # Adapters and the head train, the rest is frozen.
    user_rules, saved = (), _HEADS[family]
  else:
    inner, head, saved = _INNER[family]
    user_rules = ((inner, 1.0), (head, 1.0), (".*", None))
  c, model, trained = _trained_lora_model(tiny, rules=user_rules)
  batch = tiny.batch()
  expected = _logits(model, batch)
  hf_config = hub.load_hf_config(tiny.path, num_labels=2)
  task = tasks.of(c)
  peft_export.export_peft(model, hf_config, task.name, str(tmp_path), lora_config=c.lora,
                   trainable=trained, heads=task.fresh_heads(hf_config),
                   task_type=task.peft_task_type, base_model=tiny.path)
  assert (tmp_path / peft_export.PEFT_WEIGHTS).exists()
  config = json.loads((tmp_path / peft_export.PEFT_CONFIG).read_text())
  assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
  assert config["modules_to_save"] == saved
  assert len(config["target_modules"]) == 4
  base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny.path, num_labels=2)
  peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
  np.testing.assert_allclose(_torch_logits(peft_model, batch), expected, atol=TOL, rtol=0)


# --- end to end: train, then export both ways --------------------------------

def _real_batch(root, tokenizer_path):
  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
  rows = [json.loads(l) for l in (root / "test.jsonl").read_text().splitlines()][:8]
  enc = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=16,
            return_tensors="np")
  return {k: v.astype(np.int32) for k, v in enc.items()}


def test_lora_run_exports_merged_and_peft_equal_to_the_restored_model(tiny_setup, tmp_path):
  config = tiny_config(tiny_setup, num_steps=6)
  config.optim.lr = 1e-2
  config.lora.rank = 4
  workdir = str(tmp_path / "w")
  train.train(config, workdir)
  run = run_lib.open_run(config, workdir, config.model.path, run_lib.read_labels(workdir), quiet=True)
  run.checkpointer.close()
  model = run.model()
  modules = dict(lora.linear_modules(model))
  adapted = _adapted(model)
  assert adapted == [f"encoder/layer/{i}/attention/self/{n}" for i in range(2)
                     for n in ("query", "value")]
  assert all(np.any(np.asarray(modules[p].lora_b[...]) != 0) for p in adapted)  # Trained.
  batch = _real_batch(tiny_setup, config.model.path)
  assert batch["attention_mask"].min() == 0  # Some rows are padded.
  expected = _logits(model, batch)

  commands.export_command(workdir, str(tmp_path / "hf"), "hf")
  commands.export_command(workdir, str(tmp_path / "peft"), "peft")
  merged, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / "hf", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  np.testing.assert_allclose(_torch_logits(merged.eval(), batch), expected, atol=TOL, rtol=0)
  saved = json.loads((tmp_path / "peft" / peft_export.PEFT_CONFIG).read_text())
  assert saved["modules_to_save"] == ["classifier"]
  assert saved["base_model_name_or_path"] == config.model.path
  base = transformers.AutoModelForSequenceClassification.from_pretrained(
      config.model.path, num_labels=2)
  adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
  np.testing.assert_allclose(_torch_logits(adapter, batch), expected, atol=TOL, rtol=0)

  # The merged export is the pretrained model, bit for bit, except the adapted
  # kernels, which are the pretrained ones plus scale * (a @ b).
  pretrained = load_file(str(tiny_setup / "model" / weights.SAFETENSORS))
  exported = load_file(str(tmp_path / "hf" / weights.SAFETENSORS))
  scale = config.lora.alpha / config.lora.rank
  deltas = {f"{p.replace('/', '.')}.weight": scale * (
      np.asarray(modules[p].lora_a[...], np.float64)
      @ np.asarray(modules[p].lora_b[...], np.float64)).T for p in adapted}
  for key, value in pretrained.items():
    if key.endswith("position_ids"):  # A buffer, not exported.
      continue
    ours = exported[f"bert.{key}"]
    if key in deltas:
      assert np.max(np.abs(deltas[key])) > 1e-3, key  # The delta is not negligible.
      np.testing.assert_allclose(ours, value + deltas[key], atol=1e-6, rtol=0, err_msg=key)
    else:
      np.testing.assert_array_equal(ours, value, err_msg=key)
  assert {k for k in exported if not k.startswith("bert.")} == {
      "classifier.weight", "classifier.bias"}


def test_peft_export_of_a_run_without_lora_is_an_error(tiny_setup, tmp_path):
  train.train(tiny_config(tiny_setup, num_steps=1), str(tmp_path / "w"))
  with pytest.raises(UserError, match="--format=peft needs a LoRA run"):
    commands.export_command(str(tmp_path / "w"), str(tmp_path / "out"), "peft")
  assert not (tmp_path / "out").exists()
