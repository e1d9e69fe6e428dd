"""--profile writes a trace of the asked steps; the compilation cache fills and is reused."""

from tests.helpers import jaxft, jaxft_in_process, tiny_flags


def test_profile_writes_a_trace_into_the_workdir(tiny_setup, tmp_path):
  run = jaxft_in_process("train", "--profile=2", *tiny_flags(tiny_setup, tmp_path / "w",
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
