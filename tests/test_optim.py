"""Optimizer: schedule shape, weight-decay mask, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import config as config_lib
from jaxft.tuning import optimizer
from jaxft.tuning import param_paths
from jaxft.tuning import rules
from jaxft.tasks import classify


def _config(**optim_overrides):
  c = config_lib.base()
  c.train.num_steps = 100
  c.optim.lr = 1.0
  c.optim.update(optim_overrides)
  return c


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_warms_up_then_decays_to_zero(kind):
  s = optimizer.schedule(optimizer.Schedule.of(_config(schedule=kind, warmup_frac=0.1)))
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(55)) == pytest.approx(0.5, abs=1e-6)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-6)


def test_no_weight_decay_on_biases_and_layernorm():
  decays = {p: rules.decays(p) for p in (
      "encoder/layer/0/attention/self/query/kernel", "encoder/layer/0/attention/self/query/bias",
      "encoder/layer/0/output/LayerNorm/scale", "encoder/layer/0/output/LayerNorm/bias",
      "encoder/layer/0/output/dense/kernel", "embeddings/word_embeddings/embedding",
      "encoder/layer/0/attention/self/query/lora_a")}
  assert [p for p, d in decays.items() if not d] == [
      "encoder/layer/0/attention/self/query/bias", "encoder/layer/0/output/LayerNorm/scale",
      "encoder/layer/0/output/LayerNorm/bias"]


def test_weight_decay_shrinks_only_masked_params():
  c = _config(schedule="constant", warmup_frac=0.0, weight_decay=0.5, clip_norm=0.0)
  c.optim.lr = 0.1
  params = {"dense": {"kernel": jnp.ones(3), "bias": jnp.ones(3)}}
  tx = optimizer.build(c, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.05 * np.ones(3), rtol=1e-6)
  np.testing.assert_array_equal(updates["dense"]["bias"], np.zeros(3))


def test_clipping_bounds_the_global_norm():
  c = _config(schedule="constant", warmup_frac=0.0, weight_decay=0.0, clip_norm=1.0)
  c.optim.update(b1=0.0, b2=0.0, eps=0.0)
  params = {"w": jnp.zeros(4)}
  tx = optimizer.build(c, params)
  big = {"w": jnp.full(4, 100.0)}
  updates, _ = tx.update(big, tx.init(params), params)
  # With b1=b2=0 Adam's step is sign(g) * lr whatever the scale; clipping must not flip it.
  np.testing.assert_allclose(updates["w"], -np.ones(4), rtol=1e-5)


def test_optimizer_labels_name_each_checkpoint_tensor_exactly_once(tiny_bert):
  # The optimizer groups params by path (rules, weight decay); loading and
  # export name them through the family's checkpoint layout. Both must mean
  # the same tensors: every labelled param is, under its export name, the
  # tensor of the checkpoint it was loaded from, and every tensor of that
  # checkpoint is one labelled param.
  import collections
  import os
  from safetensors.numpy import load_file
  from jaxft.models import registry
  _, split = _tiny_split(tiny_bert, [])
  layout = registry.lookup(tiny_bert.config.model_type, "classify").layout
  checkpoint = load_file(os.path.join(tiny_bert.path, "model.safetensors"))
  labels = dict(param_paths.named_variables(optimizer.labels(split.params, split.assignment)))
  params = dict(param_paths.named_variables(split.params))
  assert labels.keys() == params.keys()
  assert "encoder/layer/1/attention/self/query/kernel" in labels
  names = {}
  for path, label in labels.items():
    key, transform = layout.export_name(path)
    assert key in checkpoint, (path, key)
    np.testing.assert_array_equal(transform.to_theirs(np.asarray(params[path].get_value())),
                                  checkpoint[key], err_msg=path)
    # Biases and LayerNorm scales (the 1-D tensors) are the groups without decay.
    assert label.get_value().endswith("/nodecay") == (checkpoint[key].ndim == 1), path
    names[path] = key
  counts = collections.Counter(names.values())
  assert counts.keys() == checkpoint.keys()
  assert set(counts.values()) == {1}


def _tiny_split(tiny, rule_list, **optim_overrides):
  from jaxft.formats import hf
  from jaxft.tuning import trainable
  c = _config(schedule="constant", warmup_frac=0.0, clip_norm=0.0, **optim_overrides)
  c.optim.rules = tuple(rule_list)
  model = hf.load(tiny.path, "classify", num_labels=2).model
  return c, trainable.split(model, c)


def test_lr_multiplier_half_gives_exactly_half_the_sgd_update(tiny_bert):
  from jaxft import steps
  batch = {**tiny_bert.batch(), "label": np.array([0, 1, 1], np.int32)}
  updates = {}
  for name, rule_list in (("full", []), ("half", [("encoder/layer/1/.*", 0.5), (".*", 1.0)])):
    c, split = _tiny_split(tiny_bert, rule_list, optimizer="sgd", weight_decay=0.0, lr=0.125)
    tx = optimizer.build(c, split.params, split.assignment)
    _, _, grads, _ = steps.loss_and_grads(classify.OBJECTIVE, split.graphdef, split.rest,
                                       split.params, split.frozen, batch, None, 3.0)
    u, _ = tx.update(grads, tx.init(split.params), split.params)
    updates[name] = dict(param_paths.named_variables(u))
    if name == "full":
      sgd = {p: -0.125 * np.asarray(v.get_value()) for p, v in param_paths.named_variables(grads)}
  assert updates["full"].keys() == updates["half"].keys()
  for path, full in updates["full"].items():
    full, half = np.asarray(full.get_value()), np.asarray(updates["half"][path].get_value())
    np.testing.assert_array_equal(full, sgd[path])
    assert np.any(full != 0), path
    expected = 0.5 * full if path.startswith("encoder/layer/1/") else full
    np.testing.assert_array_equal(half, expected, err_msg=path)


def test_start_step_holds_the_rate_at_zero_then_warms_up():
  spec = optimizer.Schedule(lr=1.0, kind="linear", warmup=10, total=100)
  s = optimizer.schedule(spec, rules.Rule(".*", True, lr_mult=2.0, start_step=20))
  assert [float(s(i)) for i in (0, 19, 20, 25, 30)] == pytest.approx([0, 0, 0, 1.0, 2.0])
  assert float(s(100)) == pytest.approx(0.0, abs=1e-6)


def test_a_rule_can_set_its_own_weight_decay(tiny_bert):
  c, split = _tiny_split(tiny_bert, [("classifier/.*", dict(weight_decay=0.5)), (".*", 1.0)],
                         lr=0.1, weight_decay=0.0)
  tx = optimizer.build(c, split.params, split.assignment)
  zeros = jax.tree.map(jnp.zeros_like, split.params)
  u = dict(param_paths.named_variables(tx.update(zeros, tx.init(split.params), split.params)[0]))
  p = dict(param_paths.named_variables(split.params))
  np.testing.assert_allclose(u["classifier/kernel"].get_value(),
                             -0.05 * p["classifier/kernel"].get_value(), rtol=1e-6)
  assert not np.any(u["classifier/bias"].get_value())  # Biases never decay.
  assert not np.any(u["pooler/dense/kernel"].get_value())
