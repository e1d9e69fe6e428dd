"""BERT and RoBERTa encoders with sequence-classification heads, in Flax NNX.

The modules mirror transformers' PyTorch classes one to one, so parameter
paths read like HF module names without the `bert.` / `roberta.` prefix:
`encoder/layer/3/attention/self/query/kernel`, `pooler/dense/kernel`,
`classifier/kernel`. Regex rules in configs are written against these paths.

The classifiers are called as

  model(input_ids, attention_mask, token_type_ids=None, *,
        deterministic=True, rngs=None) -> float32 logits [batch, num_labels]

and take dropout randomness only from `rngs` at call time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import sharding
from jaxft.errors import UserError
from jaxft.models import attention
from jaxft.models import dropout
from jaxft.models import layers
from jaxft.models import naming
from jaxft.models import stack

Array = jax.Array
Dtype = Any


def _classifier_dropout(config: Any) -> float:
  rate = getattr(config, "classifier_dropout", None)
  return config.hidden_dropout_prob if rate is None else rate


def _check_absolute_positions(config: Any) -> None:
  kind = getattr(config, "position_embedding_type", None) or "absolute"
  if kind != "absolute":
    raise UserError(f"position_embedding_type={kind!r} is not supported; "
                    "jaxft BERT/RoBERTa only implement 'absolute'.")


class BertEmbeddings(nnx.Module):
  """Word + absolute position + token type embeddings, LayerNorm, dropout."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    _check_absolute_positions(config)
    init = layers.normal_init(config.initializer_range)
    embed = lambda n, axes: layers.Embed(
        n, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
        embedding_init=init, axes=axes, rngs=rngs)
    self.word_embeddings = embed(config.vocab_size, ("vocab", "embed"))
    self.position_embeddings = embed(config.max_position_embeddings,
                                     (None, "embed"))
    self.token_type_embeddings = embed(config.type_vocab_size, (None, "embed"))
    self.LayerNorm = layers.LayerNorm(
        config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype,
        param_dtype=param_dtype, axes=("embed",))
    self.dropout = dropout.dropout(config.hidden_dropout_prob)

  def position_ids(self, input_ids: Array) -> Array:
    """Absolute positions 0..length-1, as BERT numbers them."""
    length = input_ids.shape[1]
    self._check_length(length)
    return jnp.broadcast_to(jnp.arange(length), input_ids.shape)

  def _check_length(self, max_position: int) -> None:
    # Out-of-range gathers silently return garbage in JAX; fail at trace time.
    if max_position > self.position_embeddings.num_embeddings:
      raise UserError(
          f"Sequence needs position {max_position - 1} but the model has "
          f"max_position_embeddings={self.position_embeddings.num_embeddings}; "
          "lower the max sequence length.")

  def __call__(self, input_ids: Array, token_type_ids: Array | None, *,
               deterministic: bool, rngs: nnx.Rngs | None) -> Array:
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (self.word_embeddings(input_ids)
         + self.token_type_embeddings(token_type_ids)
         + self.position_embeddings(self.position_ids(input_ids)))
    x = self.LayerNorm(x)
    return self.dropout(x, deterministic=deterministic, rngs=rngs)


