"""Checkpoint formats in and out: safetensors (sharded), msgpack, .bin, export."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxft.formats import hf
from jaxft.errors import UserError
from jaxft.formats import weights
from jaxft.formats import hub

TOL = 1e-4


def _logits(model, batch) -> np.ndarray:
  return np.asarray(model(jnp.asarray(batch["input_ids"]),
                          jnp.asarray(batch["attention_mask"]),
                          None if "token_type_ids" not in batch
                          else jnp.asarray(batch["token_type_ids"])))


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _state_dict(ckpt) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in ckpt.torch_model.state_dict().items()}


def _folder_with(tmp_path, ckpt, name="ckpt"):
  """A copy of ckpt's config.json in a fresh folder, without weights."""
  folder = tmp_path / name
  folder.mkdir()
  shutil.copy(os.path.join(ckpt.path, "config.json"), folder)
  return folder


def test_sharded_safetensors_load_equal(tiny_bert, tmp_path):
  tiny_bert.torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  sharded = hf.load(str(tmp_path), "classify", num_labels=2)
  single = hf.load(tiny_bert.path, "classify", num_labels=2)
  assert sharded.report.missing == [] and sharded.report.unexpected == []
  batch = tiny_bert.batch()
  np.testing.assert_array_equal(_logits(sharded.model, batch),
                                _logits(single.model, batch))


def test_prefixless_checkpoint_reports_only_the_head_missing(minilm_path):
  loaded = hf.load(minilm_path, "classify", num_labels=3)
  assert loaded.report.missing == ["classifier/bias", "classifier/kernel"]
  assert loaded.report.unexpected == []  # position_ids buffer is ignored
  assert loaded.hf_config.num_labels == 3 and loaded.path == minilm_path
  weight = load_file(os.path.join(minilm_path, "model.safetensors"))[
      "encoder.layer.2.attention.self.query.weight"]
  kernel = loaded.model.encoder.layer[2].attention.self.query.kernel[...]
  np.testing.assert_array_equal(np.asarray(kernel), weight.T)


def test_a_missing_head_gets_the_seeds_init_and_every_variable_is_concrete(minilm_path):
  from flax import nnx
  loaded = hf.load(minilm_path, "classify", num_labels=3, seed=7)
  built = hf.build_model(loaded.hf_config, "classify", seed=7)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(np.asarray(getattr(loaded.model.classifier, name)[...]),
                               np.asarray(getattr(built.classifier, name)[...]), atol=1e-7)
  other = hf.load(minilm_path, "classify", num_labels=3, seed=8).model.classifier.kernel[...]
  assert not np.allclose(np.asarray(other), np.asarray(built.classifier.kernel[...]))
  # Every variable is a concrete array on the device: nothing was left abstract.
  leaves = jax.tree.leaves(nnx.state(loaded.model))
  assert leaves and all(isinstance(x, jax.Array) for x in leaves)


def test_unexpected_key_is_reported(tiny_bert, tmp_path):
  folder = _folder_with(tmp_path, tiny_bert)
  tensors = _state_dict(tiny_bert)
  tensors["cls.predictions.bias"] = np.zeros(100, np.float32)
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
  report = hf.load(str(folder), "classify", num_labels=2).report
  assert report.unexpected == ["cls.predictions.bias"]
  assert report.missing == []


def _to_flax_layout(state_dict):
  """Torch names/layout -> nested Flax params, converted independently of jaxft."""
  tree = {}
  for key, value in state_dict.items():
    *modules, leaf = key.split(".")
    if leaf == "weight" and modules[-1] == "LayerNorm":
      leaf = "scale"
    elif leaf == "weight" and modules[-1].endswith("embeddings"):
      leaf = "embedding"
    elif leaf == "weight":
      leaf, value = "kernel", value.T
    node = tree
    for m in modules:
      node = node.setdefault(m, {})
    node[leaf] = np.ascontiguousarray(value)
  return tree


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_flax_msgpack_loads_same_logits(kind, tiny_bert, tiny_roberta, tmp_path):
  from flax import serialization
  ckpt = {"bert": tiny_bert, "roberta": tiny_roberta}[kind]
  folder = _folder_with(tmp_path, ckpt)
  (folder / "flax_model.msgpack").write_bytes(
      serialization.msgpack_serialize(_to_flax_layout(_state_dict(ckpt))))
  loaded = hf.load(str(folder), "classify", num_labels=2)
  assert loaded.report.missing == [] and loaded.report.unexpected == []
  batch = ckpt.batch()
  assert _max_diff(_logits(loaded.model, batch), ckpt.torch_logits(batch)) <= TOL


def test_pickle_only_with_opt_in(tiny_bert, tmp_path):
  import torch
  folder = _folder_with(tmp_path, tiny_bert)
  torch.save(tiny_bert.torch_model.state_dict(), folder / "pytorch_model.bin")
  with pytest.raises(UserError, match=r"config\.model\.allow_pickle=True"):
    hf.load(str(folder), "classify", num_labels=2)
  loaded = hf.load(str(folder), "classify", num_labels=2, allow_pickle=True)
  assert loaded.report.missing == [] and loaded.report.unexpected == []
  batch = tiny_bert.batch()
  assert _max_diff(_logits(loaded.model, batch),
                   tiny_bert.torch_logits(batch)) <= TOL


