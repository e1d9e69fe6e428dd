"""jaxft and PyTorch + transformers side by side: step time, throughput, MFU, memory.

  .venv/bin/python -m bench.run --suite cpu [--rows minilm-full,minilm-lora]
      [--set model.remat=full ...] [--warmup 2] [--steps 3] [--rounds 3]
      [--threads N] [--no-memory] [--out table.md] [--json rows.json]

For each row of the suite (bench/rows.py) both sides build the same job in
this one process: jaxft's step exactly as `jaxft train` builds it
(`run_lib.open_run` + `run_lib.make_step_fn`, its compilation timed as
"compile s") and the textbook torch step (bench/torch_side.py), on one fixed
synthetic batch. After --warmup steps each, the sides alternate: --steps
timed jaxft steps, then --steps timed torch steps, --rounds times, so a
machine that slows down or speeds up mid-run (thermal, a neighbour) touches
both sides alike. Every step is timed on its own.

MFU is the analytic training FLOPs of a step (jaxft.mfu's 6N + 12LSA per
token, the same count for both sides, frozen layers included) over the
device's peak: the datasheet figure on a GPU, the measured float32 matmul
peak on a CPU. The ratio is torch median / jaxft median: > 1 means jaxft is
faster.

Peak memory is measured apart, in one child process per (row, side)
(`--child ROW --side jax|torch`), which imports only its side: on a CPU the
growth of the resident set (VmHWM) over the RSS after imports, while it
builds the model and runs 2 steps (jaxft: compilation included); on a GPU,
the framework's peak device allocation.
"""

from __future__ import annotations

import os

# Before JAX, torch or transformers load. Nothing comes from a hub; on a GPU
# both frameworks share the device in one process, and JAX's default of
# grabbing 75% of its memory up front would leave torch too little.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from bench import rows as rows_lib  # noqa: E402
from jaxft.runtime import host_memory  # noqa: E402

