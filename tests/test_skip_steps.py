"""Non-finite and spiking steps are skipped inside the jitted step; a streak of them stops a run."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxft import config as config_lib
from jaxft import defaults
from jaxft import run as run_lib
from jaxft import steps
from jaxft import train
from jaxft.errors import UserError
from tests.helpers import jaxft_in_process, tiny_config, tiny_flags


def _train_lines(workdir):
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in records if r["split"] == "train"}


def _assert_bitwise_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                                          strict=True), a, b)


def _restored(workdir, step):
  return jax.tree.map(np.asarray, run_lib.restore(str(workdir), step=step)[1].state)


# --- the step alone, on a linear model ---------------------------------------------------


def _toy(max_skipped_steps=0, skip_spikes=0.0, lr=1e-2):
  """(jitted step, initial state) of a 2 -> 1 linear regression: no transformer to compile."""
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  objective = steps.Objective(
      forward=lambda m, batch, deterministic, rngs: m(batch["x"])[:, 0],
      loss_sums=lambda out, batch: (jnp.sum((out - batch["y"]) ** 2), {}),
      units=lambda batch: jnp.float32(batch["x"].shape[0]))
  tx = optax.adam(lr)
  step = jax.jit(functools.partial(
      steps.train_step, objective=objective, graphdef=graphdef, rest=rest, tx=tx, grad_accum=1,
      dropout_key=jax.random.key(0), max_skipped_steps=max_skipped_steps,
      skip_spikes=skip_spikes))
  return step, steps.init_state(params, nnx.State({}), tx)


def _batch(y=1.0, x=1.0):
  return {"x": jnp.full((4, 2), x, jnp.float32), "y": jnp.full((4,), y, jnp.float32)}


def test_a_non_finite_step_leaves_params_and_optimizer_state_bitwise_unchanged():
  step, state = _toy()
  state, _ = step(state, _batch())
  for bad in (_batch(x=jnp.nan), _batch(y=jnp.inf)):  # A NaN loss; an infinite one.
    before = jax.tree.map(np.asarray, state)
    state, m = step(state, bad)
    assert not np.isfinite(m["loss"])
    _assert_bitwise_equal(before["params"], state["params"])
    _assert_bitwise_equal(before["opt_state"], state["opt_state"])
    assert int(state["step"]) == before["step"] + 1  # The data moves on.
  assert int(m["skipped_steps"]) == int(state["skip"]["total"]) == 2
  assert int(state["skip"]["in_row"]) == 2
  before = jax.tree.map(np.asarray, state["params"])
  state, m = step(state, _batch())
  assert np.isfinite(m["loss"]) and int(state["skip"]["in_row"]) == 0
  assert int(m["skipped_steps"]) == 2
  assert not np.array_equal(jax.tree.leaves(before)[0], jax.tree.leaves(state["params"])[0])


def test_max_skipped_steps_in_a_row_latches_the_step_that_reached_it():
  step, state = _toy(max_skipped_steps=2)
  state, _ = step(state, _batch())  # Step 1 applies.
  state, _ = step(state, _batch(x=jnp.nan))  # Step 2: one in a row.
  assert int(state["skip"]["limit_step"]) == 0
  for _ in range(2):  # Step 3 reaches the limit; step 4 keeps the latch where it was.
    state, _ = step(state, _batch(x=jnp.nan))
  skip = state["skip"]
  assert (int(skip["limit_step"]), int(skip["in_row"]), int(skip["total"])) == (3, 3, 3)
  assert np.isnan(skip["limit_loss"])
  cleared = steps.clear_limit(state)["skip"]
  assert int(cleared["limit_step"]) == int(cleared["in_row"]) == 0
  assert int(cleared["total"]) == 3
  _, m = step(steps.clear_limit(state), _batch())
  assert int(m["skipped_steps"]) == 3


def test_skip_spikes_skips_a_loss_far_above_the_running_median():
  step, state = _toy(skip_spikes=3.0, lr=1e-4)
  spike = _batch(y=30.0)  # About 100 x the loss of the others.
  state, m = step(state, spike)  # Too few losses for a median yet: applied.
  assert int(m["skipped_steps"]) == 0
  for _ in range(steps.SPIKE_MIN_LOSSES):
    state, m = step(state, _batch())
  before = jax.tree.map(np.asarray, state)
  state, m = step(state, spike)
  assert int(m["skipped_steps"]) == 1 and np.isfinite(m["loss"])
  _assert_bitwise_equal(before["params"], state["params"])
  _assert_bitwise_equal(before["skip"]["losses"], state["skip"]["losses"])  # Not in the median.
  state, m = step(state, _batch(y=1.5))  # Within 3 x the median: applied.
  assert int(m["skipped_steps"]) == 1
  off, state_off = _toy(skip_spikes=0.0, lr=1e-4)
  for batch in [_batch()] * steps.SPIKE_MIN_LOSSES + [spike]:
    state_off, m = off(state_off, batch)
  assert int(m["skipped_steps"]) == 0  # Off: only non-finite steps are skipped.


# --- config -----------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("max_skipped_steps", -1, "config.train.max_skipped_steps must be >= 0 (0: never stop), "
                              "got -1"),
    ("skip_spikes", 0.5, "config.train.skip_spikes must be 0 (off) or > 1, got 0.5"),
    ("skip_spikes", -2.0, "config.train.skip_spikes must be 0 (off) or > 1, got -2.0"),
])
def test_bad_skip_settings_are_config_errors(key, value, message):
  c = defaults.recipe("classify")
  c.model.path, c.data.train = "model", "train.jsonl"
  config_lib.validate(c)  # The defaults pass.
  c.train[key] = value
  with pytest.raises(UserError) as e:
    config_lib.validate(c)
  assert str(e.value) == message


def test_a_nan_batch_is_skipped_and_the_run_finishes(tiny_setup, tmp_path, monkeypatch):
  monkeypatch.setenv(train.NAN_STEPS_ENV, "3")
  config = tiny_config(tiny_setup, num_steps=4, log_every=1)
  config.checkpoint.update(every=1, keep=10)
  result = train.train(config, str(tmp_path))
  assert result["step"] == 4 and np.isfinite(result["loss"])
  lines = _train_lines(tmp_path)
  assert [lines[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
  assert np.isnan(lines[3]["loss"]) and np.isfinite(lines[4]["loss"])
  two, three, four = (_restored(tmp_path, s) for s in (2, 3, 4))
  _assert_bitwise_equal(two["params"], three["params"])
  _assert_bitwise_equal(two["opt_state"], three["opt_state"])
  assert int(three["skip"]["total"]) == 1
  # Step 4 applies again, from the weights of step 2.
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(three["params"]),
                                                      jax.tree.leaves(four["params"])))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(four["params"]))


def test_non_finite_steps_in_a_row_stop_the_run_saved(tiny_setup, tmp_path, monkeypatch):
  w = tmp_path / "w"
  flags = tiny_flags(tiny_setup, w, "--config.train.num_steps=6", "--config.train.log_every=5",
                     "--config.checkpoint.every=0", "--config.train.max_skipped_steps=2")
  monkeypatch.setenv(train.NAN_STEPS_ENV, "2,3,4")
  stopped = jaxft_in_process("train", *flags)
  # The streak reached 2 at step 3; the loop saw it at its next sync, the log at step 5.
  assert stopped.returncode == 2, stopped.stderr
  assert ("jaxft: error: 2 steps in a row were skipped (steps 2..3; at step 3 loss nan, "
          "gradient norm nan: not finite); checkpoint saved at step 5") in stopped.stderr
  assert "rerun the same command to go on from the checkpoint" in stopped.stderr
  assert sorted(p.name for p in (w / "checkpoints").iterdir() if p.name.isdigit()) == ["5"]
  assert _train_lines(w)[5]["skipped_steps"] == 3
  saved = _restored(w, 5)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["params"]))
  assert (int(saved["skip"]["total"]), int(saved["skip"]["limit_step"])) == (3, 0)
  monkeypatch.delenv(train.NAN_STEPS_ENV)
  again = jaxft_in_process("train", *flags)  # The rerun goes on from step 5 to the end.
  assert again.returncode == 0, again.stderr
  assert json.loads(again.stdout.strip().splitlines()[-1])["step"] == 6


def test_a_checkpoint_saved_before_the_counters_existed_resumes(tiny_setup, tmp_path,
                                                                monkeypatch):
  def old_save(self, step, metrics=None, meta=None):  # As jaxft saved before state["skip"]
    state = {k: v for k, v in self.state.items() if k not in ("skip", "stats")}  # and "stats".
    self.checkpointer.save(step, state, {**(meta or {}), "step": step}, metrics)

  with monkeypatch.context() as patch:
    patch.setattr(run_lib.Run, "save", old_save)
    train.train(tiny_config(tiny_setup, num_steps=2), str(tmp_path))
  monkeypatch.setenv(train.NAN_STEPS_ENV, "4")
  assert train.train(tiny_config(tiny_setup, num_steps=4), str(tmp_path))["step"] == 4
  assert int(_restored(tmp_path, 4)["skip"]["total"]) == 1  # Counted from the resumed step.
