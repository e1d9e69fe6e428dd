"""config.model.attention=splash (the Pallas TPU kernel) and `auto`.

Numerics run the kernel in Pallas' interpret mode on this CPU; the TPU tests
compile ahead of time for a v5p:2x2x2 topology (8 chips) through libtpu.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import transformers
from flax import nnx

from jaxft import run
from jaxft import sharding
from jaxft.aot import topology
from jaxft.models import attention
from jaxft.models import dropout
from jaxft.models import llama
from jaxft.models import stack

NO_DROPOUT = dropout.dropout(0.0)


def _qkv(batch=2, length=256, heads=4, kv_heads=2, head_dim=32):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(k1, (batch, length, heads, head_dim)),
          jax.random.normal(k2, (batch, length, kv_heads, head_dim)),
          jax.random.normal(k3, (batch, length, kv_heads, head_dim)))


def _packed_and_padded(length=256):
  """Row 0: three packed documents (ids from 0). Row 1: two, then right padding from 200."""
  pos = np.arange(length)
  segment_ids = np.stack([np.searchsorted([100, 180], pos, side="right"),
                          np.searchsorted([60], pos, side="right")]).astype(np.int32)
  attention_mask = np.ones((2, length), np.int32)
  attention_mask[1, 200:] = 0
  return jnp.asarray(attention_mask), jnp.asarray(segment_ids)


def _attend(q, k, v, mask, *, drop=NO_DROPOUT, deterministic=True, rngs=None):
  return attention.dot_product_attention(q, k, v, mask, dropout_layer=drop,
                                         deterministic=deterministic, rngs=rngs)


def _mesh_config(**sizes):
  return ml_collections.ConfigDict(
      {"mesh": {"data": 1, "fsdp": 1, "tensor": 1, "rules": (), **sizes}})


def _cpu_placement():
  """One CPU device as the (1, 1, 1) mesh: shard_map runs, splitting nothing."""
  c = _mesh_config()
  return sharding.Placement(sharding.make_mesh(c, jax.devices()[:1]),
                            sharding.logical_rules(c), state=None, batch=None)


# --- numerics: the kernel interpreted on this CPU ---------------------------

@pytest.mark.parametrize("in_mesh", [False, True], ids=["plain", "shard_map"])
def test_splash_matches_jaxft_with_gqa_packing_and_padding(in_mesh):
  q, k, v = _qkv()
  attention_mask, segment_ids = _packed_and_padded()
  want = _attend(q, k, v, attention.attention_mask_4d(256, attention_mask, segment_ids))

  def splash():
    mask = attention.causal_self_attention_mask(2, 256, attention_mask, segment_ids)
    assert isinstance(mask, attention.CausalSegments)  # No 256 x 256 mask.
    return _attend(q, k, v, mask)

  fn = run.traced(splash, _cpu_placement(), "splash") if in_mesh else splash
  with attention.attention_implementation("splash"):
    got = np.asarray(jax.jit(fn)())
  real = np.asarray(attention_mask, bool)
  assert np.abs(got - np.asarray(want))[real].max() <= 1e-4
  assert np.isfinite(got).all()  # Pad rows attend to the pads before them: never empty.


def test_splash_gradients_match_jaxft():
  """The kernel's own backward (dq and dk/dv kernels, key heads shared by two query heads)."""
  q, k, v = _qkv()
  attention_mask, segment_ids = _packed_and_padded()
  real = attention_mask[:, :, None, None]

  def loss(implementation, q, k, v):
    with attention.attention_implementation(implementation):
      mask = attention.causal_self_attention_mask(2, 256, attention_mask, segment_ids)
      return (_attend(q, k, v, mask) * real).sum()

  grads = {name: jax.jit(jax.grad(lambda *a, n=name: loss(n, *a), argnums=(0, 1, 2)))(q, k, v)
           for name in ("jaxft", "splash")}
  for want, got in zip(grads["jaxft"], grads["splash"]):
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_splash_leaves_attention_dropout_to_jaxft():
  q, k, v = _qkv()
  attention_mask, segment_ids = _packed_and_padded()
  drop = dropout.dropout(0.5)
  with attention.attention_implementation("splash"):
    mask = attention.causal_self_attention_mask(2, 256, attention_mask, segment_ids)
    got = _attend(q, k, v, mask, drop=drop, deterministic=False, rngs=nnx.Rngs(dropout=1))
  want = _attend(q, k, v, mask.dense(), drop=drop, deterministic=False,
                 rngs=nnx.Rngs(dropout=1))
  np.testing.assert_array_equal(got, want)  # Same masks drawn: the same (dropout) path ran.


