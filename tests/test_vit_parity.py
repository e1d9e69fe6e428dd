"""jaxft ViT logits vs transformers' PyTorch ViT, checkpoint loading and export."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from jaxft.formats import hf
from jaxft.errors import UserError
from jaxft.models import layers
from jaxft.models import vit
from jaxft.formats import weights

TOL = 1e-4
TINY_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=37, num_labels=3,
                num_channels=3)


@dataclasses.dataclass
class TinyViT:
  """A tiny random, perturbed transformers ViT saved to `path`, plus the live model."""
  path: str
  torch_model: Any
  config: transformers.ViTConfig

  def pixels(self, height: int | None = None, width: int | None = None,
             batch: int = 2, seed: int = 0) -> np.ndarray:
    """Random NCHW float32 pixels (transformers' layout)."""
    h, w = layers.pair(self.config.image_size)
    rng = np.random.default_rng(seed)
    return rng.standard_normal(
        (batch, self.config.num_channels, height or h, width or w)).astype(np.float32)

  def torch_out(self, nchw: np.ndarray, **kwargs) -> Any:
    with torch.no_grad():
      return self.torch_model(torch.from_numpy(nchw), **kwargs)


def _perturb(model: Any, seed: int) -> None:
  # HF init sets LayerNorm to (1, 0) and biases to 0, which would hide a
  # scale/bias mix-up or a dropped bias; give every tensor distinct values.
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def make_tiny_vit(tmp_path_factory):
  """Factory: make_tiny_vit(base=False, seed=0, **config_overrides).

  base=True saves a `ViTModel` (no classifier, with pooler) instead.
  """
  def make(base: bool = False, seed: int = 0, add_pooling_layer: bool = True,
           **overrides) -> TinyViT:
    config = transformers.ViTConfig(**{**TINY_VIT, **overrides})
    torch.manual_seed(seed)
    model = (transformers.ViTModel(config, add_pooling_layer=add_pooling_layer)
             if base else transformers.ViTForImageClassification(config))
    _perturb(model, seed)
    model.eval()
    path = tmp_path_factory.mktemp("tiny_vit")
    model.save_pretrained(path)
    return TinyViT(str(path), model, config)

  return make


@pytest.fixture(scope="module")
def tiny_vit(make_tiny_vit) -> TinyViT:
  return make_tiny_vit()


def _nhwc(nchw: np.ndarray) -> jax.Array:
  return jnp.asarray(nchw.transpose(0, 2, 3, 1))


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _logits(model, nchw, **kwargs) -> np.ndarray:
  return np.asarray(model(_nhwc(nchw), **kwargs))


@pytest.mark.parametrize("overrides", [
    {}, {"num_channels": 1}, {"qkv_bias": False}, {"image_size": [32, 48]},
    {"hidden_act": "gelu_new", "layer_norm_eps": 1e-6}],
    ids=["rgb", "grey", "no-qkv-bias", "non-square", "gelu-new"])
def test_tiny_random_logits_match_torch(overrides, make_tiny_vit, tiny_vit):
  ckpt = make_tiny_vit(**overrides) if overrides else tiny_vit
  loaded = hf.load(ckpt.path, "image_classify", num_labels=3)
  assert loaded.report.missing == [] and loaded.report.unexpected == []
  pixels = ckpt.pixels()
  ours = _logits(loaded.model, pixels)
  want = ckpt.torch_out(pixels).logits.numpy()
  assert ours.shape == (2, 3) and ours.dtype == np.float32
  assert np.abs(want).max() > 0.5  # perturbed: logits are not all ~0
  assert _max_diff(ours, want) <= TOL


@pytest.mark.parametrize("size", [(48, 48), (24, 24), (40, 56), (16, 32)])
def test_interpolated_position_embeddings_match_torch(size, tiny_vit):
  model = hf.load(tiny_vit.path, "image_classify", num_labels=3).model
  pixels = tiny_vit.pixels(*size, seed=1)
  want = tiny_vit.torch_out(pixels, interpolate_pos_encoding=True).logits.numpy()
  ours = _logits(model, pixels, interpolate_pos_encoding=True)
  assert _max_diff(ours, want) <= TOL


def test_interpolation_is_a_no_op_at_the_config_size(tiny_vit):
  model = hf.load(tiny_vit.path, "image_classify", num_labels=3).model
  pixels = tiny_vit.pixels()
  np.testing.assert_array_equal(_logits(model, pixels),
                                _logits(model, pixels, interpolate_pos_encoding=True))


def test_other_size_without_interpolation_is_a_user_error(tiny_vit):
  model = hf.load(tiny_vit.path, "image_classify", num_labels=3).model
  with pytest.raises(UserError, match="interpolate_pos_encoding"):
    model(_nhwc(tiny_vit.pixels(48, 48)))


def test_nchw_input_is_a_user_error_with_a_hint(tiny_vit):
  model = hf.load(tiny_vit.path, "image_classify", num_labels=3).model
  with pytest.raises(UserError, match="channels-last"):
    model(jnp.asarray(tiny_vit.pixels()))


@pytest.mark.parametrize("sizes", [((4, 4), (6, 6)), ((4, 4), (3, 5)),
                                   ((14, 14), (24, 24)), ((24, 24), (14, 14)),
                                   ((5, 3), (13, 2)), ((4, 4), (1, 1))])
def test_bicubic_resize_matches_torch_interpolate(sizes):
  (h, w), (out_h, out_w) = sizes
  grid = np.random.default_rng(0).standard_normal((h, w, 8)).astype(np.float32)
  want = torch.nn.functional.interpolate(
      torch.from_numpy(grid).permute(2, 0, 1)[None], size=(out_h, out_w),
      mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
  assert _max_diff(vit.resize_bicubic(jnp.asarray(grid), (out_h, out_w)), want) <= 1e-5
  # jax.image.resize's cubic (a=-0.5, edge renormalisation) is a different
  # function, which is why jaxft carries its own.
  other = jax.image.resize(jnp.asarray(grid), (out_h, out_w, 8), "cubic")
  assert _max_diff(other, want) > 1e-2


def test_export_loads_in_transformers_with_same_logits(tiny_vit, tmp_path):
  loaded = hf.load(tiny_vit.path, "image_classify", num_labels=3)
  processor = {"image_processor_type": "ViTImageProcessor",
               "size": {"height": 32, "width": 32}}
  (tmp_path / hf.PREPROCESSOR_CONFIG).write_text(json.dumps(processor))
  out = tmp_path / "export"
  hf.export(loaded.model, loaded.hf_config, "image_classify", str(out),
                             processor_path=str(tmp_path))
  assert json.loads((out / hf.PREPROCESSOR_CONFIG).read_text()) == processor
  with safe_open(str(out / weights.SAFETENSORS), "np") as ours, \
       safe_open(os.path.join(tiny_vit.path, weights.SAFETENSORS), "np") as theirs:
    assert set(ours.keys()) == set(theirs.keys())
    for key in theirs.keys():  # names, layouts (OIHW conv) and values round-trip
      np.testing.assert_array_equal(ours.get_tensor(key), theirs.get_tensor(key))
  model, info = transformers.AutoModelForImageClassification.from_pretrained(
      str(out), output_loading_info=True)
  assert type(model).__name__ == "ViTForImageClassification"
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert not info["mismatched_keys"]
  pixels = tiny_vit.pixels(seed=2)
  with torch.no_grad():
    exported = model.eval()(torch.from_numpy(pixels)).logits.numpy()
  assert _max_diff(exported, _logits(loaded.model, pixels)) <= TOL
  assert _max_diff(exported, tiny_vit.torch_out(pixels).logits.numpy()) <= 1e-6


@pytest.mark.parametrize("pooler", [True, False])
def test_base_model_checkpoint_loads_with_fresh_head(pooler, make_tiny_vit):
  ckpt = make_tiny_vit(base=True, add_pooling_layer=pooler)
  loaded = hf.load(ckpt.path, "image_classify", num_labels=5)
  assert sorted(loaded.report.missing) == ["classifier/bias", "classifier/kernel"]
  assert loaded.report.unexpected == (
      ["pooler.dense.bias", "pooler.dense.weight"] if pooler else [])
  pixels = ckpt.pixels()
  hidden = loaded.model.encode(_nhwc(pixels))
  want = ckpt.torch_out(pixels).last_hidden_state.numpy()
  assert _max_diff(hidden, want) <= TOL
  assert _logits(loaded.model, pixels).shape == (2, 5)


def test_param_paths_mirror_hf_module_names(tiny_vit):
  model = hf.load(tiny_vit.path, "image_classify", num_labels=3).model
  state = nnx.state(model, nnx.Param)
  shapes = {"/".join(map(str, p)): v.get_value().shape
            for p, v in nnx.to_flat_state(state)}
  assert shapes["embeddings/cls_token"] == (1, 1, 32)
  assert shapes["embeddings/position_embeddings"] == (1, 17, 32)
  assert shapes["embeddings/patch_embeddings/projection/kernel"] == (8, 8, 3, 32)
  for p in ["embeddings/patch_embeddings/projection/bias",
            "encoder/layer/1/attention/attention/query/kernel",
            "encoder/layer/1/attention/attention/value/bias",
            "encoder/layer/1/attention/output/dense/kernel",
            "encoder/layer/1/intermediate/dense/kernel",
            "encoder/layer/1/output/dense/kernel",
            "encoder/layer/1/layernorm_before/scale",
            "encoder/layer/1/layernorm_after/bias",
            "layernorm/scale", "classifier/kernel"]:
    assert p in shapes
  # 4 embedding + 2 layers x 16 + 2 layernorm + 2 classifier.
  assert len(shapes) == 4 + 2 * 16 + 2 + 2
  axes = {"/".join(map(str, p)): v.get_metadata()["logical_axes"]
          for p, v in nnx.to_flat_state(state)}
  assert axes["encoder/layer/0/attention/attention/query/kernel"] == ("embed", "heads")
  assert axes["encoder/layer/0/intermediate/dense/kernel"] == ("embed", "mlp")
  assert axes["embeddings/patch_embeddings/projection/kernel"][-1] == "embed"


def test_dropout_uses_call_rngs_and_model_holds_no_rng_state(make_tiny_vit):
  ckpt = make_tiny_vit(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  model = hf.load(ckpt.path, "image_classify", num_labels=3).model
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert jax.tree_util.tree_leaves(rest) == []
  pixels = _nhwc(ckpt.pixels())

  @jax.jit
  def train_logits(params, key):
    return nnx.merge(graphdef, params)(pixels, deterministic=False,
                                       rngs=nnx.Rngs(dropout=key))

  a = train_logits(params, jax.random.key(0))
  np.testing.assert_array_equal(a, train_logits(params, jax.random.key(0)))
  assert _max_diff(a, train_logits(params, jax.random.key(1))) > 1e-3
  eval_logits = np.asarray(model(pixels))
  assert _max_diff(a, eval_logits) > 1e-3
  assert _max_diff(eval_logits, ckpt.torch_out(ckpt.pixels()).logits.numpy()) <= TOL


def test_bf16_compute_keeps_fp32_params_and_logits(tiny_vit):
  loaded = hf.load(tiny_vit.path, "image_classify", num_labels=3,
                                    dtype=jnp.bfloat16, param_dtype=jnp.float32)
  leaves = jax.tree_util.tree_leaves(nnx.state(loaded.model, nnx.Param))
  assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float32)}
  pixels = tiny_vit.pixels()
  ours = _logits(loaded.model, pixels, interpolate_pos_encoding=False)
  assert ours.dtype == np.float32
  assert _max_diff(ours, tiny_vit.torch_out(pixels).logits.numpy()) <= 0.1
