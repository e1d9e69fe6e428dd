"""ResNet with an image-classification head in Flax NNX, as transformers'
`ResNetForImageClassification`.

The modules mirror the module names of transformers' ResNet checkpoints, so
parameter paths read like them without the `resnet.` prefix:
`embedder/embedder/convolution/kernel`, `embedder/embedder/normalization/scale`,
`encoder/stages/0/layers/0/layer/1/convolution/kernel`,
`encoder/stages/1/layers/0/shortcut/normalization/bias`, `classifier/kernel`
(transformers' `classifier.1.weight`: its head is `Sequential(Flatten, Linear)`).
Every BatchNorm also holds `nnx.BatchStat`s `mean`, `var` and `count` (torch's
`running_mean`, `running_var`, `num_batches_tracked`), which load and export
with the weights.

The call is ViT's, so the image task runs either unchanged:

  model(pixel_values, *, deterministic=True, rngs=None,
        interpolate_pos_encoding=False) -> float32 logits [batch, num_labels]

with `pixel_values` float [batch, height, width, num_channels] (transformers'
tensor is `pixel_values.transpose(0, 3, 1, 2)`). `deterministic=True` is
torch's `model.eval()`: BatchNorms normalise with their running statistics.
`deterministic=False` is `model.train()`: they normalise with the batch's and
move the running statistics in place (read them back with `nnx.state(model,
nnx.BatchStat)`). ResNet has no dropout, so `rngs` is unused, and a convnet
takes any image size, so `interpolate_pos_encoding` is accepted and ignored.

Initialisation follows transformers' `ResNetPreTrainedModel._init_weights`:
convs N(0, 2 / fan_out) (kaiming normal, fan_out, relu), BatchNorm scale 1,
bias 0, running statistics (0, 1, 0); the classifier as torch's `nn.Linear`
default, kernel and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import UserError
from jaxft.models import layers
from jaxft.models import naming

Array = jax.Array
Dtype = Any

LAYER_TYPES = ("basic", "bottleneck")
BOTTLENECK_REDUCTION = 4  # transformers' ResNetBottleNeckLayer default.


class ResNetConvLayer(nnx.Module):
  """`convolution` (no bias, padding kernel // 2), `normalization` (BatchNorm), activation."""

  def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3,
               stride: int = 1, activation: str | None = "relu", dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    self.convolution = layers.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
        use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.normalization = layers.BatchNorm(out_channels, dtype=dtype, param_dtype=param_dtype)
    self.activation = None if activation is None else layers.activation(activation)

  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    x = self.normalization(self.convolution(x), use_running_average=deterministic)
    return x if self.activation is None else self.activation(x)


class ResNetEmbeddings(nnx.Module):
  """The stem: `embedder` (7x7 stride-2 conv, BatchNorm, activation), then a 3x3 stride-2
  max pool."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.num_channels = config.num_channels
    self.embedder = ResNetConvLayer(
        config.num_channels, config.embedding_size, kernel_size=7, stride=2,
        activation=config.hidden_act, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixel_values: Array, *, deterministic: bool) -> Array:
    channels = pixel_values.shape[-1]
    if pixel_values.ndim != 4 or channels != self.num_channels:
      hint = (" pixel_values must be channels-last [batch, height, width, "
              "channels]; transformers' NCHW arrays need .transpose(0, 2, 3, 1)."
              if pixel_values.ndim == 4 and pixel_values.shape[1] == self.num_channels else "")
      raise UserError(f"pixel_values has shape {tuple(pixel_values.shape)}, not [batch, "
                      f"height, width, num_channels={self.num_channels}].{hint}")
    x = self.embedder(pixel_values, deterministic=deterministic)
    return layers.max_pool(x, kernel_size=3, stride=2, padding=1)


class ResNetShortCut(nnx.Module):
  """The residual's projection: 1x1 `convolution` (strided) and `normalization`, no activation."""

  def __init__(self, in_channels: int, out_channels: int, *, stride: int, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    self.convolution = layers.Conv2d(in_channels, out_channels, 1, stride=stride,
                                     use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                     rngs=rngs)
    self.normalization = layers.BatchNorm(out_channels, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    return self.normalization(self.convolution(x), use_running_average=deterministic)


def _shortcut(in_channels: int, out_channels: int, stride: int, **kw: Any
              ) -> ResNetShortCut | None:
  """A projection where the residual's shape changes; None (identity) otherwise."""
  if in_channels != out_channels or stride != 1:
    return ResNetShortCut(in_channels, out_channels, stride=stride, **kw)
  return None


class ResNetResidualLayer(nnx.Module):
  """activation(`layer`(x) + `shortcut`(x)): the shared body of both layer types.

  `layer` is the list of conv layers; their inner activations are always
  relu and the last has none, as transformers' (only the stem and the
  output activation follow `hidden_act`).
  """

  def __init__(self, convs: list[ResNetConvLayer], shortcut: ResNetShortCut | None,
               activation: str):
    self.shortcut = shortcut
    self.layer = nnx.List(convs)
    self.activation = layers.activation(activation)

  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    residual = x if self.shortcut is None else self.shortcut(x, deterministic=deterministic)
    for conv in self.layer:
      x = conv(x, deterministic=deterministic)
    return self.activation(x + residual)


class ResNetBasicLayer(ResNetResidualLayer):
  """Two 3x3 convs, the first strided."""

  def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1,
               activation: str = "relu", dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    super().__init__(
        [ResNetConvLayer(in_channels, out_channels, stride=stride, **kw),
         ResNetConvLayer(out_channels, out_channels, activation=None, **kw)],
        _shortcut(in_channels, out_channels, stride, **kw), activation)


class ResNetBottleNeckLayer(ResNetResidualLayer):
  """1x1 conv down to out / 4 channels, 3x3 conv, 1x1 conv up to out.

  The stride is on the 3x3 conv, or on the first 1x1 with `downsample_in_bottleneck`.
  """

  def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1,
               activation: str = "relu", downsample_in_bottleneck: bool = False,
               dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    reduced = out_channels // BOTTLENECK_REDUCTION
    super().__init__(
        [ResNetConvLayer(in_channels, reduced, kernel_size=1,
                         stride=stride if downsample_in_bottleneck else 1, **kw),
         ResNetConvLayer(reduced, reduced, stride=1 if downsample_in_bottleneck else stride,
                         **kw),
         ResNetConvLayer(reduced, out_channels, kernel_size=1, activation=None, **kw)],
        _shortcut(in_channels, out_channels, stride, **kw), activation)


def _layer_type(config: Any) -> str:
  if config.layer_type not in LAYER_TYPES:
    raise UserError(f"layer_type must be one of {LAYER_TYPES}, got {config.layer_type!r}.")
  return config.layer_type


def _stage_plan(config: Any) -> list[tuple[int, int, int, int]]:
  """(in_channels, out_channels, stride, depth) of each stage, as transformers' ResNetEncoder."""
  if not config.depths or len(config.depths) != len(config.hidden_sizes):
    raise UserError(f"depths {list(config.depths)} and hidden_sizes "
                    f"{list(config.hidden_sizes)} must be non-empty and of equal length.")
  ins = [config.embedding_size, *config.hidden_sizes[:-1]]
  strides = [2 if config.downsample_in_first_stage else 1] + [2] * (len(ins) - 1)
  return list(zip(ins, config.hidden_sizes, strides, config.depths))


class ResNetStage(nnx.Module):
  """`layers`: `depth` residual layers, the first changing channels and stride."""

  def __init__(self, config: Any, in_channels: int, out_channels: int, *, stride: int,
               depth: int, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw: dict[str, Any] = dict(activation=config.hidden_act, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
    if _layer_type(config) == "bottleneck":
      layer_class: Callable[..., ResNetResidualLayer] = ResNetBottleNeckLayer
      first_kw = dict(downsample_in_bottleneck=config.downsample_in_bottleneck)
    else:
      layer_class, first_kw = ResNetBasicLayer, {}
    # As transformers: only the first layer takes downsample_in_bottleneck.
    self.layers = nnx.List(
        [layer_class(in_channels, out_channels, stride=stride, **first_kw, **kw)]
        + [layer_class(out_channels, out_channels, **kw) for _ in range(depth - 1)])

  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    for layer in self.layers:
      x = layer(x, deterministic=deterministic)
    return x


class ResNetEncoder(nnx.Module):
  """`stages`: one ResNetStage per entry of `hidden_sizes`/`depths`."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.stages = nnx.List([
        ResNetStage(config, n_in, n_out, stride=stride, depth=depth, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)
        for n_in, n_out, stride, depth in _stage_plan(config)])

  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    for stage in self.stages:
      x = stage(x, deterministic=deterministic)
    return x


class ResNetModel(nnx.Module):
  """`embedder` and `encoder`, then global average pooling (transformers' `pooler`)."""

  def __init__(self, config: Any, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embedder = ResNetEmbeddings(config, **kw)
    self.encoder = ResNetEncoder(config, **kw)

  def encode(self, pixel_values: Array, *, deterministic: bool = True) -> Array:
    """NHWC pixels -> pooled features [batch, hidden_sizes[-1]]."""
    x = self.embedder(pixel_values, deterministic=deterministic)
    x = self.encoder(x, deterministic=deterministic)
    # Accumulated in float32: a bf16 sum over 7x7 positions loses bits.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)


class ResNetForImageClassification(ResNetModel):
  """ResNet + `classifier` linear on the pooled features, as transformers."""

  def __init__(self, config: Any, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if config.num_labels < 1:
      raise UserError(f"num_labels must be >= 1, got {config.num_labels}.")
    super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    n_in = config.hidden_sizes[-1]
    # torch's nn.Linear default init, which transformers keeps for ResNet:
    # kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as is the bias.
    bound = 1 / math.sqrt(n_in)
    self.classifier = layers.Linear(n_in, config.num_labels, dtype=dtype,
                                    param_dtype=param_dtype,
                                    kernel_init=layers.uniform_init(bound),
                                    axes=("channels", None), rngs=rngs)
    self.classifier.bias = layers.param(layers.uniform_init(bound), rngs,
                                        (config.num_labels,), param_dtype, (None,))

  def __call__(self, pixel_values: Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None, interpolate_pos_encoding: bool = False) -> Array:
    """NHWC pixels -> float32 logits [batch, num_labels].

    `rngs` (no dropout) and `interpolate_pos_encoding` (no position
    embeddings: any image size works) are accepted for ViT's signature.
    """
    del rngs, interpolate_pos_encoding
    pooled = self.encode(pixel_values, deterministic=deterministic)
    return self.classifier(pooled).astype(jnp.float32)


# --- FLOPs ---------------------------------------------------------------------

def _conv(size: tuple[int, int], c_in: int, c_out: int, kernel: int, stride: int
          ) -> tuple[tuple[int, int], int]:
  """Output (height, width) and FLOPs of a conv padded kernel // 2, as every ResNet conv."""
  h, w = ((n + 2 * (kernel // 2) - kernel) // stride + 1 for n in size)
  return (h, w), 2 * h * w * c_in * c_out * kernel * kernel


def _layer_convs(config: Any, c_in: int, c_out: int, stride: int
                 ) -> list[tuple[int, int, int, int]]:
  """(in, out, kernel, stride) of a residual layer's convs in order, shortcut aside."""
  if _layer_type(config) == "basic":
    return [(c_in, c_out, 3, stride), (c_out, c_out, 3, 1)]
  r = c_out // BOTTLENECK_REDUCTION
  first, middle = (stride, 1) if config.downsample_in_bottleneck else (1, stride)
  return [(c_in, r, 1, first), (r, r, 3, middle), (r, c_out, 1, 1)]


def flops_per_image(config: Any, height: int, width: int) -> int:
  """Forward FLOPs of one height x width image: 2 x the multiply-adds of the convs and classifier.

  BatchNorm, activations, pooling and residual adds (a few percent) are not
  counted, as in the usual ResNet FLOP counts (ResNet-50 at 224: 8.2 GFLOPs).
  """
  size, flops = _conv((height, width), config.num_channels, config.embedding_size, 7, 2)
  size = tuple((n + 2 - 3) // 2 + 1 for n in size)  # The stem's 3x3 stride-2 max pool.
  for n_in, n_out, stride, depth in _stage_plan(config):
    for i in range(depth):
      c_in, s = (n_in, stride) if i == 0 else (n_out, 1)
      if c_in != n_out or s != 1:  # The shortcut's 1x1 conv, on the layer's input.
        flops += _conv(size, c_in, n_out, 1, s)[1]
      for conv in _layer_convs(config, c_in, n_out, s):
        size, conv_flops = _conv(size, *conv)
        flops += conv_flops
  return flops + 2 * config.hidden_sizes[-1] * config.num_labels


# --- checkpoint names ------------------------------------------------------------
# Module names are our paths with `.` for `/`, e.g.
#   encoder/stages/0/layers/1/layer/0/convolution/kernel
#       <-> resnet.encoder.stages.0.layers.1.layer.0.convolution.weight  (OIHW <-> HWIO)
#   embedder/embedder/normalization/{scale,bias,mean,var,count}
#       <-> resnet.embedder.embedder.normalization.{weight,bias,running_mean,
#           running_var,num_batches_tracked}
#   classifier/kernel <-> classifier.1.weight  (head: never prefixed; index 0 is Flatten)
RESNET_TORCH_RULES: tuple[naming.NameRule, ...] = (
    naming.NameRule(r"(.*/convolution)/kernel", r"\1/weight", naming.CONV_HWIO),
    naming.NameRule(r"classifier/kernel", r"classifier/1/weight", naming.TRANSPOSE),
    naming.NameRule(r"classifier/bias", r"classifier/1/bias"),
) + naming.BATCH_NORM_RULES + naming.TORCH_RULES
RESNET_CHECKPOINT = naming.CheckpointLayout(
    prefix="resnet", head_modules=("classifier",),
    rules={"torch": RESNET_TORCH_RULES, "flax": naming.FLAX_RULES})
