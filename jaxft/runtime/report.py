"""`jaxft report --workdir=DIR`: a run's curves as PNGs in DIR/plots/ and a short summary.

Everything comes from what the run left in DIR: config.json (and its resume
configs), metrics.jsonl, the TensorBoard event files (wall time), the
checkpoint folders, and the exports whose jaxft_export.json names DIR.
`jaxft train` writes the plots too, at the end of a run. No JAX is started.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import ml_collections

from jaxft import config as config_lib
from jaxft import metrics as metrics_lib
from jaxft.runtime import dashboards
from jaxft.runtime import plots
from jaxft.runtime import run_record
from jaxft.runtime import storage

PLOTS_DIR = "plots"  # Below the workdir.


def write_plots(workdir: str, config: ml_collections.ConfigDict | None = None) -> list[str]:
  """Draws DIR/plots/*.png from DIR/metrics.jsonl; returns their paths (none without
  train or eval lines). `config`: the run's (default: its latest saved one)."""
  config = config or run_record.latest_config(workdir)
  preferred = config.checkpoint.get("best_metric", "") if config is not None else ""
  name = os.path.basename(storage.resolve(workdir).rstrip("/"))
  drawn = plots.figures(metrics_lib.records(workdir), preferred, run_name=name)
  folder = storage.join(workdir, PLOTS_DIR)
  if drawn:
    storage.makedirs(folder)
  paths = []
  for file_name, figure in drawn.items():
    paths.append(storage.join(folder, file_name))
    storage.write_bytes(paths[-1], plots.png(figure))
  return paths


def report(workdir: str) -> str:
  """Writes the plots of the run in `workdir` and returns its summary.

  Raises:
    UserError: `workdir` does not exist or is not a jaxft workdir (no config.json).
  """
  config = run_record.saved_config(workdir)
  written = write_plots(workdir, config)
  return summary(workdir, config, written)


def summary(workdir: str, config: ml_collections.ConfigDict, written: Sequence[str]) -> str:
  """The report's text: config changes, steps, evals, speed, wall time and where things are."""
  records = metrics_lib.records(workdir)
  task = config.get("task", "classify")
  lines = [f"run {storage.resolve(workdir)}: task {task}, model {config.model.path}"]
  lines += _config_lines(workdir, config)
  lines += _progress_lines(records, config)
  lines += _eval_lines(records, config)
  lines += _speed_lines(records)
  wall = wall_time(workdir)
  lines.append(f"wall time: {_duration(wall)} (TensorBoard event files: first to last event "
               "of each session)" if wall is not None
               else "wall time: not recorded (no event files in DIR/tensorboard/: "
               "config.log.tensorboard off, or nothing trained yet)")
  lines += _where_lines(workdir)
  lines.append("plots: " + (", ".join(written) if written else "none (no train or eval lines "
                            "in metrics.jsonl yet)"))
  return "\n".join(lines)


def _config_lines(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """The keys the run sets away from the task's defaults, and the keys its reruns changed."""
  first = config_lib.from_json(storage.read_text(storage.join(workdir, run_record.FIRST)))
  name, defaults = config_lib.task_defaults(config.get("task", "classify"))
  changed = run_record.changes(defaults, first)
  lines = [f"config (config.json) vs {name}: " + ("the defaults" if not changed else
                                                    f"{len(changed)} keys set")]
  lines += [f"  {k} = {now!r}" + ("" if was is None else f"  (default {was!r})")
            for k, (was, now) in changed.items()]
  later = run_record.changes(first, config)
  if later:
    lines.append(f"changed by reruns (now {os.path.basename(run_record.latest_file(workdir))}): "
                 + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in later.items()))
  return lines


def _progress_lines(records: list[dict[str, Any]], config: ml_collections.ConfigDict) -> list[str]:
  steps = [r["step"] for r in records if r.get("split") in ("train", "eval")]
  resumes = sum(r.get("split") == "resume" for r in records)
  last = max(steps) if steps else 0
  return [f"steps: {last} of config.train.num_steps={config.train.num_steps} (last logged)"
          + (f"; resumed {resumes} times" if resumes else "")]


def _eval_lines(records: list[dict[str, Any]], config: ml_collections.ConfigDict) -> list[str]:
  """The final eval line, and the best value of the headline metric over the evals."""
  evals = [r for r in records if r.get("split") == "eval"]
  if not evals:
    return ["eval: none recorded"]
  final = evals[-1]
  values = {k: v for k, v in final.items() if k not in ("step", "split")}
  lines = [f"final eval (step {final['step']}): {metrics_lib.summary(values)}"]
  name = plots.headline(records, config.checkpoint.get("best_metric", ""))
  if name is not None:
    from jaxft import checkpoint  # pylint: disable=g-import-not-at-top  (JAX; only here)
    mode = checkpoint.best_mode(name, config.checkpoint.get("best_mode", "auto"))
    steps, values = plots.series(records, "eval", name)
    pick = (max if mode == "max" else min)(range(len(values)), key=values.__getitem__)
    lines.append(f"best eval {name}: {values[pick]:.4f} at step {steps[pick]} ({mode}imum of "
                 f"{len(values)} evals)")
  return lines


def _speed_lines(records: list[dict[str, Any]]) -> list[str]:
  """Throughput and MFU from the last train line (its session's mean so far)."""
  trains = [r for r in records if r.get("split") == "train"]
  if not trains:
    return ["speed: not recorded (no train lines in metrics.jsonl)"]
  last = trains[-1]
  parts = [f"{last[k]:,.1f} {label}" for k, label in
           (("examples_per_sec", "examples/s"), ("tokens_per_sec", "tokens/s")) if k in last]
  if isinstance(last.get("mfu"), (int, float)):
    parts.append(f"MFU {100 * last['mfu']:.2f}%")
  return [f"speed (train line at step {last['step']}, mean of its session): "
          + (", ".join(parts) or "not recorded")]


def wall_time(workdir: str) -> float | None:
  """Seconds between the first and last event of each TensorBoard event file (one per
  session: start of training to its last log), summed; None without event files."""
  total, found = 0.0, False
  for path in dashboards.event_files(workdir):
    times = [e.wall_time for e in dashboards.read_events(dashboards.read_bytes(path))]
    if times:
      total, found = total + max(times) - min(times), True
  return total if found else None


def _duration(seconds: float) -> str:
  minutes, s = divmod(round(seconds), 60)
  h, m = divmod(minutes, 60)
  return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def _where_lines(workdir: str) -> list[str]:
  """Kept checkpoint steps, and the exports (jaxft_export.json) of this run found in DIR
  or beside it: jaxft export writes its --out folder anywhere, and DIR keeps no record."""
  folder = storage.join(workdir, "checkpoints")
  kept = sorted(int(n) for n in storage.listdir(folder) if n.isdigit())
  lines = [f"checkpoints: {folder}: steps {', '.join(map(str, kept))}" if kept
           else "checkpoints: none"]
  exports = _exports(workdir)
  lines.append("exports: " + ("; ".join(exports) if exports else
                              "none found in or beside the workdir (jaxft export --out=DIR)"))
  return lines


def _exports(workdir: str) -> list[str]:
  """`OUT (format, step N)` of each export of this run in DIR's folder or its parent's."""
  from jaxft.formats import export_dir  # pylint: disable=g-import-not-at-top
  here = storage.resolve(workdir)
  parent = here.rsplit("/", 1)[0] if storage.is_remote(here) else os.path.dirname(here)
  folders = [storage.join(here, n) for n in storage.listdir(here)]
  if parent and parent != here and not (storage.is_remote(here) and parent.count("/") < 2):
    folders += [storage.join(parent, n) for n in storage.listdir(parent)
                if storage.join(parent, n) != here]
  out = []
  for folder in folders:
    manifest = storage.join(folder, export_dir.MANIFEST)
    if not storage.exists(manifest):
      continue
    try:
      info = json.loads(storage.read_text(manifest))
    except (OSError, ValueError):
      continue
    if isinstance(info, dict) and info.get("workdir") == here:
      out.append(f"{folder} ({info.get('format', '?')}, step {info.get('step', '?')})")
  return out
