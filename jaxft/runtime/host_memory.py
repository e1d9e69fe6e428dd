"""Host memory policy: whether freed host buffers stay in the process for reuse.

XLA's CPU runtime allocates a step's temporaries (1.3 GB for MiniLM at
32 x 128) with posix_memalign on a worker thread and frees them after the
step. glibc serves that from fresh mmap'd pages and unmaps them at free, so
every step page-faults its whole working set in again: 330k minor faults,
about a quarter of a MiniLM step on a 2-core Xeon, where PyTorch's step
faults almost none. `reuse` tells glibc to keep freed memory and hand it out
again: one malloc arena (a worker thread's own arena cannot hold such a
block and falls back to mmap), no mmap, no trimming. The price is resident
memory: it never shrinks below its peak, and the peak can hold two steps'
temporaries, because XLA frees a step's temporaries a few ms after its
outputs are ready (7-21 ms measured), when the next step, already queued,
has taken a block of its own. SmolLM2 SFT at 8 x 256 peaked at 8.2 GB in 2
of 5 runs and at 14.0 GB in 3 (`release`: 8.2 GB each time). That buys
nothing next to an accelerator, hence `auto`; `release` is the choice when
host memory is tight.

The setting is process-wide and one-way, and reaches only threads that have
not allocated yet: it must be applied before JAX starts its backend (the
first computation), as `jaxft train` does. `return_free` hands what is free
back to the system at a point where nothing large is about to be allocated.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

from jaxft import config as config_lib
from jaxft.errors import UserError


# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")


def cpu_only() -> bool:
  """Whether JAX will run on the CPU, decided without starting a backend."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  return not any(importlib.util.find_spec(m) for m in _ACCELERATOR_MODULES)


def apply(policy: str) -> bool:
  """Applies `policy` (one of config.HOST_MEMORY); True if freed host memory is now reused.

  `release` leaves the allocator as it is. `reuse` (and `auto` when JAX runs
  on the CPU) needs glibc; elsewhere it changes nothing and returns False.
  """
  if policy not in config_lib.HOST_MEMORY:
    raise UserError(f"train.host_memory must be one of {config_lib.HOST_MEMORY}, got {policy!r}")
  libc = _glibc()
  if policy == "release" or (policy == "auto" and not cpu_only()) or libc is None:
    return False
  # -1 disables trimming (mallopt(3)); mallopt returns 1 on success.
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)


def return_free() -> bool:
  """Returns the free memory of the malloc heap to the system (glibc's malloc_trim)."""
  libc = _glibc()
  return libc is not None and libc.malloc_trim(0) == 1


def _glibc() -> ctypes.CDLL | None:
  """The C library if it is glibc (whose malloc these settings are for), else None."""
  return ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None
