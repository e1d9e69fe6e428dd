"""Page faults of a step-like call under train.host_memory=reuse and =release.

  python -m bench.host_memory

A jitted function whose temporary (sin(x), 128 MB: above glibc's largest mmap
threshold) is allocated and freed on every call, as a train step's are, runs
in a fresh process per policy (the policy must be set before JAX allocates).
Prints the median minor page faults of a call after 8 warm-up calls, and the
MB that `host_memory.return_free` hands back after the input is deleted; exits
1 if reuse does not remove the faults that release pays (these figures depend
on the machine's load, so they are checked here, not in tests/).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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


def measure(policy: str) -> tuple[bool, int, int]:
  """(whether reuse applied, median minor faults of a call, MB return_free gave back)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _FAULTS, policy], env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  return out[0] == "True", int(out[1]), int(out[2])


def main() -> int:
  rows = {policy: measure(policy) for policy in ("reuse", "release")}
  print("| policy | applied | median faults per call | MB returned |")
  print("|---|---|---:|---:|")
  for policy, (applied, faults, returned) in rows.items():
    print(f"| {policy} | {applied} | {faults:,} | {returned:,} |")
  reused, released = rows["reuse"][1], rows["release"][1]
  # 128 MB of fresh pages is ~31k faults when memory goes back after each call.
  ok = released > 25_000 and reused < released / 100 and rows["reuse"][2] >= 128
  print("ok" if ok else "FAILED: reuse should remove the faults release pays", flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
