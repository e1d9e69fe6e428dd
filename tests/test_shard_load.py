"""Checkpoints loaded slice by slice: each process reads only its devices' shards.

The two-process loads run in subprocesses (`tests/load_worker.py`), 2 x 4 fake
CPU devices joined by jax.distributed; this process keeps its single device.
"""

import json
import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from jaxft.formats import hf
from jaxft.formats import weights
from jaxft.models import llama
from jaxft.models import naming
from jaxft.tuning import param_paths
from tests.helpers import ROOT

# About 21 MB in float32; every dimension splits over 8 devices.
SIZES = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)


def _save_llama(folder, dtype=torch.float32, max_shard_size="5MB"):
  """A random-weight Llama saved as sharded safetensors in `folder`."""
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)).to(dtype)
  model.save_pretrained(folder, max_shard_size=max_shard_size)
  return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
  folder = _save_llama(tmp_path_factory.mktemp("llama"))
  assert (folder / weights.SAFETENSORS_INDEX).exists()
  assert len(list(folder.glob("model-*.safetensors"))) > 2
  return folder


def _checkpoint(folder) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors folder, read whole (the pre-slicing way)."""
  out = {}
  for file in sorted(folder.glob("*.safetensors")):
    with safe_open(str(file), framework="np") as f:
      out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def _params(model) -> dict[str, np.ndarray]:
  return {p: np.asarray(v.get_value())
          for p, v in param_paths.named_variables(nnx.state(model, nnx.Param))}


def _expected(folder, param_dtype) -> dict[str, np.ndarray]:
  """Our params as whole-tensor loading made them: to_ours, then astype(param_dtype)."""
  tensors = _checkpoint(folder)
  out = {}
  layout = llama.CAUSAL_LM_CHECKPOINT
  for path in _params(hf.build_model(transformers.LlamaConfig(**SIZES), "causal_lm")):
    key, transform = layout.candidates(path, "torch")[0]
    out[path] = transform.to_ours(tensors[key]).astype(param_dtype)
  return out


@pytest.mark.parametrize("transform", [naming.IDENTITY, naming.TRANSPOSE])
@pytest.mark.parametrize("shape, index", [
    ((6, 10), (slice(0, 3), slice(None))),
    ((6, 10), (slice(None), slice(5, 10))),
    ((6, 10), (slice(2, 4), slice(1, 7))),
    ((8,), (slice(4, 8),)),
    ((2, 3, 4, 5), (slice(1, 2), slice(None), slice(0, 2), slice(3, 5))),
])
def test_a_slice_of_ours_is_to_ours_of_a_slice_of_theirs(transform, shape, index):
  theirs = np.arange(np.prod(shape)).reshape(shape)
  ours = transform.to_ours(theirs)
  assert transform.our_shape(shape) == ours.shape
  np.testing.assert_array_equal(transform.to_ours(theirs[transform.their_index(index)]),
                                ours[index])


def test_a_transform_that_is_no_axis_permutation_maps_no_slice():
  flip = naming.Transform(to_ours=lambda a: a[::-1], to_theirs=lambda a: a[::-1])
  assert flip.their_index((slice(0, 2),)) is None and flip.our_shape((4,)) is None


def test_safetensors_tensors_know_shape_and_dtype_and_count_the_bytes_of_slices(tmp_path):
  folder = _save_llama(tmp_path, dtype=torch.bfloat16, max_shard_size="100MB")
  with weights.open_weights(str(folder)) as ckpt:
    tensor = ckpt.tensors["model.layers.0.mlp.down_proj.weight"]
    assert tensor.sliceable and tensor.shape == (256, 512)
    assert tensor.dtype == np.dtype(ml_dtypes.bfloat16)
    part = ckpt.read("model.layers.0.mlp.down_proj.weight", (slice(None), slice(64, 128)))
    assert part.dtype == tensor.dtype and part.shape == (256, 64)
    assert ckpt.bytes_read == 256 * 64 * 2
    whole = ckpt.read("model.layers.0.mlp.down_proj.weight")
    np.testing.assert_array_equal(part, whole[:, 64:128])
    assert ckpt.bytes_read == 256 * 64 * 2 + whole.nbytes


@pytest.mark.parametrize("checkpoint_dtype, param_dtype", [
    (torch.float32, jnp.float32),
    (torch.bfloat16, jnp.float32),
    (torch.bfloat16, jnp.bfloat16),
])
def test_slice_reads_load_exactly_what_whole_tensor_reads_did(
    tmp_path, checkpoint_dtype, param_dtype):
  folder = _save_llama(tmp_path, dtype=checkpoint_dtype)
  loaded = hf.load(str(folder), "causal_lm", param_dtype=param_dtype)
  assert not loaded.report.missing and not loaded.report.unexpected
  # One device: every tensor read once, whole.
  assert loaded.report.bytes_read == sum(t.nbytes for t in _checkpoint(folder).values())
  params, expected = _params(loaded.model), _expected(folder, param_dtype)
  assert params.keys() == expected.keys()
  for path, value in expected.items():
    assert params[path].dtype == value.dtype, path
    np.testing.assert_array_equal(params[path], value, err_msg=path)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


MODES = ("slices", "replicas", "whole-kernels")  # tests/load_worker.py's; this order.


@pytest.fixture(scope="module")
def two_process_loads(llama_folder, tmp_path_factory):
  """tests/load_worker.py in 2 processes x 4 CPU devices, both modes: (JSON lines by
  mode, one per process; the folder of process 0's gathered params)."""
  out = tmp_path_factory.mktemp("loads")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  coordinator = f"localhost:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, "-m", "tests.load_worker", str(llama_folder),
                             str(out), coordinator, "2", str(pid), *MODES],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for pid in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = {}
  for stdout, _ in outs:
    # Gloo logs its connections to stdout too.
    for line in stdout.splitlines():
      if line.startswith("{"):
        result = json.loads(line)
        results.setdefault(result["mode"], []).append(result)
  assert all(len(results.get(mode, ())) == 2 for mode in MODES), results
  return results, out


