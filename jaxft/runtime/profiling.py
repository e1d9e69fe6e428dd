"""Where the time goes: a JAX trace of a few train steps, and the compilation cache.

`jaxft train --profile=N` traces N steps, starting two steps after the run
(re)starts so compilation stays out of the picture, into DIR/profile; open it
with TensorBoard's profile plugin or https://ui.perfetto.dev.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax

from jaxft.runtime import storage
from jaxft.errors import UserError


class StepTrace:
  """Traces steps first .. first + count - 1 of a run into DIR/profile."""

  def __init__(self, workdir: str, start_step: int, count: int):
    self.target = storage.join(workdir, "profile")
    # The profiler writes local files; a gs:// workdir gets them uploaded when it stops.
    self.directory = (tempfile.mkdtemp(prefix="jaxft-profile-")
                      if storage.is_remote(workdir) else self.target)
    self.first = start_step + 3  # Steps start_step + 1, + 2 compile and warm up.
    self.last = self.first + count - 1
    self.count = count
    self._active = False

  def before(self, step: int) -> None:
    if self.count > 0 and step == self.first:
      _check_profiler_safe()
      jax.profiler.start_trace(self.directory)
      self._active = True

  def after(self, step: int, state: Any) -> None:
    if self._active and step == self.last:
      self.stop(state)

  def stop(self, state: Any = None) -> None:
    """Ends the trace (waiting for `state`, so the last step's device work is in it)."""
    if self._active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self._active = False
      if self.directory != self.target:
        storage.upload_tree(self.directory, self.target)


def use_compilation_cache(directory: str) -> None:
  """Keeps compiled programs in `directory`, so a rerun or resume skips compiling."""
  if directory:
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    # Cache every program: even the eval step's few seconds add up on resume.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# `generate` and `chat` keep compiled programs here unless JAX_COMPILATION_CACHE_DIR says
# where: their start-up is mostly compiling the same prefill and decode steps each call.
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jaxft", "xla")


def use_default_compilation_cache() -> None:
  """`use_compilation_cache(DEFAULT_CACHE)`, unless a cache folder is already configured."""
  if not jax.config.jax_compilation_cache_dir:
    use_compilation_cache(DEFAULT_CACHE)


def _check_profiler_safe() -> None:
  """Raises UserError where JAX's profiler would crash the process.

  Once libtpu's TPU plugin is loaded (a compile for a TPU topology,
  `jaxft.aot`) in a process that runs on another backend, starting a trace
  segfaults (jax 0.10, libtpu 0.0.52). `jaxft train` never loads it; a
  program that does both in one process gets this error instead of a crash.
  """
  from jaxlib import xla_client  # pylint: disable=g-import-not-at-top
  if xla_client.pjrt_plugin_loaded("tpu") and jax.default_backend() != "tpu":
    raise UserError("--profile cannot trace in a process that compiled for a TPU topology "
                    "(libtpu's profiler would crash it): profile in a separate run")
