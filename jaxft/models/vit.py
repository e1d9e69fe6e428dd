"""Vision Transformer (ViT) encoder with an image-classification head, in Flax NNX.

The modules mirror the module names of transformers' ViT checkpoints (the
names `save_pretrained` writes and the hub holds), so parameter paths read like
them without the `vit.` prefix: `embeddings/cls_token`,
`embeddings/patch_embeddings/projection/kernel`,
`encoder/layer/3/attention/attention/query/kernel`, `layernorm/scale`,
`classifier/kernel`. Regex rules in configs are written against these paths.

Images are channels-last (the JAX convention), unlike transformers' NCHW:

  model(pixel_values, *, deterministic=True, rngs=None,
        interpolate_pos_encoding=False) -> float32 logits [batch, num_labels]

with `pixel_values` float [batch, height, width, num_channels], already
normalised as the checkpoint's image processor does (transformers' tensor is
`pixel_values.transpose(0, 3, 1, 2)`). Dropout randomness comes only from
`rngs` at call time.

At a resolution other than config.image_size, `interpolate_pos_encoding=True`
resizes the learned patch position grid bicubically, exactly as transformers'
`ViTEmbeddings.interpolate_pos_encoding` (torch's `F.interpolate(mode="bicubic",
align_corners=False)`), so fine-tuning at a new resolution starts from the
same function PyTorch computes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import sharding
from jaxft.errors import UserError
from jaxft.models import attention
from jaxft.models import bert
from jaxft.models import dropout
from jaxft.models import layers
from jaxft.models import naming
from jaxft.models import stack

Array = jax.Array
Dtype = Any


def _layer_norm(config: Any, *, dtype: Dtype,
                param_dtype: Dtype) -> layers.LayerNorm:
  return layers.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                          dtype=dtype, param_dtype=param_dtype, axes=("embed",))


# --- bicubic resizing as PyTorch does it -------------------------------------

def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2.

  a = -0.75 is PyTorch's (and OpenCV's) choice; jax.image.resize uses -0.5.
  """
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float32 matrix M with M @ x == torch's 1-D bicubic resize.

  Matches `torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False)` given an output `size` (no antialiasing): source
  coordinate (i + 0.5) * in/out - 0.5, unclamped, 4 taps with a = -0.75, taps
  outside the input replaced by the nearest edge sample.
  """
  scale = in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.minimum(np.floor(src), in_size - 1)
  t = np.clip(src - base, 0.0, 1.0)
  weights = _cubic_weights(t)
  taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :],
                 0, in_size - 1)
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()),
            weights.ravel())
  return matrix.astype(np.float32)


def resize_bicubic(grid: Array, size: tuple[int, int]) -> Array:
  """[h, w, ...] -> [size[0], size[1], ...], bicubic as torch (align_corners=False).

  Separable: a row matrix then a column matrix, computed in float32.
  """
  rows = jnp.asarray(bicubic_matrix(grid.shape[0], size[0]))
  cols = jnp.asarray(bicubic_matrix(grid.shape[1], size[1]))
  grid = grid.astype(jnp.float32)
  out = jnp.einsum("ih,hw...->iw...", rows, grid,
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("jw,iw...->ij...", cols, out,
                    precision=jax.lax.Precision.HIGHEST)


# --- modules -----------------------------------------------------------------

class PatchProjection(nnx.Module):
  """The params of transformers' patch Conv2d: `kernel` [ph, pw, in, out], `bias`."""

  def __init__(self, patch_size: tuple[int, int], in_channels: int,
               features: int, *, init: layers.Initializer, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.kernel = layers.param(init, rngs, (*patch_size, in_channels, features),
                                param_dtype, (None, None, None, "embed"))
    self.bias = layers.param(nnx.initializers.zeros, None, (features,),
                              param_dtype, ("embed",))


class ViTPatchEmbeddings(nnx.Module):
  """`projection`: the patch_size-strided conv, as a patchify + matmul.

  `projection/kernel` is [patch_h, patch_w, num_channels, hidden] (Flax's HWIO
  conv layout; PyTorch's OIHW weight is converted on load and export).
  """

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.patch_size = layers.pair(config.patch_size)
    self.num_channels = config.num_channels
    self.dtype = dtype
    self.projection = PatchProjection(
        self.patch_size, config.num_channels, config.hidden_size,
        init=layers.normal_init(config.initializer_range),
        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixel_values: Array) -> Array:
    """[batch, height, width, channels] -> [batch, grid_h * grid_w, hidden].

    Rows/columns past the last whole patch are dropped, as a strided conv does.
    """
    batch, height, width, channels = pixel_values.shape
    if channels != self.num_channels:
      hint = (" pixel_values must be channels-last [batch, height, width, "
              "channels]; transformers' NCHW arrays need .transpose(0, 2, 3, 1)."
              if pixel_values.shape[1] == self.num_channels else "")
      raise UserError(f"pixel_values has {channels} channels (shape "
                      f"{tuple(pixel_values.shape)}) but the model config has "
                      f"num_channels={self.num_channels}.{hint}")
    ph, pw = self.patch_size
    gh, gw = height // ph, width // pw
    if gh == 0 or gw == 0:
      raise UserError(f"Image {height}x{width} is smaller than one "
                      f"{ph}x{pw} patch.")
    x = pixel_values[:, :gh * ph, :gw * pw].astype(self.dtype)
    x = x.reshape(batch, gh, ph, gw, pw, channels)
    kernel = self.projection.kernel[...].astype(self.dtype)
    x = jnp.einsum("bhpwqc,pqcd->bhwd", x, kernel)
    x = x + self.projection.bias[...].astype(self.dtype)
    return x.reshape(batch, gh * gw, -1)


class ViTEmbeddings(nnx.Module):
  """CLS token + patch embeddings + learned position embeddings, dropout.

  `cls_token` [1, 1, hidden] and `position_embeddings` [1, 1 + patches,
  hidden] keep transformers' shapes, so they load without reshaping.
  """

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.image_size = layers.pair(config.image_size)
    self.patch_embeddings = ViTPatchEmbeddings(
        config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ph, pw = self.patch_embeddings.patch_size
    self.grid = (self.image_size[0] // ph, self.image_size[1] // pw)
    # transformers draws both from a truncated N(0, initializer_range) cut at
    # +-2 (absolute), i.e. practically untruncated.
    init = layers.normal_init(config.initializer_range)
    hidden = config.hidden_size
    self.cls_token = layers.param(
        init, rngs, (1, 1, hidden), param_dtype, (None, None, "embed"))
    self.position_embeddings = layers.param(
        init, rngs, (1, 1 + self.grid[0] * self.grid[1], hidden), param_dtype,
        (None, None, "embed"))
    self.dropout = dropout.dropout(config.hidden_dropout_prob)

  def interpolate_pos_encoding(self, height: int, width: int) -> Array:
    """Position embeddings [1, 1 + patches, hidden] for a height x width image.

    As transformers: unchanged when the patch count and the grid's aspect
    (height == width) match the config's; otherwise the patch grid is resized
    bicubically to (height // patch, width // patch), the CLS row kept as is.
    """
    table = self.position_embeddings[...]
    ph, pw = self.patch_embeddings.patch_size
    new = (height // ph, width // pw)
    num_positions = self.grid[0] * self.grid[1]
    if new[0] * new[1] == num_positions and height == width:
      return table
    hidden = table.shape[-1]
    grid = table[0, 1:].reshape(*self.grid, hidden)
    grid = resize_bicubic(grid, new).astype(table.dtype)
    return jnp.concatenate([table[:, :1], grid.reshape(1, -1, hidden)], axis=1)

  def __call__(self, pixel_values: Array, *, deterministic: bool,
               rngs: nnx.Rngs | None, interpolate_pos_encoding: bool = False
               ) -> Array:
    batch, height, width, _ = pixel_values.shape
    patches = self.patch_embeddings(pixel_values)
    cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype),
                           (batch, 1, patches.shape[-1]))
    x = jnp.concatenate([cls, patches], axis=1)
    if interpolate_pos_encoding:
      positions = self.interpolate_pos_encoding(height, width)
    else:
      if (height, width) != self.image_size:
        raise UserError(
            f"Input image size ({height}*{width}) doesn't match the model's "
            f"image_size ({self.image_size[0]}*{self.image_size[1]}); resize "
            "the images or interpolate the position embeddings "
            "(interpolate_pos_encoding=True).")
      positions = self.position_embeddings[...]
    x = x + positions.astype(self.dtype)
    return self.dropout(x, deterministic=deterministic, rngs=rngs)


class ViTSelfOutput(nnx.Module):
  """Attention output projection `dense` and dropout (the residual is the layer's)."""

  def __init__(self, config: Any, in_features: int, *, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    self.dense = layers.hf_linear(config, in_features, config.hidden_size,
                         ("heads", "embed"), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.dropout = dropout.dropout(config.hidden_dropout_prob)

  def __call__(self, x: Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    kw = dict(deterministic=deterministic, rngs=rngs)
    return self.dropout(self.dense(x, **kw), **kw)


class ViTAttention(nnx.Module):
  """`attention` (q/k/v) followed by `output` (projection + dropout)."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    # transformers' ViTSelfAttention: BERT's projections, biases per qkv_bias.
    self.attention = attention.SelfAttention(
        config.hidden_size, config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None),
        use_bias=getattr(config, "qkv_bias", True),
        attention_dropout=config.attention_probs_dropout_prob, dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=layers.normal_init(config.initializer_range), rngs=rngs)
    self.output = ViTSelfOutput(
        config, self.attention.num_heads * self.attention.head_dim,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    kw = dict(deterministic=deterministic, rngs=rngs)
    return self.output(self.attention(x, None, **kw), **kw)


class ViTOutput(nnx.Module):
  """MLP down-projection `dense`, dropout and the residual."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.dense = layers.hf_linear(config, config.intermediate_size, config.hidden_size,
                         ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)
    self.dropout = dropout.dropout(config.hidden_dropout_prob)

  def __call__(self, hidden: Array, residual: Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    kw = dict(deterministic=deterministic, rngs=rngs)
    return self.dropout(self.dense(hidden, **kw), **kw) + residual


class ViTLayer(nnx.Module):
  """One pre-LayerNorm block: x + attn(ln_before(x)), then + mlp(ln_after(.))."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention = ViTAttention(config, **kw)
    self.intermediate = bert.BertIntermediate(config, **kw)  # Same module in both.
    self.output = ViTOutput(config, **kw)
    self.layernorm_before = _layer_norm(config, dtype=dtype,
                                        param_dtype=param_dtype)
    self.layernorm_after = _layer_norm(config, dtype=dtype,
                                       param_dtype=param_dtype)

  def __call__(self, x: Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    kw = dict(deterministic=deterministic, rngs=rngs)
    x = self.attention(self.layernorm_before(x), **kw) + x
    hidden = self.intermediate(self.layernorm_after(x), **kw)
    return self.output(hidden, x, **kw)


class ViTEncoder(nnx.Module):
  """`layer`: the stack of `num_hidden_layers` blocks."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.layer = nnx.List([
        ViTLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.num_hidden_layers)])
    self.stack_options = stack.Options()

  def __call__(self, x: Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    def call(block, h, block_rngs):
      h = block(h, deterministic=deterministic, rngs=block_rngs)
      return sharding.constrain(h, ("batch", "length", "embed"))

    return stack.run(list(self.layer), x, call, options=self.stack_options, rngs=rngs)


class ViTPooler(nnx.Module):
  """pooler_act(dense(hidden state of the CLS token))."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    out = getattr(config, "pooler_output_size", None) or config.hidden_size
    self.dense = layers.hf_linear(config, config.hidden_size, out, ("embed", None),
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = layers.activation(getattr(config, "pooler_act", "tanh"))

  def __call__(self, hidden: Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    return self.act(self.dense(hidden[:, 0], deterministic=deterministic,
                               rngs=rngs))


class ViTModel(nnx.Module):
  """`embeddings`, `encoder`, final `layernorm` and (optionally) `pooler`."""

  def __init__(self, config: Any, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs,
               add_pooling_layer: bool = True):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = ViTEmbeddings(config, **kw)
    self.encoder = ViTEncoder(config, **kw)
    self.layernorm = _layer_norm(config, dtype=dtype, param_dtype=param_dtype)
    self.pooler = ViTPooler(config, **kw) if add_pooling_layer else None

  def encode(self, pixel_values: Array, *, deterministic: bool = True,
             rngs: nnx.Rngs | None = None,
             interpolate_pos_encoding: bool = False) -> Array:
    """NHWC pixels -> final hidden states [batch, 1 + patches, hidden] (CLS first)."""
    x = self.embeddings(pixel_values, deterministic=deterministic, rngs=rngs,
                        interpolate_pos_encoding=interpolate_pos_encoding)
    x = sharding.constrain(x, ("batch", "length", "embed"))
    x = self.encoder(x, deterministic=deterministic, rngs=rngs)
    return self.layernorm(x)

  def __call__(self, pixel_values: Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None,
               interpolate_pos_encoding: bool = False
               ) -> tuple[Array, Array | None]:
    """Returns (last hidden states, pooled output or None)."""
    hidden = self.encode(pixel_values, deterministic=deterministic, rngs=rngs,
                         interpolate_pos_encoding=interpolate_pos_encoding)
    if self.pooler is None:
      return hidden, None
    return hidden, self.pooler(hidden, deterministic=deterministic, rngs=rngs)


class ViTForImageClassification(ViTModel):
  """ViT (no pooler) + `classifier` linear on the final CLS state, as transformers."""

  def __init__(self, config: Any, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if config.num_labels < 1:
      raise UserError(f"num_labels must be >= 1, got {config.num_labels}.")
    super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                     add_pooling_layer=False)
    self.classifier = layers.hf_linear(config, config.hidden_size, config.num_labels,
                              ("embed", None), dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixel_values: Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None,
               interpolate_pos_encoding: bool = False) -> Array:
    """NHWC pixels -> float32 logits [batch, num_labels]."""
    hidden = self.encode(pixel_values, deterministic=deterministic, rngs=rngs,
                         interpolate_pos_encoding=interpolate_pos_encoding)
    return self.classifier(hidden[:, 0], deterministic=deterministic,
                           rngs=rngs).astype(jnp.float32)


# --- checkpoint names --------------------------------------------------------
# Module names are our paths with `.` for `/`, as for BERT, e.g.
#   encoder/layer/0/attention/attention/query/kernel
#       <-> vit.encoder.layer.0.attention.attention.query.weight  (transposed)
#   encoder/layer/0/layernorm_before/scale
#       <-> vit.encoder.layer.0.layernorm_before.weight
#   embeddings/cls_token <-> vit.embeddings.cls_token  (as is)
#   classifier/kernel <-> classifier.weight  (head: never prefixed)
# (transformers 5 renames these in memory, to `vit.layers.0.attention.q_proj`
# and so on, but reads and writes the names above.) Two rules come first:
# the patch conv kernel (PyTorch OIHW <-> our HWIO, where the generic
# reversal would swap height and width), and the bare-tensor params.
_CONV = naming.Transform(to_ours=lambda a: np.transpose(a, (2, 3, 1, 0)),
                         to_theirs=lambda a: np.transpose(a, (3, 2, 0, 1)),
                         axes=lambda ndim: (2, 3, 1, 0))
VIT_TORCH_RULES: tuple[naming.NameRule, ...] = (
    naming.NameRule(r"(.*/patch_embeddings/projection)/kernel", r"\1/weight",
                    _CONV),
    naming.NameRule(r"(.*)/(cls_token|position_embeddings)", r"\1/\2"),
) + naming.TORCH_RULES
# transformers' old FlaxViT (flax_model.msgpack) used our exact names and the
# HWIO conv kernel.
VIT_CHECKPOINT = naming.CheckpointLayout(
    prefix="vit", head_modules=("classifier",),
    rules={"torch": VIT_TORCH_RULES, "flax": naming.FLAX_RULES})