def test_two_processes_on_fsdp_8_each_read_half_the_checkpoint_and_load_it_exactly(
    llama_folder, two_process_loads):
  results, out = two_process_loads
  total = sum(t.nbytes for t in _checkpoint(llama_folder).values())
  for r in results["slices"]:
    assert r["devices"] == 8 and not r["missing"] and not r["unexpected"]
    assert r["param_bytes_per_device"] == r["param_bytes"] // 8  # Really sharded.
    assert r["bytes_read"] <= 0.6 * total
  # Between them, the processes read every byte of the checkpoint exactly once.
  assert sum(r["bytes_read"] for r in results["slices"]) == total
  with np.load(out / "params-slices.npz") as f:
    gathered = dict(f)
  single = _params(hf.load(str(llama_folder), "causal_lm").model)
  assert gathered.keys() == single.keys()
  for path, value in single.items():
    np.testing.assert_array_equal(gathered[path], value, err_msg=path)


def test_a_transform_without_slice_mapping_reads_each_tensor_whole_once_per_process(
    llama_folder, two_process_loads):
  results, out = two_process_loads
  tensors = _checkpoint(llama_folder)
  kernels = sum(t.nbytes for k, t in tensors.items() if "proj" in k or k == "lm_head.weight")
  rest = sum(t.nbytes for t in tensors.values()) - kernels
  for r in results["whole-kernels"]:
    # Kernels whole (not once per device: 4x), everything else by its half.
    assert r["bytes_read"] == kernels + rest // 2
  with np.load(out / "params-whole-kernels.npz") as f:
    q_proj = f["model/layers/1/self_attn/q_proj/kernel"]
  np.testing.assert_array_equal(q_proj, tensors["model.layers.1.self_attn.q_proj.weight"].T)


def test_devices_holding_the_same_slice_share_one_read(llama_folder, two_process_loads):
  results, out = two_process_loads
  total = sum(t.nbytes for t in _checkpoint(llama_folder).values())
  for r in results["replicas"]:
    assert r["param_bytes_per_device"] == r["param_bytes"] // 2  # fsdp=2, data=4.
    # A process's 4 devices hold at most the 2 halves of each tensor: one read
    # each (a read per device would be twice the checkpoint).
    assert r["bytes_read"] <= total
  with np.load(out / "params-replicas.npz") as f:
    np.testing.assert_array_equal(f["model/embed_tokens/embedding"],
                                  _checkpoint(llama_folder)["model.embed_tokens.weight"])
