"""config.model.attention=fused (jax.nn.dot_product_attention) computes what jaxft's own does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.models import attention
from jaxft.models import dropout


def _inputs(q_len: int = 5, kv_len: int = 7):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k1, (3, q_len, 4, 8))
  k = jax.random.normal(k2, (3, kv_len, 4, 8))
  v = jax.random.normal(k3, (3, kv_len, 4, 8))
  valid = jnp.array([[1] * kv_len, [1] * 4 + [0] * (kv_len - 4), [0] * kv_len])  # Row 2: all pad.
  return q, k, v, attention.padding_mask(valid)


@pytest.mark.parametrize("q_len", [7, 1], ids=["self", "first-only"])
def test_fused_attention_matches_jaxft_attention_also_on_fully_padded_rows(q_len):
  q, k, v, mask = _inputs(q_len)
  run = lambda: attention.dot_product_attention(q, k, v, mask, dropout_layer=dropout.dropout(0.1),
                                                deterministic=True, rngs=None)
  want = run()
  with attention.attention_implementation("fused"):
    got = run()
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_fused_attention_leaves_training_with_attention_dropout_to_jaxft():
  q, k, v, mask = _inputs()
  drop = dropout.dropout(0.5)
  run = lambda: attention.dot_product_attention(q, k, v, mask, dropout_layer=drop,
                                                deterministic=False, rngs=nnx.Rngs(dropout=1))
  want = run()
  with attention.attention_implementation("fused"):
    got = run()
  np.testing.assert_array_equal(got, want)  # Same masks drawn: the same (dropout) path ran.


def test_unknown_attention_implementation_is_refused():
  with pytest.raises(ValueError, match="attention"):
    with attention.attention_implementation("flash"):
      pass