def test_shape_mismatch_names_key_and_shapes(tiny_bert, tmp_path):
  folder = _folder_with(tmp_path, tiny_bert)
  tensors = _state_dict(tiny_bert)
  tensors["bert.pooler.dense.weight"] = np.zeros((31, 32), np.float32)
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(UserError) as err:
    hf.load(str(folder), "classify", num_labels=2)
  assert "bert.pooler.dense.weight" in str(err.value)
  assert "(31, 32)" in str(err.value) and "(32, 32)" in str(err.value)
  # A head trained for another label count is a mismatch too, not a reinit.
  with pytest.raises(UserError, match="classifier"):
    hf.load(tiny_bert.path, "classify", num_labels=3)


def test_missing_folder(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    hf.load(str(tmp_path / "nope"), "classify", num_labels=2)


def test_folder_without_weights(tiny_bert, tmp_path):
  folder = _folder_with(tmp_path, tiny_bert)
  with pytest.raises(UserError, match="No weights found"):
    hf.load(str(folder), "classify", num_labels=2)


@pytest.mark.parametrize("model_type", ["gpt2", "no_such_model"])
def test_unknown_model_type(model_type, tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
  with pytest.raises(UserError, match=model_type):
    hf.load(str(tmp_path), "classify", num_labels=2)
  if model_type == "gpt2":  # known to transformers, not to jaxft
    with pytest.raises(UserError, match=r"supports: .*bert.*roberta"):
      hf.build_model(hub.load_hf_config(str(tmp_path)), "classify")


def test_id2label_sets_label2id(minilm_path):
  config = hub.load_hf_config(minilm_path, id2label={0: "neg", 1: "pos"})
  assert config.num_labels == 2
  assert config.label2id == {"neg": 0, "pos": 1}
  with pytest.raises(UserError, match="num_labels=3"):
    hub.load_hf_config(minilm_path, num_labels=3, id2label={0: "neg", 1: "pos"})


def _load_exported(out):
  import transformers
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert all(not v for v in info.values()), info
  return model.eval()


def test_export_round_trip_minilm(minilm_path, tmp_path):
  import torch
  import transformers
  labels = {0: "neg", 1: "neutral", 2: "pos"}
  loaded = hf.load(minilm_path, "classify", num_labels=3, id2label=labels)
  out = str(tmp_path / "export")
  hf.export(loaded.model, loaded.hf_config, "classify", out,
                       tokenizer_path=minilm_path)
  model = _load_exported(out)
  assert type(model).__name__ == "BertForSequenceClassification"
  assert model.config.architectures == ["BertForSequenceClassification"]
  assert model.config.num_labels == 3 and model.config.id2label == labels
  assert model.config.label2id == {v: k for k, v in labels.items()}
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  batch = dict(tokenizer(["Great fun.", "Not my kind of movie at all."],
                         padding=True, return_tensors="np"))
  with torch.no_grad():
    theirs = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits
  assert _max_diff(_logits(loaded.model, batch), theirs.numpy()) <= TOL


@pytest.mark.parametrize("kind, body_key, head_key", [
    ("roberta", "roberta.encoder.layer.0.attention.self.query.weight",
     "classifier.out_proj.weight"),
    ("distilbert", "distilbert.transformer.layer.0.sa_layer_norm.weight",
     "pre_classifier.weight"),
])
def test_export_round_trip_tiny(kind, body_key, head_key, tiny_roberta,
                                tiny_distilbert, tmp_path):
  import torch
  ckpt = {"roberta": tiny_roberta, "distilbert": tiny_distilbert}[kind]
  loaded = hf.load(ckpt.path, "classify", num_labels=2)
  out = str(tmp_path / "export")
  hf.export(loaded.model, loaded.hf_config, "classify", out, tokenizer_path=None)
  keys = set(load_file(os.path.join(out, "model.safetensors")))
  assert {body_key, head_key} <= keys
  model = _load_exported(out)
  arch = {"roberta": "RobertaForSequenceClassification",
          "distilbert": "DistilBertForSequenceClassification"}[kind]
  assert type(model).__name__ == arch and model.config.architectures == [arch]
  batch = ckpt.batch()
  with torch.no_grad():
    theirs = model(**{k: torch.from_numpy(v.astype(np.int64))
                      for k, v in batch.items()}).logits
  assert _max_diff(_logits(loaded.model, batch), theirs.numpy()) <= TOL


def test_hub_id_downloads_safe_files_only(monkeypatch, tmp_path):
  import huggingface_hub
  calls = []

  def fake_snapshot_download(repo_id, **kwargs):
    calls.append((repo_id, kwargs))
    return str(tmp_path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  assert hub.resolve_path("org/model") == str(tmp_path)
  assert hub.resolve_path("org/model", allow_pickle=True) == str(tmp_path)
  assert hub.resolve_path("org/model", weights=False) == str(tmp_path)
  (_, safe), (_, pickled), (_, no_weights) = calls
  assert "*.bin" not in safe["allow_patterns"] and "*.safetensors" in safe["allow_patterns"]
  assert "*.bin" in pickled["allow_patterns"]
  # jaxft inspect reads config and tokenizer only.
  assert {"*.json", "tokenizer*"} <= set(no_weights["allow_patterns"])
  assert not {"*.safetensors", "*.bin", weights.FLAX_MSGPACK} & set(no_weights["allow_patterns"])
