"""The record of how a run was trained, kept across resumes and never overwritten.

DIR/config.json is the resolved config the run started with. A rerun whose
config differs (a longer `train.num_steps`, a new eval file) adds
DIR/config.resume-STEP.json, the whole config it continued with from
checkpoint STEP, and every rerun appends a `"split": "resume"` line (with the
changed keys, was and now) to metrics.jsonl. The newest of these files is
the run's config for `eval`, `export` and `inspect --workdir`: the CLI loads
this file as their `--config` (`get_config`), so that `--config.KEY=VALUE`
overrides apply on top as they do to a recipe.
"""

from __future__ import annotations

import json
import re
from typing import Any

import ml_collections

from jaxft import config as config_lib
from jaxft.errors import UserError
from jaxft.runtime import storage

FIRST = "config.json"
_RESUME = re.compile(r"config\.resume-(\d+)\.json")


def changes(was: ml_collections.ConfigDict, now: ml_collections.ConfigDict
            ) -> dict[str, list[Any]]:
  """{dotted key: [was, now]} for every key whose value differs (a new key: was None)."""
  # Through JSON, as config.json holds them: a tuple and the list it was saved as are equal.
  old, new = (dict(config_lib.flat_items(json.loads(config_lib.to_json(c)))) for c in (was, now))
  return {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys())
          if old.get(k) != new.get(k)}


def latest_file(workdir: str) -> str | None:
  """The newest config file of the run in `workdir` (None for a new workdir)."""
  names = storage.listdir(workdir)
  if FIRST not in names:
    return None
  resumes = sorted((int(m.group(1)), n) for n in names if (m := _RESUME.fullmatch(n)))
  return storage.join(workdir, resumes[-1][1] if resumes else FIRST)


def latest_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config the run in `workdir` last trained with, or None for a new workdir."""
  path = latest_file(workdir)
  return None if path is None else config_lib.from_json(storage.read_text(path))


def require_workdir(workdir: str) -> None:
  """Raises UserError unless the folder `workdir` exists (a typo must not look like a new run)."""
  if not storage.exists(workdir):
    raise UserError(f"workdir {workdir} does not exist")


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run in `workdir` last trained with.

  Raises:
    UserError: `workdir` does not exist or holds no config.json.
  """
  require_workdir(workdir)
  config = latest_config(workdir)
  if config is None:
    raise UserError(f"{workdir} is not a jaxft workdir (no config.json)")
  return config


get_config = saved_config  # `--config=run_record.py:DIR` (ml_collections config_flags).


def record_start(workdir: str, config: ml_collections.ConfigDict, step: int
                 ) -> tuple[ml_collections.ConfigDict | None, dict[str, list[Any]]]:
  """Records that `config` trains the run in `workdir` on from checkpoint `step`.

  Returns (the config the run last trained with, or None for a new run; the
  changes from it). Call on the primary process only.
  """
  was = latest_config(workdir)
  if was is None:
    storage.write_text(storage.join(workdir, FIRST), config_lib.to_json(config))
    return None, {}
  diff = changes(was, config)
  if diff:
    storage.write_text(storage.join(workdir, f"config.resume-{step:08d}.json"),
                       config_lib.to_json(config))
  record = {"step": step, "split": "resume", "changes": diff}
  storage.append_text(storage.join(workdir, "metrics.jsonl"), json.dumps(record) + "\n")
  return was, diff