SIDES = ("jax", "torch")
NAMES = {"jax": "jaxft", "torch": "torch"}
CHILD_STEPS = 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m bench.run",
                              description=__doc__.splitlines()[0])
  p.add_argument("--suite", default="cpu", choices=sorted(rows_lib.SUITES))
  p.add_argument("--rows", default="", help="comma-separated row names (default: all)")
  p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                 help="jaxft config override for every row, e.g. model.remat=full (repeatable)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
  p.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
  p.add_argument("--rounds", type=int, default=3, help="alternations of the two sides")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                 help="torch.set_num_threads (default: all cores)")
  p.add_argument("--no-memory", dest="memory", action="store_false",
                 help="skip the peak-memory child processes")
  p.add_argument("--out", default="", help="also write the table (markdown) here")
  p.add_argument("--json", default="", help="write the rows as a JSON list here")
  # Internal: one memory child.
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
  p.add_argument("--model-path", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if min(args.steps, args.rounds) < 1 or args.warmup < 0 or args.threads < 1:
    p.error("--steps, --rounds and --threads must be >= 1, --warmup >= 0")
  if args.child and not (args.side and args.model_path):
    p.error("--child needs --side and --model-path")
  return args


def log(msg: str) -> None:
  """Progress on stderr; stdout holds the table (a child's: its JSON line)."""
  print(msg, file=sys.stderr, flush=True)


# --- memory: one child process per (row, side) ----------------------------------

def _proc_status_mb(field: str) -> float:
  """A /proc/self/status memory field (VmRSS, VmHWM) in MB."""
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024  # kB
  raise RuntimeError(f"no {field} in /proc/self/status")


def child(args: argparse.Namespace) -> dict[str, Any]:
  """Builds one side of one row, runs 2 steps, prints its peak memory as JSON (last line)."""
  if args.side == "jax":
    from bench import jax_side as side  # pylint: disable=g-import-not-at-top
    side.device()  # Start the runtime: its fixed cost is not the model's.
  else:
    from bench import torch_side as side  # pylint: disable=g-import-not-at-top
    side.set_threads(args.threads)
  baseline = _proc_status_mb("VmRSS")
  row = rows_lib.suite(args.suite, [args.child])[0]
  sets = [rows_lib.parse_set(s) for s in args.sets]
  config = rows_lib.jaxft_config(row, args.model_path, sets)
  with tempfile.TemporaryDirectory() as workdir:
    built = (side.build(row, config, args.model_path, workdir) if args.side == "jax"
             else side.build(row, config, args.model_path))
    for _ in range(CHILD_STEPS):
      built.step()
  device_peak = side.peak_memory_mb()
  result = {"row": row.name, "side": args.side, "baseline_mb": baseline,
            "peak_mb": device_peak if device_peak is not None
            else _proc_status_mb("VmHWM") - baseline,
            "measure": "device" if device_peak is not None else "rss"}
  print(json.dumps(result), flush=True)
  return result


def measure_memory(row: rows_lib.Row, side: str, model_path: str,
                   args: argparse.Namespace) -> float | None:
  """Peak MB of one side of `row`, from a child process; None (and a log line) if it failed."""
  cmd = [sys.executable, "-m", "bench.run", "--child", row.name, "--side", side,
         "--suite", args.suite, "--model-path", model_path, "--threads", str(args.threads)]
  cmd += [f"--set={s}" for s in args.sets]
  out = subprocess.run(cmd, cwd=rows_lib.ROOT, capture_output=True, text=True, check=False)
  lines = out.stdout.strip().splitlines()
  if out.returncode != 0 or not lines:
    log(f"{row.name} {side}: memory child failed (exit {out.returncode}):\n"
        + "\n".join(out.stderr.strip().splitlines()[-5:]))
    return None
  return float(json.loads(lines[-1])["peak_mb"])


# --- timing: both sides in this process -----------------------------------------------

def _summary(times: list[float], batch: int, length: int, flops: float,
             peak: float) -> dict[str, Any]:
  median = statistics.median(times)
  return {"steps": len(times), "median_s": median, "min_s": min(times), "max_s": max(times),
          "examples_per_s": batch / median, "tokens_per_s": batch * length / median,
          "mfu": flops / median / peak, "times_s": times}


def bench_row(row: rows_lib.Row, model_path: str, args: argparse.Namespace,
              scratch: str, peak: float) -> list[dict[str, Any]]:
  """Times both sides of one row, alternating; one result dict per side."""
  from bench import jax_side  # pylint: disable=g-import-not-at-top
  from bench import torch_side  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  sets = [rows_lib.parse_set(s) for s in args.sets]
  config = rows_lib.jaxft_config(row, model_path, sets)
  batch, length = config.train.batch_size, config.data.max_length
  log(f"{row.name}: building jaxft (B={batch}, L={length})")
  jx = jax_side.build(row, config, model_path, tempfile.mkdtemp(dir=scratch))
  log(f"{row.name}: jaxft compiled in {jx.compile_s:.1f} s; building torch")
  tc = torch_side.build(row, config, model_path)
  sides = {"jax": jx, "torch": tc}
  for name, side in sides.items():
    for i in range(args.warmup):
      log(f"{row.name}: {NAMES[name]} warm-up {i + 1}/{args.warmup}: {side.step():.3f} s")
  times = {"jax": [], "torch": []}
  for r in range(args.rounds):
    for name, side in sides.items():
      times[name] += [side.step() for _ in range(args.steps)]
    log(f"{row.name}: round {r + 1}/{args.rounds}: "
        + ", ".join(f"{NAMES[n]} {statistics.median(t[-args.steps:]):.3f} s"
                    for n, t in times.items()))
  common = {"row": row.name, "batch_size": batch, "seq_len": length,
            "flops_per_step": jx.flops_per_step, "model": model_path}
  out = [{**common, "side": NAMES["jax"], "compile_s": jx.compile_s, "trainable": jx.trainable,
          "weights": "loaded", **_summary(times["jax"], batch, length, jx.flops_per_step, peak)},
         {**common, "side": NAMES["torch"], "compile_s": None, "trainable": tc.trainable,
          "weights": tc.weights,
          **_summary(times["torch"], batch, length, jx.flops_per_step, peak)}]
  ratio = out[1]["median_s"] / out[0]["median_s"]
  for r in out:
    r["ratio"] = ratio
  del jx, tc, sides  # Free both models before the next row (and the memory children).
  gc.collect()
  jax.clear_caches()
  # Reused host memory stays mapped otherwise (train.host_memory): a memory
  # child would then share the machine with this process's freed gigabytes.
  host_memory.return_free()
  return out


# --- the table ---------------------------------------------------------------------

COLUMNS = ("row", "side", "B x L", "median s", "min s", "max s", "examples/s", "tokens/s",
           "MFU", "peak MB", "compile s", "trainable", "torch/jaxft")


def _num(x: float | None, fmt: str = ".4g") -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table(results: list[dict[str, Any]]) -> str:
  """Markdown: one line per (row, side)."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for r in results:
    cells = (r["row"], r["side"], f"{r['batch_size']} x {r['seq_len']}", _num(r["median_s"]),
             _num(r["min_s"]), _num(r["max_s"]), _num(r["examples_per_s"], ".1f"),
             _num(r["tokens_per_s"], ".0f"), f"{100 * r['mfu']:.3g}%",
             _num(r.get("peak_mb"), ".0f"), _num(r["compile_s"], ".1f"),
             f"{r['trainable']:,}", _num(r["ratio"], ".3f"))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def notes(results: list[dict[str, Any]], skipped: list[str], header: str) -> list[str]:
  """Lines around the table: the machine, skipped rows, random weights, count mismatches."""
  out = [header, "MFU counts every row's model as fully trained (6 N + 12 L S A per token, "
         "jaxft/mfu.py): rows that skip weight gradients (frozen layers, LoRA) do less work "
         "than that, so their MFU overstates utilisation and can pass 100%; compare them by "
         "the ratio"]
  out += [f"skipped {s}" for s in skipped]
  for r in results:
    if r["side"] == NAMES["torch"] and r["weights"] == "random":
      out.append(f"{r['row']}: torch runs the same architecture with random weights "
                 "(timing does not depend on them)")
  by_row: dict[str, dict[str, int]] = {}
  for r in results:
    by_row.setdefault(r["row"], {})[r["side"]] = r["trainable"]
  for name, counts in by_row.items():
    if len(set(counts.values())) > 1:
      out.append(f"WARNING {name}: trainable parameters differ ("
                 + ", ".join(f"{s} {n:,}" for s, n in counts.items())
                 + "): the two sides are not the same job")
  return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Runs the suite; prints (and writes) the table; returns one dict per (row, side)."""
  args = parse_args(argv)
  # As `jaxft train` does, before JAX starts (both sides share the setting).
  policy = dict(rows_lib.parse_set(s) for s in args.sets).get("train.host_memory", "auto")
  reuse = host_memory.apply(policy)
  if args.child:
    return [child(args)]
  selected = rows_lib.suite(args.suite, [r for r in args.rows.split(",") if r])
  from bench import jax_side  # pylint: disable=g-import-not-at-top
  from bench import torch_side  # pylint: disable=g-import-not-at-top
  torch_side.set_threads(args.threads)
  load = os.getloadavg()[0]
  peak = jax_side.peak_flops()
  header = (f"device {jax_side.device()}; peak {peak / 1e9:.1f} GFLOP/s "
            f"({jax_side.peak_source()});"
            f" torch threads {args.threads}; host memory {'reused' if reuse else 'released'}"
            f" (train.host_memory={policy}); {args.warmup} warm-up steps, then "
            f"{args.rounds} rounds of {args.steps} steps per side"
            + "".join(f"; --set {s}" for s in args.sets))
  if args.memory:
    header += ("; peak MB: " + ("growth of a child process's RSS over its RSS after imports, "
                                "building the model and running 2 steps (jaxft: compilation "
                                "included)" if jax_side.peak_source().startswith("measured")
                                else "peak device allocation of a child process"))
  results, skipped = [], []
  with tempfile.TemporaryDirectory(prefix="jaxft-bench-") as scratch:
    for row in selected:
      path, why = rows_lib.model_path(row.model, scratch)
      if path is None:
        log(f"skipping {row.name}: {why}")
        skipped.append(f"{row.name}: {why}")
        continue
      pair = bench_row(row, path, args, scratch, peak)
      for r in pair:
        side = "jax" if r["side"] == NAMES["jax"] else "torch"
        r["peak_mb"] = measure_memory(row, side, path, args) if args.memory else None
      results += pair
  # Other processes on the machine slow the sides unevenly (torch's OpenMP threads
  # wait on descheduled peers): the load average tells the reader whether to trust it.
  header += f"; load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end"
  text = "\n".join([table(results), "", *notes(results, skipped, header)])
  print(text, flush=True)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