class RobertaEmbeddings(BertEmbeddings):
  """BERT embeddings with fairseq position numbering from `pad_token_id`."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.padding_idx = config.pad_token_id

  def position_ids(self, input_ids: Array) -> Array:
    """padding_idx + 1 + running count of real tokens; pads get padding_idx."""
    self._check_length(self.padding_idx + 1 + input_ids.shape[1])
    not_pad = (input_ids != self.padding_idx).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + self.padding_idx


class BertSelfOutput(nnx.Module):
  """Attention output projection, dropout, residual, LayerNorm."""

  def __init__(self, config: Any, in_features: int, axes: layers.LogicalAxes,
               *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.dense = layers.hf_linear(config, in_features, config.hidden_size, axes,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.LayerNorm = layers.LayerNorm(
        config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype,
        param_dtype=param_dtype, axes=("embed",))
    self.dropout = dropout.dropout(config.hidden_dropout_prob)

  def __call__(self, hidden: Array, residual: Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    kw = dict(deterministic=deterministic, rngs=rngs)
    hidden = self.dropout(self.dense(hidden, **kw), **kw)
    return self.LayerNorm(hidden + residual)


# transformers' BertOutput is the same computation after the MLP.
BertOutput = BertSelfOutput


class BertAttention(nnx.Module):
  """`self` (q/k/v attention) followed by `output` (projection + LayerNorm)."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    # The attribute really is called `self`: that is HF's module name.
    self.self = attention.SelfAttention(
        config.hidden_size, config.num_attention_heads,
        attention_dropout=config.attention_probs_dropout_prob, dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=layers.normal_init(config.initializer_range), rngs=rngs)
    self.output = BertSelfOutput(config, config.hidden_size, ("heads", "embed"),
                                 dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)

  def __call__(self, x: Array, mask: Array | None, *, deterministic: bool,
               rngs: nnx.Rngs | None, first_only: bool = False) -> Array:
    """`first_only`: outputs for the first position only (keys and values see all)."""
    queries = x[:, :1] if first_only else x
    context = self.self(x, mask, deterministic=deterministic, rngs=rngs, queries=queries)
    return self.output(context, queries, deterministic=deterministic, rngs=rngs)


class BertIntermediate(nnx.Module):
  """MLP up-projection and activation."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.dense = layers.hf_linear(config, config.hidden_size, config.intermediate_size,
                         ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)
    self.act = layers.activation(config.hidden_act)

  def __call__(self, x: Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    hidden = self.act(self.dense(x, deterministic=deterministic, rngs=rngs))
    return sharding.constrain(hidden, ("batch", "length", "mlp"))


class BertLayer(nnx.Module):
  """One post-LayerNorm transformer block."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention = BertAttention(config, **kw)
    self.intermediate = BertIntermediate(config, **kw)
    self.output = BertOutput(config, config.intermediate_size, ("mlp", "embed"),
                             **kw)

  def __call__(self, x: Array, mask: Array | None, *, deterministic: bool,
               rngs: nnx.Rngs | None, first_only: bool = False) -> Array:
    x = self.attention(x, mask, deterministic=deterministic, rngs=rngs, first_only=first_only)
    hidden = self.intermediate(x, deterministic=deterministic, rngs=rngs)
    return self.output(hidden, x, deterministic=deterministic, rngs=rngs)


