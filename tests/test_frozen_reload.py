"""Checkpoints of LoRA and partly frozen runs keep only what trains; resume re-reads the base.

The frozen weights come back from the base checkpoint, which the checkpoint
names and fingerprints (file sizes, hash of the tensor index): resuming must
be bit-identical to never stopping, and resuming on another base must fail.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxft import run as run_lib
from jaxft import train
from jaxft.errors import UserError
from jaxft import defaults
from jaxft.formats import fingerprint
from jaxft.formats import hub
from tests.helpers import tiny_config


def _smollm2_lora(path, steps):
  c = defaults.recipe("sft")
  c.model.path = path
  c.data.max_length = 64
  c.data.eval = ""
  c.lora.rank = 4
  c.train.update(batch_size=2, num_steps=steps, log_every=1)
  c.checkpoint.update(every=2, keep=5)
  return c


def _reopen(config, workdir):
  run = run_lib.open_run(config, str(workdir), hub.resolve_model(config.model.path),
                         run_lib.read_labels(str(workdir)), quiet=True)
  run.checkpointer.close()
  return run


def _bytes_under(folder: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  return {e["step"]: e["loss"] for e in map(json.loads, (workdir / "metrics.jsonl").read_text()
                                             .splitlines()) if e["split"] == "train"}


def _saved_state(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
  """The arrays of checkpoint `step` as saved (no model built, nothing re-read)."""
  manager = ocp.CheckpointManager(workdir / "checkpoints")
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(state["state"])[0]}


def test_smollm2_lora_checkpoint_is_its_adapters_and_resumes_bit_identical(
    smollm2_path, tmp_path):
  config = _smollm2_lora(smollm2_path, 4)
  straight, stopped = tmp_path / "straight", tmp_path / "stopped"
  train.train(config, str(straight))
  # As if the run had died after saving step 2.
  shutil.copytree(straight, stopped)
  shutil.rmtree(stopped / "checkpoints" / "4")
  (stopped / "metrics.jsonl").unlink()
  train.train(config, str(stopped))
  assert {s: _losses(straight)[s] for s in (3, 4)} == _losses(stopped)
  a, b = _saved_state(straight, 4), _saved_state(stopped, 4)
  assert a.keys() == b.keys()
  assert not [k for k in a if "frozen" in k] and [k for k in a if "lora_a" in k]
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  trained = sum(v.nbytes for v in a.values())
  saved = _bytes_under(straight / "checkpoints" / "4")
  print(f"checkpoint 4: {saved} bytes; adapters + optimizer state {trained}")
  assert saved <= 1.5 * trained, (saved, trained)


def test_resuming_on_another_base_checkpoint_is_a_clear_error(tiny_setup, tmp_path):
  config = tiny_config(tiny_setup, num_steps=3)
  config.lora.rank = 2
  train.train(config, str(tmp_path / "run"))
  other = tmp_path / "other-model"
  shutil.copytree(tiny_setup / "model", other)
  config_json = json.loads((other / "config.json").read_text())
  (other / "config.json").write_text(json.dumps({**config_json, "hidden_dropout_prob": 0.3}))
  config.model.path = str(other)
  config.train.num_steps = 6
  with pytest.raises(UserError, match="re-reads the frozen ones from its base checkpoint"):
    train.train(config, str(tmp_path / "run"))


def test_a_full_fine_tune_checkpoint_still_holds_every_parameter(tiny_setup, tmp_path):
  config = tiny_config(tiny_setup, num_steps=3)
  train.train(config, str(tmp_path / "run"))
  run = _reopen(config, tmp_path / "run")
  assert run.base is None and not jax.tree.leaves(run.state["frozen"])


def test_fingerprint_tells_files_apart_by_size_and_index(tiny_setup, tmp_path):
  folder = tmp_path / "model"
  shutil.copytree(tiny_setup / "model", folder)
  before = fingerprint.of(str(folder))
  assert fingerprint.differences(before, fingerprint.of(str(folder))) == []
  with open(folder / "model.safetensors", "ab") as f:
    f.write(b"\0")
  assert fingerprint.differences(before, fingerprint.of(str(folder))) == [
      f"model.safetensors: {before['sizes']['model.safetensors']} -> "
      f"{before['sizes']['model.safetensors'] + 1} bytes"]
