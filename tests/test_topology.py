"""TPU slice names, the libtpu quieting, and the mesh over a topology's devices."""

import subprocess
import sys

import pytest

from jaxft.aot import topology
from jaxft.errors import UserError
from tests.helpers import ROOT


@pytest.mark.parametrize("name, generation, shape, chips", [
    ("v5p-128", "v5p", (4, 4, 4), 64),       # v5p counts TensorCores: 2 per chip
    ("v4-32", "v4", (2, 2, 4), 16),
    ("v5litepod-8", "v5e", (2, 4), 8),       # v5e and v6e count chips
    ("v5e-16", "v5e", (4, 4), 16),
    ("v6e-256", "v6e", (16, 16), 256),
    ("v5p:4x4x8", "v5p", (4, 4, 8), 128),    # a shape named directly
    ("V6E-64", "v6e", (8, 8), 64),
])
def test_accelerator_types_name_their_chips(name, generation, shape, chips):
  t = topology.parse(name)
  assert (t.chip.generation, t.shape, t.chips) == (generation, shape, chips)


def test_multislice_multiplies_the_chips():
  t = topology.parse("v5p-16", num_slices=4)
  assert (t.chips_per_slice, t.chips) == (8, 32)
  assert "4 slices" in t.describe()


@pytest.mark.parametrize("name, says", [
    ("v5p-7", "counts TensorCores"),
    ("v6e-12", "known sizes"),
    ("v9-8", "unknown TPU topology"),
    ("v5p:4x4", "3D"),
    ("h100-8", "unknown TPU topology"),
])
def test_a_wrong_name_is_a_clear_error(name, says):
  with pytest.raises(UserError, match=says):
    topology.parse(name)


def test_headroom_leaves_usable_hbm_below_capacity():
  t = topology.parse("v5litepod-8")
  assert t.hbm_usable_bytes == int(16 * topology.GiB * (1 - topology.HEADROOM))


def test_installed_libtpu_keeps_cpu_start_up_quiet_and_on_the_cpu():
  """With libtpu in the venv and no TPU attached, JAX starts on the CPU with
  an empty stderr (libtpu would otherwise print its metadata warnings)."""
  pytest.importorskip("libtpu")
  code = "import jaxft, jax; print(jax.default_backend(), len(jax.devices()))"
  env = {k: v for k, v in __import__("os").environ.items()
         if not k.startswith("TPU_") and k != "JAX_PLATFORMS"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["cpu", "1"]
  assert out.stderr.strip() == ""


def test_a_mesh_that_splits_a_torus_axis_is_still_built():
  """fsdp 32 x tensor 2 over v5p-128's 4x4x4 chips needs a physical axis split in two."""
  pytest.importorskip("libtpu")
  from jaxft import defaults, sharding  # pylint: disable=g-import-not-at-top
  c = defaults.recipe("sft")
  c.mesh.update(fsdp=32, tensor=2)
  mesh = sharding.make_mesh(c, topology.parse("v5p-128").devices())
  assert dict(mesh.shape) == {"data": 1, "fsdp": 32, "tensor": 2}
  assert len({d.id for d in mesh.devices.flat}) == 64


@pytest.mark.parametrize("name", ["v4-8", "v5p-8", "v5litepod-4", "v6e-4"])
def test_mfu_takes_each_tpu_chips_peak_by_what_its_devices_report(name):
  """One table of chip figures: a v5p device says "TPU v5" (no "p"), which a
  substring table keyed "TPU v5p" missed, falling back to a measured matmul."""
  pytest.importorskip("libtpu")
  from jaxft import mfu  # pylint: disable=g-import-not-at-top
  t = topology.parse(name)
  [kind] = {d.device_kind for d in t.devices()}
  assert kind == t.chip.device_kind
  assert mfu.peak_flops(t.devices()[0]) == t.chip.peak_flops