class BertEncoder(nnx.Module):
  """`layer`: the stack of `num_hidden_layers` blocks."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.layer = nnx.List([
        BertLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.num_hidden_layers)])
    self.stack_options = stack.Options()

  def __call__(self, x: Array, mask: Array | None, *, deterministic: bool,
               rngs: nnx.Rngs | None, first_only: bool = False) -> Array:
    """Hidden states [batch, length, hidden]; with `first_only`, [batch, 1, hidden].

    `first_only` runs the last layer for the first position only: a
    classification head reads nothing else, and that layer's query, output
    and MLP matmuls for the other positions would be thrown away.
    """
    def call(block, h, block_rngs, first=False):
      h = block(h, mask, deterministic=deterministic, rngs=block_rngs, first_only=first)
      return sharding.constrain(h, ("batch", "length", "embed"))

    blocks = list(self.layer)
    body = blocks[:-1] if first_only else blocks
    x = stack.run(body, x, call, options=self.stack_options, rngs=rngs)
    if first_only:
      x = call(blocks[-1], x, rngs, first=True)
    return x


class BertPooler(nnx.Module):
  """tanh(dense(hidden state of the first token))."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.dense = layers.hf_linear(config, config.hidden_size, config.hidden_size,
                         ("embed", "embed"), dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)

  def __call__(self, hidden: Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    first = hidden[:, 0]
    return jnp.tanh(self.dense(first, deterministic=deterministic, rngs=rngs))


class BertModel(nnx.Module):
  """The BERT encoder: `embeddings`, `encoder` and (optionally) `pooler`."""

  embeddings_cls = BertEmbeddings

  def __init__(self, config: Any, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs,
               add_pooling_layer: bool = True):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = self.embeddings_cls(config, **kw)
    self.encoder = BertEncoder(config, **kw)
    self.pooler = BertPooler(config, **kw) if add_pooling_layer else None

  def encode(self, input_ids: Array, attention_mask: Array | None,
             token_type_ids: Array | None = None, *,
             deterministic: bool = True,
             rngs: nnx.Rngs | None = None, first_only: bool = False) -> Array:
    """Token ids -> last hidden states [batch, length, hidden].

    `first_only`: only the first position's last hidden state ([batch, 1, hidden]).
    """
    x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic,
                        rngs=rngs)
    return self.encoder(x, attention.padding_mask(attention_mask),
                        deterministic=deterministic, rngs=rngs, first_only=first_only)

  def __call__(self, input_ids: Array, attention_mask: Array | None,
               token_type_ids: Array | None = None, *,
               deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> tuple[Array, Array | None]:
    """Returns (last hidden states, pooled output or None)."""
    hidden = self.encode(input_ids, attention_mask, token_type_ids,
                         deterministic=deterministic, rngs=rngs)
    if self.pooler is None:
      return hidden, None
    return hidden, self.pooler(hidden, deterministic=deterministic, rngs=rngs)


class BertForSequenceClassification(BertModel):
  """BERT + pooler + dropout + `classifier` linear, as in transformers."""

  def __init__(self, config: Any, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = dropout.dropout(_classifier_dropout(config))
    self.classifier = layers.hf_linear(config, config.hidden_size, config.num_labels,
                              ("embed", None), dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids: Array, attention_mask: Array | None,
               token_type_ids: Array | None = None, *,
               deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> Array:
    """Returns float32 logits [batch, num_labels]."""
    hidden = self.encode(input_ids, attention_mask, token_type_ids,
                         deterministic=deterministic, rngs=rngs, first_only=True)
    kw = dict(deterministic=deterministic, rngs=rngs)
    pooled = self.dropout(self.pooler(hidden, **kw), **kw)
    return self.classifier(pooled, **kw).astype(jnp.float32)


class RobertaModel(BertModel):
  """BERT with RoBERTa's position numbering."""

  embeddings_cls = RobertaEmbeddings


class RobertaClassificationHead(nnx.Module):
  """dropout -> dense -> tanh -> dropout -> out_proj on the first token."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dense = layers.hf_linear(config, config.hidden_size, config.hidden_size,
                         ("embed", "embed"), **kw)
    self.dropout = dropout.dropout(_classifier_dropout(config))
    self.out_proj = layers.hf_linear(config, config.hidden_size, config.num_labels,
                            ("embed", None), **kw)

  def __call__(self, hidden: Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    x = self.dropout(hidden[:, 0], deterministic=deterministic, rngs=rngs)
    x = jnp.tanh(self.dense(x, deterministic=deterministic, rngs=rngs))
    x = self.dropout(x, deterministic=deterministic, rngs=rngs)
    return self.out_proj(x, deterministic=deterministic, rngs=rngs)


class RobertaForSequenceClassification(RobertaModel):
  """RoBERTa (no pooler) + `classifier` head (`dense`, `out_proj`)."""

  def __init__(self, config: Any, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                     add_pooling_layer=False)
    self.classifier = RobertaClassificationHead(
        config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids: Array, attention_mask: Array | None,
               token_type_ids: Array | None = None, *,
               deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> Array:
    """Returns float32 logits [batch, num_labels]."""
    hidden = self.encode(input_ids, attention_mask, token_type_ids,
                         deterministic=deterministic, rngs=rngs, first_only=True)
    return self.classifier(hidden, deterministic=deterministic,
                           rngs=rngs).astype(jnp.float32)


# Checkpoint names. HF module names are our paths with `.` for `/`, so the
# shared leaf rules of `naming.TORCH_RULES` cover every param, e.g.
#   encoder/layer/0/attention/self/query/kernel
#       <-> bert.encoder.layer.0.attention.self.query.weight  (transposed)
#   embeddings/LayerNorm/scale <-> bert.embeddings.LayerNorm.weight  (or .gamma)
#   embeddings/word_embeddings/embedding
#       <-> bert.embeddings.word_embeddings.weight
#   classifier/bias <-> classifier.bias  (head: never prefixed)
# Only the base-model prefix and the head modules differ per class.
BERT_CHECKPOINT = naming.CheckpointLayout(prefix="bert",
                                          head_modules=("classifier",))
ROBERTA_CHECKPOINT = naming.CheckpointLayout(prefix="roberta",
                                             head_modules=("classifier",))


# --- DistilBERT --------------------------------------------------------------
# Same family, different module names (`q_lin`, `sa_layer_norm`, `ffn/lin1`),
# no token types, no pooler: the head is `pre_classifier` -> ReLU -> dropout ->
# `classifier`. Config fields use DistilBERT's names (dim, n_heads, ...).

def _distil_layer_norm(config: Any, *, dtype: Dtype,
                       param_dtype: Dtype) -> layers.LayerNorm:
  # transformers hard-codes eps=1e-12 for DistilBERT.
  return layers.LayerNorm(config.dim, epsilon=1e-12, dtype=dtype,
                          param_dtype=param_dtype, axes=("embed",))


class DistilBertEmbeddings(nnx.Module):
  """Word + learned position embeddings, LayerNorm, dropout."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    init = layers.normal_init(config.initializer_range)
    self.word_embeddings = layers.Embed(
        config.vocab_size, config.dim, dtype=dtype, param_dtype=param_dtype,
        embedding_init=init, axes=("vocab", "embed"), rngs=rngs)
    self.position_embeddings = layers.Embed(
        config.max_position_embeddings, config.dim, dtype=dtype,
        param_dtype=param_dtype, embedding_init=init, axes=(None, "embed"),
        rngs=rngs)
    self.LayerNorm = _distil_layer_norm(config, dtype=dtype,
                                        param_dtype=param_dtype)
    self.dropout = dropout.dropout(config.dropout)

  def __call__(self, input_ids: Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    length = input_ids.shape[1]
    if length > self.position_embeddings.num_embeddings:
      raise UserError(
          f"Sequence length {length} exceeds max_position_embeddings="
          f"{self.position_embeddings.num_embeddings}; lower it.")
    x = self.word_embeddings(input_ids) + self.position_embeddings(
        jnp.arange(length)[None, :])
    return self.dropout(self.LayerNorm(x), deterministic=deterministic,
                        rngs=rngs)


class DistilBertSelfAttention(nnx.Module):
  """q_lin/k_lin/v_lin attention with the `out_lin` projection (no dropout)."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    if config.dim % config.n_heads:
      raise UserError(f"dim {config.dim} is not a multiple of n_heads "
                      f"{config.n_heads}.")
    self.num_heads = config.n_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = config.dim
    self.q_lin = layers.hf_linear(config, d, d, ("embed", "heads"), **kw)
    self.k_lin = layers.hf_linear(config, d, d, ("embed", "heads"), **kw)
    self.v_lin = layers.hf_linear(config, d, d, ("embed", "heads"), **kw)
    self.out_lin = layers.hf_linear(config, d, d, ("heads", "embed"), **kw)
    self.dropout = dropout.dropout(config.attention_dropout)

  def __call__(self, x: Array, mask: Array | None, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    batch, length, dim = x.shape
    split = lambda y: y.reshape(batch, length, self.num_heads, -1)
    kw = dict(deterministic=deterministic, rngs=rngs)
    context = attention.dot_product_attention(
        split(self.q_lin(x, **kw)), split(self.k_lin(x, **kw)),
        split(self.v_lin(x, **kw)), mask,
        dropout_layer=self.dropout, deterministic=deterministic, rngs=rngs)
    return self.out_lin(context.reshape(batch, length, dim), **kw)


class DistilBertFFN(nnx.Module):
  """lin1 -> activation -> lin2 -> dropout."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lin1 = layers.hf_linear(config, config.dim, config.hidden_dim,
                               ("embed", "mlp"), **kw)
    self.lin2 = layers.hf_linear(config, config.hidden_dim, config.dim,
                               ("mlp", "embed"), **kw)
    self.act = layers.activation(config.activation)
    self.dropout = dropout.dropout(config.dropout)

  def __call__(self, x: Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    kw = dict(deterministic=deterministic, rngs=rngs)
    hidden = self.act(self.lin1(x, **kw))
    return self.dropout(self.lin2(hidden, **kw), **kw)


class DistilBertBlock(nnx.Module):
  """Post-LayerNorm block: attention, sa_layer_norm, ffn, output_layer_norm."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.attention = DistilBertSelfAttention(config, rngs=rngs, **kw)
    self.sa_layer_norm = _distil_layer_norm(config, **kw)
    self.ffn = DistilBertFFN(config, rngs=rngs, **kw)
    self.output_layer_norm = _distil_layer_norm(config, **kw)

  def __call__(self, x: Array, mask: Array | None, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    x = self.sa_layer_norm(
        self.attention(x, mask, deterministic=deterministic, rngs=rngs) + x)
    return self.output_layer_norm(
        self.ffn(x, deterministic=deterministic, rngs=rngs) + x)


class DistilBertTransformer(nnx.Module):
  """`layer`: the stack of `n_layers` blocks."""

  def __init__(self, config: Any, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.layer = nnx.List([
        DistilBertBlock(config, dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs) for _ in range(config.n_layers)])
    self.stack_options = stack.Options()

  def __call__(self, x: Array, mask: Array | None, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> Array:
    def call(block, h, block_rngs):
      h = block(h, mask, deterministic=deterministic, rngs=block_rngs)
      return sharding.constrain(h, ("batch", "length", "embed"))

    return stack.run(list(self.layer), x, call, options=self.stack_options, rngs=rngs)


class DistilBertForSequenceClassification(nnx.Module):
  """DistilBERT + `pre_classifier` (ReLU) + dropout + `classifier`."""

  def __init__(self, config: Any, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = DistilBertEmbeddings(config, **kw)
    self.transformer = DistilBertTransformer(config, **kw)
    self.pre_classifier = layers.hf_linear(config, config.dim, config.dim,
                                         ("embed", "embed"), **kw)
    self.dropout = dropout.dropout(config.seq_classif_dropout)
    self.classifier = layers.hf_linear(config, config.dim, config.num_labels,
                                     ("embed", None), **kw)

  def __call__(self, input_ids: Array, attention_mask: Array | None,
               token_type_ids: Array | None = None, *,
               deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> Array:
    """Returns float32 logits [batch, num_labels]; token_type_ids is ignored."""
    del token_type_ids  # DistilBERT has no segment embeddings
    x = self.embeddings(input_ids, deterministic=deterministic, rngs=rngs)
    x = self.transformer(x, attention.padding_mask(attention_mask),
                         deterministic=deterministic, rngs=rngs)
    kw = dict(deterministic=deterministic, rngs=rngs)
    pooled = jax.nn.relu(self.pre_classifier(x[:, 0], **kw))
    pooled = self.dropout(pooled, **kw)
    return self.classifier(pooled, **kw).astype(jnp.float32)


DISTILBERT_CHECKPOINT = naming.CheckpointLayout(
    prefix="distilbert", head_modules=("pre_classifier", "classifier"))
