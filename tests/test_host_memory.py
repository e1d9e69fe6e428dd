"""train.host_memory: freed host buffers are reused instead of faulted in again each step."""

import os
import subprocess
import sys
import textwrap

import pytest

from jaxft import config as config_lib
from jaxft.runtime import host_memory
from jaxft.errors import UserError

# A jitted function whose temporary (sin(x), 128 MB: above glibc's largest
# mmap threshold) is allocated and freed on every call, as a train step's are.
_FAULTS = textwrap.dedent("""
    import resource, statistics, sys
    from jaxft.runtime import host_memory
    print(host_memory.apply(sys.argv[1]))
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sin(x) @ x[:8].T)
    x = jnp.ones((16_000, 2_000))
    def faults():
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(f(x))
      return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    for _ in range(8):
      faults()
    print(int(statistics.median(faults() for _ in range(16))))
    def rss():
      return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
    del x
    kept = rss()
    host_memory.return_free()
    print((kept - rss()) // 1024)  # MB handed back
""")


def _faults(policy: str) -> tuple[str, int, int]:
  """(whether reuse applied, median minor faults of a call, MB that return_free gave back)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _FAULTS, policy], env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  return out[0], int(out[1]), int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_reuse_stops_the_per_call_page_faults_that_release_pays():
  applied, reused, returned = _faults("reuse")
  kept, released, _ = _faults("release")
  assert (applied, kept) == ("True", "False")
  # 128 MB of fresh pages is ~31k faults when memory goes back after each call.
  assert released > 25_000
  # Reused, the heap grows for the first few calls while one call's buffers
  # overlap the next's (frees are asynchronous; more calls overlap on a loaded
  # machine), then a call faults nothing: the median call is steady state.
  assert reused < released / 100
  # The 128 MB input and the freed temporaries go back to the system on request.
  assert returned >= 128


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
