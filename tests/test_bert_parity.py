"""jaxft BERT/RoBERTa logits vs transformers' PyTorch models, and the model contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.formats import hf

TOL = 1e-4


def _logits(model, batch, **kwargs) -> np.ndarray:
  return np.asarray(model(jnp.asarray(batch["input_ids"]),
                          jnp.asarray(batch["attention_mask"]),
                          None if "token_type_ids" not in batch
                          else jnp.asarray(batch["token_type_ids"]), **kwargs))


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_tiny_random_logits_match_torch(kind, tiny_bert, tiny_roberta,
                                        tiny_distilbert):
  ckpt = {"bert": tiny_bert, "roberta": tiny_roberta,
          "distilbert": tiny_distilbert}[kind]
  loaded = hf.load(ckpt.path, "classify", num_labels=2)
  assert loaded.report.missing == [] and loaded.report.unexpected == []
  batch = ckpt.batch()
  assert batch["attention_mask"].min() == 0  # padding is exercised
  ours = _logits(loaded.model, batch)
  assert ours.shape == (3, 2) and ours.dtype == np.float32
  assert _max_diff(ours, ckpt.torch_logits(batch)) <= TOL


def test_roberta_left_padding_matches_torch(tiny_roberta):
  # With left padding, RoBERTa's pad-skipping positions differ from a plain
  # arange for every real token; right padding alone would not catch that.
  batch = tiny_roberta.batch()
  ids, mask = batch["input_ids"], batch["attention_mask"]
  left = {"input_ids": np.stack([np.roll(r, -int(m.sum())) for r, m in zip(ids, mask)]),
          "attention_mask": np.stack([np.roll(m, -int(m.sum())) for m in mask])}
  model = hf.load(tiny_roberta.path, "classify", num_labels=2).model
  assert _max_diff(_logits(model, left), tiny_roberta.torch_logits(left)) <= TOL


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_other_hidden_act_matches_torch(act, make_tiny_checkpoint):
  ckpt = make_tiny_checkpoint("bert", seed=1, hidden_act=act)
  model = hf.load(ckpt.path, "classify", num_labels=2).model
  batch = ckpt.batch(seed=1)
  assert _max_diff(_logits(model, batch), ckpt.torch_logits(batch)) <= TOL


def test_minilm_logits_match_torch(minilm_path, tmp_path):
  import torch
  import transformers
  torch.manual_seed(0)
  ref = transformers.BertForSequenceClassification.from_pretrained(
      minilm_path, num_labels=2).eval()
  # HF's N(0, 0.02) head gives logits ~0.03, too small for an absolute
  # tolerance to mean much; a unit-scale head makes them O(1-10).
  with torch.no_grad():
    ref.classifier.weight.normal_(0.0, 1.0)
    ref.classifier.bias.normal_(0.0, 1.0)
  ref.save_pretrained(tmp_path)  # freezes the random head for both sides
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
  batch = dict(tokenizer(
      ["A quiet, moving film about memory.", "Terrible.",
       "The plot drags but the acting carries it to the end."],
      padding=True, return_tensors="np"))
  assert batch["attention_mask"].min() == 0
  with torch.no_grad():
    want = ref(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits
  assert np.abs(want.numpy()).max() > 1.0
  loaded = hf.load(str(tmp_path), "classify", num_labels=2)
  assert loaded.report.missing == []
  assert _max_diff(_logits(loaded.model, batch), want.numpy()) <= TOL


def test_param_paths_mirror_hf_module_names(tiny_bert, tiny_roberta,
                                            tiny_distilbert):
  def paths(ckpt):
    model = hf.load(ckpt.path, "classify", num_labels=2).model
    return {"/".join(map(str, p)) for p, _ in
            nnx.to_flat_state(nnx.state(model, nnx.Param))}

  bert = paths(tiny_bert)
  for p in ["embeddings/word_embeddings/embedding",
            "embeddings/position_embeddings/embedding",
            "embeddings/token_type_embeddings/embedding",
            "embeddings/LayerNorm/scale",
            "encoder/layer/1/attention/self/query/kernel",
            "encoder/layer/1/attention/output/dense/kernel",
            "encoder/layer/1/attention/output/LayerNorm/bias",
            "encoder/layer/1/intermediate/dense/kernel",
            "encoder/layer/1/output/dense/kernel",
            "pooler/dense/kernel", "classifier/kernel"]:
    assert p in bert
  # 5 embedding + 2 layers x 16 + 2 pooler + 2 classifier.
  assert len(bert) == 5 + 2 * 16 + 2 + 2
  roberta = paths(tiny_roberta)
  assert {"classifier/dense/kernel", "classifier/out_proj/kernel"} <= roberta
  assert not any(p.startswith("pooler") for p in roberta)
  distil = paths(tiny_distilbert)
  assert {"transformer/layer/1/attention/q_lin/kernel",
          "transformer/layer/1/sa_layer_norm/scale",
          "transformer/layer/1/ffn/lin2/kernel", "pre_classifier/kernel",
          "classifier/kernel"} <= distil


def test_dropout_uses_call_rngs_and_model_holds_no_rng_state(tiny_bert):
  model = hf.load(tiny_bert.path, "classify", num_labels=2).model
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert jax.tree_util.tree_leaves(rest) == []
  batch = {k: jnp.asarray(v) for k, v in tiny_bert.batch().items()}

  @jax.jit
  def train_logits(params, key):
    m = nnx.merge(graphdef, params)
    return m(batch["input_ids"], batch["attention_mask"],
             batch["token_type_ids"], deterministic=False,
             rngs=nnx.Rngs(dropout=key))

  a = train_logits(params, jax.random.key(0))
  b = train_logits(params, jax.random.key(0))
  c = train_logits(params, jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert _max_diff(a, c) > 1e-3
  assert _max_diff(a, _logits(model, tiny_bert.batch())) > 1e-3


def test_bf16_compute_keeps_fp32_params_and_logits(tiny_bert):
  loaded = hf.load(tiny_bert.path, "classify", num_labels=2,
                              dtype=jnp.bfloat16, param_dtype=jnp.float32)
  leaves = jax.tree_util.tree_leaves(nnx.state(loaded.model, nnx.Param))
  assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float32)}
  batch = tiny_bert.batch()
  ours = _logits(loaded.model, batch)
  assert ours.dtype == np.float32
  assert _max_diff(ours, tiny_bert.torch_logits(batch)) <= 0.1


def test_fully_padded_row_gives_finite_logits(tiny_bert):
  # Fixed-shape batches are filled with all-padding dummy rows.
  model = hf.load(tiny_bert.path, "classify", num_labels=2).model
  batch = tiny_bert.batch()
  batch["attention_mask"][-1] = 0
  assert np.isfinite(_logits(model, batch)).all()
