"""Meshes: same losses on every mesh, FSDP memory, resharding restore, two processes.

Multi-device runs happen in subprocesses with 8 (or 2 x 4) fake CPU devices
(`tests/mesh_worker.py`); this process keeps its single device.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxft import config as config_lib
from jaxft import sharding
from jaxft import train
from jaxft.errors import UserError
from tests.helpers import ROOT
from tests.helpers import tiny_config
from jaxft import run as run_lib

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]


def _workers(root, jobs, steps, devices=8, dist=None, background=False):
  """tests/mesh_worker.py on `jobs` ((workdir, mesh) pairs, in turn, one process)."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  args = [sys.executable, "-m", "tests.mesh_worker", str(root), str(steps),
          *(f"{w}:{'x'.join(map(str, m))}" for w, m in jobs), *map(str, dist or ())]
  if background:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(l) for l in proc.stdout.strip().splitlines()[-len(jobs):]]


def _worker(root, workdir, mesh, steps, devices=8, dist=None, background=False):
  """One job of `_workers`: its JSON line (or, in the background, the process)."""
  out = _workers(root, [(workdir, mesh)], steps, devices, dist, background)
  return out if background else out[0]


def _dump(workdir, result):
  with np.load(os.path.join(workdir, result["dump"])) as f:
    return dict(f)


def _one_device(root, workdir, steps):
  """Trains (or resumes) in this single-device process; returns (losses, state leaves)."""
  config = tiny_config(root, num_steps=steps, log_every=1)
  config.train.eval_batch_size = 16
  config.checkpoint.update(every=5, keep=5)
  train.train(config, str(workdir))
  events = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  run = run_lib.open_run(config, str(workdir), config.model.path, run_lib.read_labels(str(workdir)),
                       quiet=True)
  run.checkpointer.close()
  leaves = jax.tree_util.tree_flatten_with_path(run.state)[0]
  state = {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}
  return {str(e["step"]): e["loss"] for e in events if e["split"] == "train"}, state


@pytest.fixture(scope="module")
def mesh_runs(tiny_setup, tmp_path_factory):
  """10 steps on one device and on each mesh of MESHES (8 devices)."""
  root = tmp_path_factory.mktemp("meshes")
  one, _ = _one_device(tiny_setup, root / "one", 10)
  results = _workers(tiny_setup, [(root / "x".join(map(str, m)), m) for m in MESHES], 10)
  runs = dict(zip(MESHES, results))
  return root, one, runs


def test_the_same_steps_give_the_same_losses_on_every_mesh(mesh_runs):
  _, one, runs = mesh_runs
  assert len(one) == 10
  for mesh, result in runs.items():
    assert result["devices"] == 8 and result["step"] == 10
    np.testing.assert_allclose([result["losses"][k] for k in one], list(one.values()),
                               rtol=1e-4, err_msg=str(mesh))


def test_fsdp_8_keeps_an_eighth_of_params_and_optimizer_state_per_device(mesh_runs):
  fsdp = mesh_runs[2][(1, 8, 1)]
  assert fsdp["param_bytes_per_device"] <= (1 / 8 + 0.05) * fsdp["param_bytes"]
  assert fsdp["opt_bytes_per_device"] <= (1 / 8 + 0.05) * fsdp["opt_bytes"]
  data = mesh_runs[2][(8, 1, 1)]  # Pure data parallel replicates everything.
  assert data["param_bytes_per_device"] == data["param_bytes"]


