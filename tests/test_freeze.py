"""Frozen parameters cost nothing and stay exactly as pretrained; `jaxft inspect` shows it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from safetensors.numpy import load_file

from jaxft import inspect
from jaxft import tasks
from jaxft import train
from jaxft import run as run_lib
from jaxft import commands
from jaxft import defaults
from jaxft.tasks import classify
from tests.helpers import tiny_config

FREEZE_BOTTOM = (("embeddings/.*", None), ("encoder/layer/[0-3]/.*", None), (".*", 1.0))


def _minilm_config(root, minilm_path, **overrides):
  c = tiny_config(root, num_steps=4)
  c.model.path = minilm_path
  c.data.max_length = 32
  c.optim.update(warmup_frac=0.0, rules=FREEZE_BOTTOM)
  c.update_from_flattened_dict(overrides)
  return c


def test_frozen_tensors_export_bit_identical_and_trainable_ones_change(
    tiny_setup, minilm_path, tmp_path):
  config = _minilm_config(tiny_setup, minilm_path)
  train.train(config, str(tmp_path / "w"))
  commands.export_command(str(tmp_path / "w"), str(tmp_path / "hf"))
  before = load_file(os.path.join(minilm_path, "model.safetensors"))
  after = {k.removeprefix("bert."): v
           for k, v in load_file(str(tmp_path / "hf" / "model.safetensors")).items()}
  frozen = [k for k in after if k.startswith(("embeddings.", *(f"encoder.layer.{i}." for i in range(4))))]
  trained = [k for k in after if k.startswith(("encoder.layer.4.", "encoder.layer.5.", "pooler."))]
  assert len(frozen) == 5 + 4 * 16 and len(trained) == 2 * 16 + 2
  for key in frozen:
    assert after[key].dtype == before[key].dtype and np.array_equal(after[key], before[key]), key
  for key in trained:
    assert not np.array_equal(after[key], before[key]), key


def test_frozen_params_get_no_optimizer_state_and_no_update(tiny_setup, tmp_path):
  config = tiny_config(tiny_setup, num_steps=3)
  config.optim.rules = (("encoder/layer/0/.*", None), ("embeddings/.*", None), (".*", 1.0))
  labels = ["neg", "pos"]
  run = run_lib.open_run(config, str(tmp_path), config.model.path, labels, quiet=True)
  run.checkpointer.close()
  frozen_before = jax.tree.map(np.asarray, run.state["frozen"])
  trainable = inspect.tree_size(run.state["params"])
  # AdamW keeps two moments per trainable parameter and nothing for frozen ones,
  # plus two step counters in each of the groups (decayed, not decayed).
  assert inspect.tree_size(run.state["opt_state"]) == 2 * trainable + 2 * 2
  paths = {p for p in run.split.assignment.of if p.startswith(("embeddings/", "encoder/layer/0/"))}
  assert paths and not paths & run.split.assignment.trainable()
  train.train(config, str(tmp_path))
  run = run_lib.open_run(config, str(tmp_path), config.model.path, labels, quiet=True)
  run.checkpointer.close()
  assert run.step == 3
  jax.tree.map(np.testing.assert_array_equal, frozen_before,
               jax.tree.map(np.asarray, run.state["frozen"]))


def test_frozen_params_can_be_stored_in_bfloat16(tiny_setup, tmp_path):
  config = tiny_config(tiny_setup, num_steps=2)
  config.optim.rules = (("encoder/.*", None), (".*", 1.0))
  config.model.frozen_dtype = "bfloat16"
  result = train.train(config, str(tmp_path))
  run = run_lib.open_run(config, str(tmp_path), config.model.path, ["neg", "pos"], quiet=True)
  run.checkpointer.close()
  assert {x.dtype for x in jax.tree.leaves(run.state["frozen"])} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(run.state["params"])} == {jnp.dtype(jnp.float32)}
  assert np.isfinite(result["loss"])


def test_inspect_shows_freezing_and_lora_shrink_flops_and_optimizer_state(minilm_path):
  # The recipe: MiniLM, batch 32, length 128; compiled, never run.
  def figures(**overrides):
    c = defaults.recipe("classify")
    c.model.path = minilm_path
    c.data.max_length = 128
    c.update_from_flattened_dict(overrides)
    return inspect.inspect(c)
  full = figures()
  frozen = figures(**{"optim.rules": FREEZE_BOTTOM})
  lora = figures(**{"lora.rank": 8, "lora.targets": r".*/attention/self/(query|value)"})
  # Every parameter of transformers' own model of the checkpoint with a 2-class head.
  torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(
      minilm_path, num_labels=2)
  assert full["params_trainable"] == full["params_total"] == sum(
      p.numel() for p in torch_model.parameters())
  assert full["optimizer_state_bytes"] >= 2 * 4 * full["params_total"]
  assert frozen["step_flops"] <= 0.6 * full["step_flops"]
  assert frozen["optimizer_state_bytes"] <= 0.2 * full["optimizer_state_bytes"]
  assert frozen["peak_memory_bytes"] < full["peak_memory_bytes"]
  assert lora["optimizer_state_bytes"] <= 0.05 * full["optimizer_state_bytes"]
  assert lora["params_trainable"] == 6 * 2 * 2 * 384 * 8 + 384 * 2 + 2


def test_training_only_the_head_costs_one_forward_pass_and_no_backward(minilm_path):
  # Nothing below the head trains, so the step needs no activation gradients
  # at all: its FLOPs are the forward pass's plus dropout's (~2%), where a
  # backward pass through the encoder would add about twice the forward.
  import functools
  from jaxft.tuning import trainable
  c = defaults.recipe("classify")
  c.model.path = minilm_path
  c.optim.rules = (("classifier/.*", 1.0), (".*", None))
  task = tasks.of(c)
  hf_config = task.hf_config(minilm_path, ["neg", "pos"])
  split = trainable.split(trainable.abstract_model(hf_config, c, task.name), c)
  batch = task.abstract_batch(minilm_path)
  compiled, state, _ = inspect.compile_step(c, split, batch, task)
  step_flops, _ = inspect.compiled_costs(compiled)
  forward = jax.jit(functools.partial(classify.eval_step, graphdef=split.graphdef, rest=split.rest))
  forward_flops, _ = inspect.compiled_costs(
      forward.lower(state["params"], state["frozen"], batch).compile())
  assert forward_flops <= step_flops <= 1.05 * forward_flops
