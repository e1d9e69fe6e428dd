"""lm_loss: the chunked, fused next-token loss equals the loss of the full logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

from jaxft.formats import hf
from jaxft.tasks import lm_loss
from jaxft.tasks import causal_lm
from jaxft.models import layers

BATCH, LENGTH, FEATURES, VOCAB = 3, 40, 16, 97


def _inputs(vocab_major: bool):
  keys = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(keys[0], (BATCH, LENGTH, FEATURES))
  shape = (VOCAB, FEATURES) if vocab_major else (FEATURES, VOCAB)
  weight = jax.random.normal(keys[1], shape) * 0.5
  targets = jax.random.randint(keys[2], (BATCH, LENGTH), 0, VOCAB)
  valid = jax.random.bernoulli(keys[3], 0.7, (BATCH, LENGTH))
  return hidden, weight, targets, valid


def _reference(hidden, weight, targets, valid, vocab_major):
  logits = hidden @ (weight.T if vocab_major else weight)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(jnp.where(valid, losses, 0.0))


@pytest.mark.parametrize("vocab_major", [False, True])
def test_loss_and_both_gradients_match_the_full_logits(vocab_major, monkeypatch):
  # Several chunks per row, so the scan and its weight-gradient sum are exercised.
  monkeypatch.setattr(lm_loss, "CHUNK_POSITIONS", BATCH * 8)
  hidden, weight, targets, valid = _inputs(vocab_major)
  fused = lambda h, w: lm_loss.loss_sum(h, layers.OutputLayer(w, vocab_major), targets, valid)
  ref = lambda h, w: _reference(h, w, targets, valid, vocab_major)
  loss, (dh, dw) = jax.value_and_grad(fused, argnums=(0, 1))(hidden, weight)
  want, (want_dh, want_dw) = jax.value_and_grad(ref, argnums=(0, 1))(hidden, weight)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(dh, want_dh, atol=1e-5)
  np.testing.assert_allclose(dw, want_dw, atol=1e-5)
  np.testing.assert_allclose(jax.jit(fused)(hidden, weight), want, rtol=1e-5)


def test_a_frozen_output_layer_costs_no_weight_gradient_matmul():
  hidden, weight, targets, valid = _inputs(False)
  fused = lambda h: lm_loss.loss_sum(h, layers.OutputLayer(weight, False), targets, valid)
  dh = jax.grad(fused)(hidden)
  np.testing.assert_allclose(
      dh, jax.grad(lambda h: _reference(h, weight, targets, valid, False))(hidden), atol=1e-5)
  # Forward, and the hidden-state gradient: two vocab-sized contractions, not three.
  text = jax.jit(jax.grad(fused)).lower(hidden).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert len(dots) == 2, dots


@pytest.mark.parametrize("batch,length,chunk", [(8, 256, 64), (1, 40, 40), (3, 7, 7),
                                                (600, 10, 1), (32, 100, 10)])
def test_chunks_divide_the_length_and_hold_at_most_the_budget(batch, length, chunk):
  assert lm_loss._chunk_length(batch, length) == chunk  # pylint: disable=protected-access


@pytest.mark.parametrize("tied", [True, False])
def test_the_lm_objective_gives_the_same_loss_and_grads_through_either_output_path(
    tied, monkeypatch):
  # lm_steps reads hidden states + output layer when the head is one matrix,
  # and full logits otherwise (a LoRA adapter on lm_head): both must agree.
  config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=48, tie_word_embeddings=tied)
  graphdef, params = nnx.split(hf.build_model(config, "causal_lm", seed=0))
  ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
  batch = {"input_ids": ids, "positions": jnp.tile(jnp.arange(12) % 7, (2, 1)),
           "segment_ids": jnp.array([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3]),
           "loss_mask": jnp.ones((2, 12), bool).at[0, :3].set(False)}

  def loss(p):
    outputs = causal_lm.OBJECTIVE.forward(nnx.merge(graphdef, p), batch, True, None)
    return causal_lm.OBJECTIVE.loss_sums(outputs, batch)[0]

  fused, fused_grads = jax.value_and_grad(loss)(params)
  monkeypatch.setattr(type(nnx.merge(graphdef, params)), "output_layer", lambda self: None)
  full, full_grads = jax.value_and_grad(loss)(params)
  np.testing.assert_allclose(fused, full, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), fused_grads,
               full_grads)


_ON_A_MESH = """
import jax, jax.numpy as jnp, numpy as np
from jaxft import defaults, sharding
from jaxft.models import layers
from jaxft.tasks import lm_loss
from tests.test_lm_loss import _inputs, _reference

