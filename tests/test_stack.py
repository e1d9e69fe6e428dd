"""The layer-stack switches (scan, remat) change how a step runs, never its result."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

from jaxft.formats import hf
from jaxft.models import dropout
from jaxft.models import stack

VARIANTS = [stack.Options(scan=True), stack.Options(remat="full"), stack.Options(remat="dots"),
            stack.Options(scan=True, remat="full")]


def _bert(layers_: int = 3) -> nnx.Module:
  config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers_,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=32, num_labels=3)
  return hf.build_model(config, "classify", seed=0)


def _llama(layers_: int = 3) -> nnx.Module:
  config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers_,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=64, max_position_embeddings=32)
  return hf.build_model(config, "causal_lm", seed=0)


def _ids(shape=(2, 12)) -> jax.Array:
  return jnp.asarray(np.random.default_rng(0).integers(1, 64, shape), jnp.int32)


def _bert_loss(model, key, batch: int = 2):
  logits = model(_ids((batch, 12)), jnp.ones((batch, 12), jnp.int32), deterministic=key is None,
                 rngs=None if key is None else nnx.Rngs(dropout=key))
  return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(batch) % 3).mean()


def _llama_loss(model, key):
  del key
  ids = _ids()
  logits = model(ids, jnp.ones_like(ids), None, None, deterministic=True)
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def _loss_and_grads(model: nnx.Module, options: stack.Options, loss, key=None):
  stack.configure(model, options)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fn = lambda p: loss(nnx.merge(graphdef, p, rest), key)
  return jax.jit(jax.value_and_grad(fn))(params)


@pytest.mark.parametrize("build, loss", [(_bert, _bert_loss), (_llama, _llama_loss)],
                         ids=["bert", "llama"])
@pytest.mark.parametrize("options", VARIANTS, ids=str)
def test_scan_and_remat_give_the_loop_s_loss_and_gradients(build, loss, options):
  want_loss, want_grads = _loss_and_grads(build(), stack.Options(), loss)
  got_loss, got_grads = _loss_and_grads(build(), options, loss)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for want, got in zip(jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_with_dropout_scan_and_looped_remat_draw_the_same_masks():
  key = jax.random.key(3)
  looped, _ = _loss_and_grads(_bert(), stack.Options(remat="full"), _bert_loss, key)
  scanned, _ = _loss_and_grads(_bert(), stack.Options(scan=True), _bert_loss, key)
  deterministic, _ = _loss_and_grads(_bert(), stack.Options(), _bert_loss)
  np.testing.assert_allclose(scanned, looped, rtol=1e-6)
  assert abs(float(scanned) - float(deterministic)) > 1e-4  # Dropout really was on.


def _step_program(layers_: int, options: stack.Options, batch: int = 2):
  """The lowered gradient program, over layer-stacked parameters when scanning (as training)."""
  model = stack.configure(_bert(layers_), options)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if options.scan:
    params = stack.stack_state(params, stack.containers(model))
  loss = lambda p: _bert_loss(nnx.merge(graphdef, stack.unstack_state(p), rest), None, batch)
  return jax.jit(jax.grad(loss)).lower(params)


def test_scan_compiles_one_program_whatever_the_depth():
  ops = lambda n, scan: len(_step_program(n, stack.Options(scan=scan)).compile().as_text())
  assert ops(6, True) < 1.1 * ops(2, True)
  assert ops(6, False) > 2 * ops(2, False)


def test_stacked_state_round_trips_and_keeps_logical_axes():
  model = _bert(3)
  params = nnx.state(model, nnx.Param)
  stacked = stack.stack_state(params, stack.containers(model))
  kernel = stacked["encoder"]["layer"][stack.STACKED]["attention"]["self"]["query"]["kernel"]
  assert kernel.get_value().shape == (3, 32, 32)
  assert kernel.get_metadata()["logical_axes"] == (None, "embed", "heads")
  back = stack.unstack_state(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # Layers under different optimizer rules stay apart: one array gets one rule.
  by_layer = lambda path: path[2] if path[:2] == ("encoder", "layer") else None
  assert "0" in str(jax.tree_util.tree_structure(stack.stack_state(
      params, stack.containers(model), by_layer)))


def test_full_remat_keeps_fewer_activations():
  # A batch large enough that activations, not weights, fill the temporaries.
  temp = lambda remat: _step_program(3, stack.Options(remat=remat), batch=64).compile() \
      .memory_analysis().temp_size_in_bytes
  assert temp("full") < temp("dots") <= temp("none")


def test_stacks_of_different_blocks_fall_back_to_a_loop():
  blocks = [nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 4, use_bias=False, rngs=nnx.Rngs(1))]
  x = jnp.ones((2, 4))
  want = blocks[1](blocks[0](x))
  got = stack.run(blocks, x, lambda b, h, r: b(h), options=stack.Options(scan=True), rngs=None)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match="remat"):
    stack.Options(remat="some")


def test_hashed_dropout_keeps_one_minus_rate_and_the_mean():
  x = jnp.ones((256, 1024))
  drop = dropout.dropout(0.1)
  a = drop(x, deterministic=False, rngs=nnx.Rngs(dropout=0))
  b = drop(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  assert abs(float(jnp.mean(a != 0)) - 0.9) < 0.003
  assert abs(float(jnp.mean(a)) - 1.0) < 0.005
  assert 0.8 < float(jnp.mean((a != 0) == (b != 0))) < 0.84  # Independent masks: 0.9² + 0.1².
  # Neighbouring elements are not correlated (a weak hash would show it along a row).
  keep = np.asarray(a != 0, np.float32)
  assert abs(np.corrcoef(keep[:, :-1].ravel(), keep[:, 1:].ravel())[0, 1]) < 0.01
  np.testing.assert_array_equal(drop(x, deterministic=True, rngs=None), x)


def test_hashed_dropout_with_a_rate_just_below_one_drops_nearly_everything():
  # rate * 2**32 rounds to 2**32 here, which does not fit the uint32 threshold.
  x = jnp.ones((64, 64))
  out = dropout.dropout(1 - 1e-12)(x, deterministic=False, rngs=nnx.Rngs(dropout=0))
  assert int(jnp.sum(out != 0)) <= 1
