"""train.host_memory: freed host buffers stay in the process for reuse instead of going back to the system."""

import platform
import subprocess
import sys
import textwrap

import pytest

from jaxft import config as config_lib
from jaxft.runtime import host_memory
from jaxft.errors import UserError

# Where glibc serves a 128 MB block (above its largest mmap threshold, as a
# train step's temporaries are) and where the block goes when freed, read
# from glibc's own books (mallinfo2): what the policy decides, whatever the
# machine's load. The page faults this saves are measured by
# bench/host_memory.py.
_ALLOCATOR = textwrap.dedent("""
    import ctypes, sys
    from jaxft.runtime import host_memory
    applied = host_memory.apply(sys.argv[1])
    class Info(ctypes.Structure):
      _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                  "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(128 << 20)
    held = libc.mallinfo2()
    libc.free(block)
    freed = libc.mallinfo2()
    returned = host_memory.return_free()
    trimmed = libc.mallinfo2()
    mb = lambda n: n >> 20
    print(applied, mb(held.hblkhd), mb(freed.hblkhd), mb(freed.fordblks), returned,
          mb(freed.arena - trimmed.arena))
""")


def _allocator(policy: str) -> dict[str, object]:
  """What glibc did with one 128 MB block under `policy`, in a fresh process."""
  out = subprocess.run([sys.executable, "-c", _ALLOCATOR, policy], check=True,
                       capture_output=True, text=True).stdout.split()
  names = ("applied", "mmapped_mb", "mmapped_after_free_mb", "free_in_heap_mb", "trimmed",
           "trimmed_mb")
  return dict(zip(names, [out[0] == "True", *map(int, out[1:4]), out[4] == "True",
                          int(out[5])]))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_reuse_keeps_freed_blocks_in_the_heap_and_return_free_hands_them_back():
  reuse = _allocator("reuse")
  # Served from the heap, not a fresh mmap, and still there, free, after the
  # free: the next call takes the same pages instead of faulting in new ones.
  assert reuse["applied"] and reuse["mmapped_mb"] == 0
  assert reuse["free_in_heap_mb"] >= 128
  # Until return_free trims the heap.
  assert reuse["trimmed"] and reuse["trimmed_mb"] >= 128


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_release_leaves_glibc_mapping_and_unmapping_each_block():
  release = _allocator("release")
  assert not release["applied"]
  # glibc's default: the block is its own mmap, unmapped again on free.
  assert release["mmapped_mb"] >= 128 and release["mmapped_after_free_mb"] == 0
  assert release["free_in_heap_mb"] < 128


def test_auto_reuses_on_the_cpu_only(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host_memory.cpu_only()
  assert host_memory.apply("auto") is False  # Nothing to change next to an accelerator.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.cpu_only()


def test_an_unknown_policy_is_a_clear_error():
  with pytest.raises(UserError, match="train.host_memory must be one of"):
    host_memory.apply("keep")
  c = config_lib.base()
  c.model.path, c.data.train = "m", "d.csv"
  c.train.host_memory = "keep"
  with pytest.raises(UserError, match="train.host_memory"):
    config_lib.validate(c)
