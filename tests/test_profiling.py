"""--profile writes a trace of the asked steps; the compilation cache fills and is reused."""

from tests.helpers import jaxft, tiny_flags


def test_profile_writes_a_trace_into_the_workdir(tiny_setup, tmp_path):
  # A fresh process: one that has compiled for a TPU topology (this worker may
  # have) cannot trace; that case is a clear error (below), not a crash.
  run = jaxft("train", "--profile=2", *tiny_flags(tiny_setup, tmp_path / "w",
                                                 "--config.train.num_steps=6"))
  assert run.returncode == 0, run.stderr
  traces = list((tmp_path / "w" / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_compilation_cache_fills_then_serves_a_rerun(tiny_setup, tmp_path):
  cache = tmp_path / "cache"
  flags = ["--config.train.num_steps=2", f"--config.train.compilation_cache={cache}"]
  first = jaxft("train", *tiny_flags(tiny_setup, tmp_path / "a", *flags))
  assert first.returncode == 0, first.stderr
  entries = sorted(p.name for p in cache.iterdir())
  assert entries  # The train and eval steps at least.
  second = jaxft("train", *tiny_flags(tiny_setup, tmp_path / "b", *flags))
  assert second.returncode == 0, second.stderr
  # Same programs: the rerun reads the cache and adds no entry of its own.
  assert sorted(p.name for p in cache.iterdir()) == entries


def test_profile_after_a_tpu_topology_compile_is_a_clear_error_not_a_crash(monkeypatch):
  from jaxlib import xla_client  # pylint: disable=g-import-not-at-top
  from jaxft.errors import UserError  # pylint: disable=g-import-not-at-top
  from jaxft.runtime import profiling  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(xla_client, "pjrt_plugin_loaded", lambda name: name == "tpu")
  with pytest.raises(UserError, match="compiled for a TPU topology"):
    profiling.StepTrace("/nonexistent", 0, 2).before(3)