for vocab_major in (False, True):
  hidden, weight, targets, valid = _inputs(vocab_major)
  hidden = jnp.concatenate([hidden, hidden[:1]])  # 4 rows: they split over data x fsdp = 4.
  targets, valid = jnp.concatenate([targets, targets[:1]]), jnp.concatenate([valid, valid[:1]])
  loss = lambda h, w: lm_loss.loss_sum(h, layers.OutputLayer(w, vocab_major), targets, valid)
  config = defaults.recipe("sft")
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh, rules = sharding.make_mesh(config), sharding.logical_rules(config)
  def on_mesh(h, w):
    with sharding.activation_rules(mesh, rules):
      return jax.value_and_grad(loss, argnums=(0, 1))(h, w)
  got = jax.jit(on_mesh)(hidden, weight)
  want = jax.value_and_grad(lambda h, w: _reference(h, w, targets, valid, vocab_major),
                            argnums=(0, 1))(hidden, weight)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_loss_and_gradients_are_the_same_with_the_batch_split_over_a_mesh():
  """8 CPU devices, data x fsdp x tensor = 2 x 2 x 2: per-shard weight-gradient
  partial sums, reduced once after the chunk loop, give the full-logits result."""
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from tests.helpers import ROOT  # pylint: disable=g-import-not-at-top
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = subprocess.run([sys.executable, "-c", _ON_A_MESH], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _reference_logps(hidden, weight, vocab_major, targets):
  logits = hidden @ (weight.T if vocab_major else weight)
  return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("vocab_major", [False, True])
def test_token_logps_and_both_gradients_match_the_full_logits(vocab_major, monkeypatch):
  monkeypatch.setattr(lm_loss, "CHUNK_POSITIONS", BATCH * 8)  # Several chunks per row.
  hidden, weight, targets, valid = _inputs(vocab_major)
  # Any per-position weighting of the outputs: DPO sums a response's, GRPO weighs each.
  ct = jnp.where(valid, jax.random.normal(jax.random.key(5), valid.shape), 0.0)
  fused = lambda h, w: lm_loss.token_logps(h, layers.OutputLayer(w, vocab_major), targets)
  ref = lambda h, w: _reference_logps(h, w, vocab_major, targets)
  np.testing.assert_allclose(jax.jit(fused)(hidden, weight), ref(hidden, weight), atol=1e-5)
  got = jax.grad(lambda h, w: jnp.sum(ct * fused(h, w)), argnums=(0, 1))(hidden, weight)
  want = jax.grad(lambda h, w: jnp.sum(ct * ref(h, w)), argnums=(0, 1))(hidden, weight)
  np.testing.assert_allclose(got[0], want[0], atol=1e-5)
  np.testing.assert_allclose(got[1], want[1], atol=1e-5)


def test_token_logps_of_a_frozen_output_layer_cost_no_weight_gradient_matmul():
  hidden, weight, targets, _ = _inputs(False)
  fused = lambda h: jnp.sum(lm_loss.token_logps(h, layers.OutputLayer(weight, False), targets))
  text = jax.jit(jax.grad(fused)).lower(hidden).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert len(dots) == 2, dots  # The logits and d logp / d hidden, in one pass.