def test_splash_leaves_lengths_off_its_tiles_to_jaxft():
  q, k, v = (x[:, :200] for x in _qkv())
  attention_mask, segment_ids = (x[:, :200] for x in _packed_and_padded())
  want = _attend(q, k, v, attention.attention_mask_4d(200, attention_mask, segment_ids))
  with attention.attention_implementation("splash"):
    got = _attend(q, k, v, attention.causal_self_attention_mask(2, 200, attention_mask,
                                                                segment_ids))
  real = np.asarray(attention_mask, bool)
  np.testing.assert_array_equal(np.asarray(got)[real], np.asarray(want)[real])


# --- auto ---------------------------------------------------------------------

@pytest.mark.parametrize("platform, want", [
    ("tpu", "splash"), ("gpu", "fused"), ("cuda", "fused"), ("rocm", "fused"), ("cpu", "jaxft")])
def test_auto_resolves_by_platform(platform, want):
  assert attention.resolve("auto", platform) == want
  assert attention.resolve("jaxft", platform) == "jaxft"  # A named choice stays.


def test_auto_on_cpu_is_jaxft_bit_for_bit():
  attention_mask, segment_ids = _packed_and_padded()
  q, k, v = _qkv()

  def forward():
    mask = attention.causal_self_attention_mask(2, 256, attention_mask, segment_ids)
    return attention.current_implementation(), _attend(q, k, v, mask)

  name, want = forward()  # No context: jaxft.
  got_name, got = run.traced(forward, _cpu_placement(), "auto")()
  assert (name, got_name) == ("jaxft", "jaxft")
  np.testing.assert_array_equal(got, want)


# --- TPU: compiled ahead of time for v5p:2x2x2 -------------------------------

@pytest.fixture(scope="module")
def tpu_devices():
  pytest.importorskip("libtpu")
  return topology.parse("v5p-16").devices()


def _tiny_llama(kv_heads):
  # Sizes unlike the 512-token length, so a [.., 512, 512] array can only be scores or a mask.
  config = transformers.LlamaConfig(
      vocab_size=320, hidden_size=256, intermediate_size=640, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=64)
  model = nnx.eval_shape(lambda: llama.LlamaForCausalLM(config, dtype=jnp.bfloat16,
                                                        rngs=nnx.Rngs(0)))
  return stack.configure(model, stack.Options(scan=True))


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-heads-split", "kv-heads-repeated"])
def test_llama_compiles_to_the_splash_kernel_for_tpu(tpu_devices, kv_heads):
  """`auto` on a TPU mesh (fsdp 4 x tensor 2) is splash; jaxft, the control, builds L x L.

  The forward only (the kernel's backward compiles in the temporaries test),
  layers scanned. One key head does not split over tensor=2: it is repeated.
  """
  graphdef, state = nnx.split(_tiny_llama(kv_heads))
  c = _mesh_config(fsdp=4, tensor=2)
  mesh = sharding.make_mesh(c, tpu_devices)
  where = sharding.placement(mesh, sharding.logical_rules(c), state)
  tokens = jax.ShapeDtypeStruct((8, 512), jnp.int32, sharding=where.batch)
  forward = lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask)

  def compiled_text(attention_name):
    fn = run.traced(forward, where, attention_name)
    abstract = sharding.with_shardings(state, where.state)
    with topology.persistent_cache_off():
      return jax.jit(fn).lower(abstract, tokens, tokens).compile().as_text()

  splash, jaxft = compiled_text("auto"), compiled_text("jaxft")
  assert "tpu_custom_call" in splash and "tpu_custom_call" not in jaxft
  assert ",512,512]" not in splash and ",512,512]" in jaxft