def test_fsdp_checkpoint_restores_bit_identical_on_one_device_and_on_2x4(
    mesh_runs, tmp_path, tiny_setup):
  root, _, runs = mesh_runs
  saved = _dump(root / "1x8x1", runs[(1, 8, 1)])
  for name in ("single", "2x4"):
    shutil.copytree(root / "1x8x1", tmp_path / name)
  _, restored = _one_device(tiny_setup, tmp_path / "single", 10)  # At step 10: restore only.
  on_2x4 = _worker(tiny_setup, tmp_path / "2x4", (2, 4, 1), 0)
  assert saved.keys() == restored.keys()
  for key, value in saved.items():
    np.testing.assert_array_equal(restored[key], value, err_msg=key)
    np.testing.assert_array_equal(_dump(tmp_path / "2x4", on_2x4)[key], value, err_msg=key)
  # And both go on training from there.
  losses, _ = _one_device(tiny_setup, tmp_path / "single", 12)
  assert set(losses) >= {"11", "12"}
  assert _worker(tiny_setup, tmp_path / "2x4", (2, 4, 1), 12)["step"] == 12


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one_process_and_their_checkpoint_resumes_in_one(
    mesh_runs, tmp_path, tiny_setup):
  workdir = tmp_path / "two"
  coordinator = f"localhost:{_free_port()}"
  procs = [_worker(tiny_setup, workdir, (1, -1, 1), 10, devices=4,
                   dist=(coordinator, 2, pid), background=True) for pid in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  first = json.loads(outs[0][0].strip().splitlines()[-1])
  assert first["devices"] == 8
  single = mesh_runs[2][(1, 8, 1)]
  np.testing.assert_allclose([first["losses"][k] for k in single["losses"]],
                             list(single["losses"].values()), rtol=1e-4)
  losses, _ = _one_device(tiny_setup, workdir, 12)
  assert set(losses) >= {"11", "12"}


@pytest.mark.parametrize("mesh, devices, expected", [
    (dict(data=1, fsdp=-1, tensor=1), 8, {"data": 1, "fsdp": 8, "tensor": 1}),
    (dict(data=2, fsdp=-1, tensor=2), 8, {"data": 2, "fsdp": 2, "tensor": 2}),
    (dict(data=1, fsdp=1, tensor=1), 1, {"data": 1, "fsdp": 1, "tensor": 1}),
])
def test_mesh_fills_the_minus_one_axis(mesh, devices, expected):
  c = config_lib.base()
  c.mesh.update(mesh)
  assert sharding.mesh_shape(c, devices) == expected


@pytest.mark.parametrize("mesh, message", [
    (dict(data=2, fsdp=1, tensor=1), "needs 2 devices; there are 8"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one may be -1"),
    (dict(data=3, fsdp=-1, tensor=1), "3 does not divide the device count \\(8\\)"),
])
def test_impossible_meshes_are_clear_errors(mesh, message):
  c = config_lib.base()
  c.mesh.update(mesh)
  with pytest.raises(UserError, match=message):
    sharding.mesh_shape(c, 8)


def test_batches_and_heads_must_split_over_the_mesh():
  mesh = jax.make_mesh((1, 1, 1), sharding.AXES)
  sizes = dict(batch_size=32, grad_accum=1, eval_batch_size=64)
  sharding.check_fits(mesh, num_heads=4, **sizes)

  class FakeMesh:
    shape = {"data": 2, "fsdp": 3, "tensor": 8}
  with pytest.raises(UserError, match="do not split over data x fsdp = 6"):
    sharding.check_fits(FakeMesh, num_heads=12, **sizes)
  sizes.update(batch_size=36, eval_batch_size=66)
  with pytest.raises(UserError, match="12 attention heads do not split over config.mesh.tensor=8"):
    sharding.check_fits(FakeMesh, num_heads=12, **sizes)


def test_logical_rules_map_names_and_fall_back_to_replication():
  class FakeMesh:
    shape = {"data": 2, "fsdp": 4, "tensor": 2}
  rules = sharding.logical_rules(config_lib.base())
  assert sharding.spec(("embed", "mlp"), (64, 128), FakeMesh, rules) == P("fsdp", "tensor")
  # fsdp is taken by the first dim; 37 does not divide by tensor=2.
  assert sharding.spec(("embed", "embed"), (64, 64), FakeMesh, rules) == P("fsdp", None)
  assert sharding.spec(("embed", "mlp"), (64, 37), FakeMesh, rules) == P("fsdp", None)
  assert sharding.spec(("batch", "length", "embed"), (8, 16, 64), FakeMesh, rules) == P(
      ("data", "fsdp"), None, None)
  c = config_lib.base()
  c.mesh.rules = (("embed", None), ("vocab", ("fsdp", "tensor")))
  rules = sharding.logical_rules(c)
  assert sharding.spec(("vocab", "embed"), (64, 64), FakeMesh, rules) == P(("fsdp", "tensor"), None)
  c.mesh.rules = (("embed", "model"),)
  with pytest.raises(UserError, match="names mesh axis 'model'"):
    sharding.logical_rules(c)
