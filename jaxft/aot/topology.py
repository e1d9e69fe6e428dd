"""Cloud TPU slices by the names users rent them by, for ahead-of-time compiles.

`jaxft inspect --topology=v5p-128` and `jaxft plan` compile the real train
step for a TPU slice that this machine does not have: the `libtpu` wheel lets
JAX describe the slice's devices (`jax.experimental.topologies`) and run the
TPU compiler against a mesh of them on a CPU.

Names are Cloud TPU accelerator types: v4 and v5p count TensorCores (two per
chip: `v5p-128` is 64 chips), v5e (`v5litepod-N` or `v5e-N`) and v6e count
chips. `GEN:AxBxC` (e.g. `v5p:4x4x8`) names a shape directly.

Chip figures are Google's published per-chip specifications (Cloud TPU docs,
system architecture pages), read 2026-12: HBM capacity, bf16 peak and
bidirectional ICI bandwidth. They feed estimates only; the compiler's memory
analysis, not these, decides whether a step fits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import importlib.util
import math
import os
import re
import sys
from typing import Any, Iterator

from jaxft.errors import UserError

GiB = 1024 ** 3

# XLA's allocator fragments and the TPU runtime reserves some HBM for itself
# (program binaries, infeed buffers): a step whose compiled peak is within
# this fraction of capacity is called too tight to fit.
HEADROOM = 0.10


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's per-chip figures.

  Attributes:
    generation: the name's prefix: v4, v5p, v5e, v6e.
    hbm_bytes: HBM capacity.
    peak_flops: dense bf16 peak, FLOP/s.
    ici_bytes_per_s: bidirectional inter-chip interconnect bandwidth.
    cores_per_chip: TensorCores an accelerator-type name counts per chip.
    dims: 3 for a 3D torus (v4, v5p), 2 for a 2D one (v5e, v6e).
    device_kind: what JAX's devices of this chip report (a v5p says "TPU v5").
  """
  generation: str
  hbm_bytes: int
  peak_flops: float
  ici_bytes_per_s: float
  cores_per_chip: int
  dims: int
  device_kind: str


CHIPS = {
    # ICI: v4's docs give no per-chip figure; 6 links x 50 GB/s from the TPU v4 paper.
    "v4": Chip("v4", 32 * GiB, 275e12, 300e9, 2, 3, "TPU v4"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 1200e9, 2, 3, "TPU v5"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 400e9, 1, 2, "TPU v5 lite"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 800e9, 1, 2, "TPU v6 lite"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}

# Chips -> slice shape, as Cloud TPU builds the common slices.
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16), 6144: (16, 16, 24)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice (or `num_slices` identical slices joined by the data-center network)."""
  name: str
  chip: Chip
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def hbm_usable_bytes(self) -> int:
    return int(self.chip.hbm_bytes * (1 - HEADROOM))

  def describe(self) -> str:
    slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
    return (f"{self.name}: TPU {self.chip.generation} {'x'.join(map(str, self.shape))}"
            f"{slices}, {self.chips} chips, {self.chip.hbm_bytes / GiB:.0f} GiB HBM each")

  def devices(self) -> list[Any]:
    """The slice's TPU devices (descriptions: they compile, they do not run)."""
    return list(_topology_desc(self.chip.generation, self.shape, self.num_slices).devices)


def parse(name: str, num_slices: int = 1) -> Topology:
  """The Topology a Cloud TPU accelerator type (`v5p-128`) or `GEN:AxB[xC]` names."""
  if num_slices < 1:
    raise UserError(f"--num_slices must be >= 1, got {num_slices}")
  m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
  gen = m and _ALIASES.get(m.group(1), m.group(1))
  if not m or gen not in CHIPS:
    raise UserError(f"unknown TPU topology {name!r}: use an accelerator type such as "
                    "v4-32, v5litepod-16, v5p-128 or v6e-256, or GEN:AxBxC (v5p:4x4x8)")
  chip = CHIPS[gen]
  if m.group(3):
    shape = tuple(int(d) for d in m.group(3).split("x"))
    if len(shape) != chip.dims:
      raise UserError(f"TPU {gen} slices are {chip.dims}D: {name!r}")
  else:
    count = int(m.group(2))
    shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
    if count % chip.cores_per_chip or count // chip.cores_per_chip not in shapes:
      sizes = ", ".join(f"{gen}-{n * chip.cores_per_chip}" for n in shapes)
      unit = "TensorCores (2 per chip)" if chip.cores_per_chip == 2 else "chips"
      raise UserError(f"no {gen} slice {name!r}: the number counts {unit}; known sizes: "
                      f"{sizes}; or name a shape, {gen}:AxB{'xC' if chip.dims == 3 else ''}")
    shape = shapes[count // chip.cores_per_chip]
  return Topology(name, chip, shape, num_slices)


@contextlib.contextmanager
def persistent_cache_off() -> Iterator[None]:
  """Keeps compiles for a TPU slice out of JAX's persistent compilation cache.

  This process cannot load back an executable for devices it does not have,
  and JAX warns at every such read.
  """
  import jax  # pylint: disable=g-import-not-at-top
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", before)


def quiet_without_tpu() -> None:
  """Keeps an installed libtpu quiet on a machine with no TPU attached.

  libtpu asks the TPU VM's metadata which slice it is on and prints warnings
  to stderr on every JAX start-up when that fails; naming a slice and a
  worker stops it. Only done when no TPU chip is attached (where one is, the
  real values must come from the VM) and only where the user has set neither.
  With no chip to guard, libtpu's one-process-at-a-time lock file is lifted
  too, so several compiles (test workers, a bench beside a test) can run.
  Nothing happens where libtpu is not installed. Cheap and jax-free: it runs
  before JAX starts.
  """
  if tpu_chips_attached() or importlib.util.find_spec("libtpu") is None:
    return
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not any(os.path.exists(p) for p in _GPU_DEVICE_FILES):
    # Nothing but the CPU can run here. Left to itself JAX would still start
    # libtpu's TPU backend, fail, and leave it half set up: JAX's profiler
    # then crashes the process (--profile). Compiling for a TPU topology
    # does not need that backend.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jax = sys.modules.get("jax")  # Imported before jaxft: it read the variable already.
    if jax is not None and jax.config.jax_platforms is None:
      jax.config.update("jax_platforms", "cpu")


# NVIDIA (also under Docker and WSL2) and AMD GPUs, as JAX looks for them.
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")

# Google's PCI vendor id and its TPU device ids (as jax._src.hardware_utils
# lists them); other Google devices (a VM's gVNIC) share the vendor.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def tpu_chips_attached() -> int:
  """TPU chips on this machine's PCI bus."""
  count = 0
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor, encoding="ascii") as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor), "device"), encoding="ascii") as f:
        count += f.read().strip() in _TPU_PCI_DEVICES
    except OSError:
      continue
  return count


@functools.lru_cache(maxsize=None)
def _topology_desc(generation: str, shape: tuple[int, ...], num_slices: int) -> Any:
  if importlib.util.find_spec("libtpu") is None:
    raise UserError("compiling for a TPU topology needs the libtpu wheel: "
                    "pip install 'jaxft[aot]' (or pip install libtpu)")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Megacore: one JAX device per v4/v5p chip (its two TensorCores as one).
  chip_config = "megacore" if CHIPS[generation].cores_per_chip == 2 else "default"
  return topologies.get_topology_desc(
      platform="tpu", topology_name=f"{generation}:{'x'.join(map(str, shape))}",
      chip_config_name=chip_config, num_slices=num_slices)
