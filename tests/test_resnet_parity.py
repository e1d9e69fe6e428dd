"""jaxft ResNet vs transformers' PyTorch ResNet: logits, BatchNorm statistics, load and export."""

from __future__ import annotations

import copy
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
from torch.utils import flop_counter

from jaxft.errors import UserError
from jaxft.formats import hf
from jaxft.models import layers
from jaxft.models import naming
from jaxft.models import resnet
from jaxft.tuning import param_paths

TOL = 1e-4
STAT_TOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ResNet-18-like (two basic layers in a stage, a strided stage with a shortcut)
# and ResNet-50-like (bottleneck, a shortcut in every stage's first layer).
BASIC = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type="basic",
             num_labels=3)
BOTTLENECK = dict(embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1],
                  layer_type="bottleneck", num_labels=3)
CONFIGS = {
    "basic": BASIC,
    "basic-grey-gelu-downsample-first": {**BASIC, "num_channels": 1, "hidden_act": "gelu",
                                         "downsample_in_first_stage": True},
    "bottleneck": BOTTLENECK,
    "bottleneck-downsample-in-bottleneck": {**BOTTLENECK, "downsample_in_bottleneck": True},
}


@dataclasses.dataclass
class TinyResNet:
  """A tiny random transformers ResNet (perturbed weights and statistics) saved to `path`."""
  path: str
  torch_model: Any
  config: transformers.ResNetConfig

  def pixels(self, batch: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    """Random NCHW float32 pixels (transformers' layout)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, self.config.num_channels, size, size)).astype(np.float32)

  def torch_logits(self, nchw: np.ndarray, model: Any = None) -> np.ndarray:
    with torch.no_grad():
      return (model or self.torch_model)(torch.from_numpy(nchw)).logits.numpy()


def _perturb(model: Any, seed: int) -> None:
  # HF init sets BatchNorm to (1, 0) with statistics (0, 1): eval mode would
  # then be a near no-op, hiding a mean/var or scale/bias mix-up.
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
        m.num_batches_tracked.fill_(int(torch.randint(0, 100, (), generator=gen)))


@pytest.fixture(scope="module")
def make_tiny_resnet(tmp_path_factory):
  """Factory: make_tiny_resnet(name) for a key of CONFIGS (cached per name)."""
  made: dict[str, TinyResNet] = {}

  def make(name: str) -> TinyResNet:
    if name not in made:
      config = transformers.ResNetConfig(**CONFIGS[name])
      torch.manual_seed(0)
      model = transformers.ResNetForImageClassification(config)
      _perturb(model, seed=1)
      model.eval()
      path = tmp_path_factory.mktemp("tiny_resnet")
      model.save_pretrained(path)
      made[name] = TinyResNet(str(path), model, config)
    return made[name]

  return make


def _nhwc(nchw: np.ndarray) -> jax.Array:
  return jnp.asarray(nchw.transpose(0, 2, 3, 1))


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _load(ckpt: TinyResNet) -> nnx.Module:
  loaded = hf.load(ckpt.path, "image_classify")
  assert loaded.report.missing == [] and loaded.report.unexpected == []
  return loaded.model


def _stats_diff(stats: nnx.State, torch_model: Any) -> float:
  """Max |ours - torch| over every BatchNorm statistic, matched by checkpoint name."""
  theirs = torch_model.state_dict()
  named = param_paths.named_variables(stats)
  assert len(named) == 3 * sum(isinstance(m, torch.nn.BatchNorm2d)
                               for m in torch_model.modules())
  worst = 0.0
  for path, var in named:
    key, _ = resnet.RESNET_CHECKPOINT.export_name(path)
    worst = max(worst, _max_diff(var.get_value(), theirs[key].numpy()))
  return worst


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_logits_match_torch(name, make_tiny_resnet):
  ckpt = make_tiny_resnet(name)
  model = _load(ckpt)
  pixels = ckpt.pixels()
  ours = np.asarray(model(_nhwc(pixels)))
  want = ckpt.torch_logits(pixels)
  assert ours.shape == (4, 3) and ours.dtype == np.float32
  assert np.abs(want).max() > 0.1  # Not all ~0.
  diff = _max_diff(ours, want)
  print(f"{name}: eval max |logit diff| {diff:.2e}")
  assert diff <= TOL


@pytest.mark.parametrize("name", ["basic", "bottleneck-downsample-in-bottleneck"])
def test_train_mode_logits_and_statistics_match_torch(name, make_tiny_resnet):
  ckpt = make_tiny_resnet(name)
  pixels = ckpt.pixels(seed=2)
  trained = copy.deepcopy(ckpt.torch_model).train()
  want = ckpt.torch_logits(pixels, trained)

  model = _load(ckpt)
  ours = model(_nhwc(pixels), deterministic=False)
  eager = (_max_diff(ours, want), _stats_diff(nnx.state(model, nnx.BatchStat), trained))

  graphdef, state = nnx.split(_load(ckpt))

  @jax.jit
  def forward(state, x):
    m = nnx.merge(graphdef, state)
    return m(x, deterministic=False), nnx.state(m, nnx.BatchStat)

  jit_logits, jit_stats = forward(state, _nhwc(pixels))
  jitted = (_max_diff(jit_logits, want), _stats_diff(jit_stats, trained))
  print(f"{name}: train max |logit diff|, |stat diff|: eager {eager}, jit {jitted}")
  assert eager[0] <= TOL and jitted[0] <= TOL
  assert eager[1] <= STAT_TOL and jitted[1] <= STAT_TOL


def test_statistics_come_out_of_grad_inside_jit(make_tiny_resnet):
  # As steps.loss_and_grads: the statistics, closed over by the loss, come from the
  # jit's trace; the model is merged (without copying) in the grad's.
  ckpt = make_tiny_resnet("bottleneck")
  pixels = ckpt.pixels(seed=5)
  trained = copy.deepcopy(ckpt.torch_model).train()
  ckpt.torch_logits(pixels, trained)
  graphdef, params, stats, rest = nnx.split(_load(ckpt), nnx.Param, nnx.BatchStat, ...)

  @jax.jit
  def loss_and_grads(params, stats, x):
    def loss_fn(p):
      model = nnx.merge(graphdef, p, rest, stats)
      return model(x, deterministic=False).sum(), nnx.state(model, nnx.BatchStat)
    (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, new_stats

  grads, new_stats = loss_and_grads(params, stats, _nhwc(pixels))
  assert _stats_diff(new_stats, trained) <= STAT_TOL
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["embedder"]["embedder"]["convolution"]["kernel"][...]).max()) > 0


def test_nnx_jit_threads_statistics_through_the_model(make_tiny_resnet):
  ckpt = make_tiny_resnet("basic")
  model = _load(ckpt)
  trained = copy.deepcopy(ckpt.torch_model).train()
  pixels = ckpt.pixels(seed=3)

  @nnx.jit
  def step(m, x):
    return m(x, deterministic=False)

  for _ in range(2):  # Two updates: the second starts from the first's statistics.
    step(model, _nhwc(pixels))
    ckpt.torch_logits(pixels, trained)
  assert _stats_diff(nnx.state(model, nnx.BatchStat), trained) <= STAT_TOL


def _batch_norms(model: nnx.Module) -> list[layers.BatchNorm]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, layers.BatchNorm)]


def test_frozen_batch_norm_uses_and_keeps_its_statistics(make_tiny_resnet):
  ckpt = make_tiny_resnet("bottleneck")
  model = _load(ckpt)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  for bn in _batch_norms(model):
    bn.frozen = True
  pixels = _nhwc(ckpt.pixels())
  train = model(pixels, deterministic=False)
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  np.testing.assert_array_equal(np.asarray(train), np.asarray(model(pixels)))
  assert _max_diff(train, ckpt.torch_logits(ckpt.pixels())) <= TOL


def test_batch_norm_matches_torch_over_steps():
  torch_bn = torch.nn.BatchNorm2d(5, momentum=0.3, eps=1e-3)
  ours = layers.BatchNorm(5, momentum=0.3, epsilon=1e-3, dtype=jnp.float32,
                          param_dtype=jnp.float32)
  with torch.no_grad():
    torch_bn.weight.copy_(torch.linspace(0.5, 1.5, 5))
    torch_bn.bias.copy_(torch.linspace(-1, 1, 5))
  ours.scale.set_value(jnp.linspace(0.5, 1.5, 5))
  ours.bias.set_value(jnp.linspace(-1, 1, 5))
  rng = np.random.default_rng(0)
  for _ in range(3):
    x = (rng.standard_normal((3, 5, 4, 6)) * 2 + 1).astype(np.float32)
    want = torch_bn.train()(torch.from_numpy(x)).detach().numpy()
    assert _max_diff(ours(jnp.asarray(x.transpose(0, 2, 3, 1)), use_running_average=False),
                     want.transpose(0, 2, 3, 1)) <= TOL
  assert _max_diff(ours.mean[...], torch_bn.running_mean) <= STAT_TOL
  assert _max_diff(ours.var[...], torch_bn.running_var) <= STAT_TOL
  assert int(ours.count[...]) == int(torch_bn.num_batches_tracked) == 3
  x = rng.standard_normal((2, 5, 3, 3)).astype(np.float32)
  want = torch_bn.eval()(torch.from_numpy(x)).detach().numpy()
  assert _max_diff(ours(jnp.asarray(x.transpose(0, 2, 3, 1)), use_running_average=True),
                   want.transpose(0, 2, 3, 1)) <= TOL


def test_export_round_trip_with_changed_statistics(make_tiny_resnet, tmp_path):
  ckpt = make_tiny_resnet("bottleneck")
  loaded = hf.load(ckpt.path, "image_classify")
  bn = loaded.model.encoder.stages[1].layers[0].shortcut.normalization
  bn.mean.set_value(bn.mean[...] + 0.5)
  bn.var.set_value(bn.var[...] * 2.0)
  bn.count.set_value(jnp.asarray(1234, jnp.int32))
  out = str(tmp_path / "out")
  hf.export(loaded.model, loaded.hf_config, "image_classify", out)

  key = "resnet.encoder.stages.1.layers.0.shortcut.normalization"
  with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
    assert f.get_tensor(f"{key}.num_batches_tracked").dtype == np.int64
    assert f.get_tensor(f"{key}.running_var").dtype == np.float32
  torch_model, info = transformers.AutoModelForImageClassification.from_pretrained(
      out, output_loading_info=True)
  assert isinstance(torch_model, transformers.ResNetForImageClassification)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  state = torch_model.state_dict()
  assert int(state[f"{key}.num_batches_tracked"]) == 1234
  np.testing.assert_allclose(state[f"{key}.running_mean"].numpy(), np.asarray(bn.mean[...]))
  pixels = ckpt.pixels(seed=4)
  want = ckpt.torch_logits(pixels, torch_model.eval())
  ours = np.asarray(loaded.model(_nhwc(pixels)))
  assert _max_diff(ours, ckpt.torch_logits(pixels)) > 1e-3  # The change shows.
  diff = _max_diff(ours, want)
  print(f"export round trip: max |logit diff| {diff:.2e}")
  assert diff <= TOL


def test_missing_statistics_are_initialised_and_reported(make_tiny_resnet, tmp_path):
  from safetensors.numpy import save_file
  ckpt = make_tiny_resnet("basic")
  with safe_open(os.path.join(ckpt.path, "model.safetensors"), "np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys() if "running_var" not in k}
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  ckpt.config.save_pretrained(tmp_path)
  loaded = hf.load(str(tmp_path), "image_classify")
  assert loaded.report.missing and all(p.endswith("/var") for p in loaded.report.missing)
  assert loaded.report.unexpected == []
  np.testing.assert_array_equal(
      np.asarray(loaded.model.embedder.embedder.normalization.var[...]), np.ones(8))


def test_float_statistic_as_a_count_is_a_user_error(make_tiny_resnet, tmp_path):
  from safetensors.numpy import save_file
  ckpt = make_tiny_resnet("basic")
  with safe_open(os.path.join(ckpt.path, "model.safetensors"), "np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  key = "resnet.embedder.embedder.normalization.num_batches_tracked"
  tensors[key] = tensors[key].astype(np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  ckpt.config.save_pretrained(tmp_path)
  with pytest.raises(UserError, match="takes integers"):
    hf.load(str(tmp_path), "image_classify")


def test_param_paths_mirror_transformers(make_tiny_resnet):
  model = _load(make_tiny_resnet("basic"))
  paths = {p for p, _ in param_paths.named_variables(nnx.state(model))}
  assert {"embedder/embedder/convolution/kernel", "embedder/embedder/normalization/scale",
          "encoder/stages/0/layers/1/layer/0/convolution/kernel",
          "encoder/stages/1/layers/0/shortcut/convolution/kernel",
          "encoder/stages/1/layers/0/shortcut/normalization/count",
          "classifier/kernel", "classifier/bias"} <= paths
  assert model.encoder.stages[0].layers[0].shortcut is None


def test_conv_transform_slices_like_the_whole_tensor():
  # Sharded loads read `their_index` of each device's slice: it must agree.
  oihw = np.arange(6 * 4 * 3 * 5, dtype=np.float32).reshape(6, 4, 3, 5)
  t = naming.CONV_HWIO
  hwio = t.to_ours(oihw)
  assert hwio.shape == t.our_shape(oihw.shape) == (3, 5, 4, 6)
  index = (slice(1, 3), slice(None), slice(0, 2), slice(3, 6))
  np.testing.assert_array_equal(hwio[index], t.to_ours(oihw[t.their_index(index)]))
  np.testing.assert_array_equal(t.to_theirs(hwio), oihw)


def test_nchw_input_is_a_user_error_with_a_hint(make_tiny_resnet):
  ckpt = make_tiny_resnet("basic")
  model = _load(ckpt)
  with pytest.raises(UserError, match="channels-last"):
    model(jnp.asarray(ckpt.pixels()))


def test_flops_per_image_hand_count():
  config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                     layer_type="basic", num_labels=3)
  stem = 2 * 16 * 16 * 8 * 3 * 7 * 7  # 32 -> 16; the max pool then 16 -> 8.
  stage0 = 2 * (2 * 8 * 8 * 8 * 8 * 9)  # Two 3x3 convs 8 -> 8 at 8x8, no shortcut.
  shortcut = 2 * 4 * 4 * 16 * 8  # 1x1 stride 2: 8x8 -> 4x4.
  stage1 = 2 * 4 * 4 * 16 * 8 * 9 + 2 * 4 * 4 * 16 * 16 * 9
  classifier = 2 * 16 * 3
  assert resnet.flops_per_image(config, 32, 32) == (
      stem + stage0 + shortcut + stage1 + classifier) == 864_352


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("size", [(32, 32), (28, 40)])
def test_flops_per_image_matches_torch_flop_counter(name, size):
  config = transformers.ResNetConfig(**CONFIGS[name])
  model = transformers.ResNetForImageClassification(config).eval()
  counter = flop_counter.FlopCounterMode(display=False)
  with counter, torch.no_grad():
    model(torch.zeros(1, config.num_channels, *size))
  assert resnet.flops_per_image(config, *size) == counter.get_total_flops()


def test_small_config_builds_and_runs_at_28x28():
  folder = os.path.join(ROOT, "configs", "resnet-small")
  config = transformers.AutoConfig.from_pretrained(folder)
  assert config.model_type == "resnet" and config.num_labels == 2
  with open(os.path.join(folder, "preprocessor_config.json"), encoding="utf-8") as f:
    assert json.load(f)["size"] == {"height": 28, "width": 28}
  model = hf.init_model(config, "image_classify").model
  logits = model(jnp.zeros((2, 28, 28, 1)), deterministic=False)
  assert logits.shape == (2, 2) and np.isfinite(np.asarray(logits)).all()
