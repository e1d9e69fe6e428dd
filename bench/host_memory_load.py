"""Host memory of loading a checkpoint onto an fsdp mesh of two processes, against transformers.

  python -m bench.host_memory_load [--size_mb 400] [--dtype float32]

Writes a random-weight Llama of about SIZE_MB (sharded safetensors, 100 MB
files) to a temporary folder, then loads it
  - with jaxft (`hf.load` with fsdp shardings, as `run.open_run` does; params
    in the checkpoint's dtype) in two processes x 4 fake CPU devices joined by
    jax.distributed (config.mesh fsdp=8), and
  - with transformers (`LlamaForCausalLM.from_pretrained`) in one process.
Each side first loads a tiny checkpoint of the same family, so that lazy
imports and one-time setup (shown apart) are not counted. Each process then
reports, as fractions of the checkpoint's bytes: the bytes it read from the
checkpoint (jaxft's `LoadReport.bytes_read`) and its peak resident memory
growth during the load: VmHWM after the load minus VmRSS before it, with
VmHWM reset just before the load (/proc/self/clear_refs; where that is
refused, ru_maxrss, which cannot be reset, stands in and can understate the
growth). Resident memory counts the checkpoint's mmapped file
pages while they are mapped, as well as the loaded params. Exits 1 if a jaxft
process reads or grows by more than 0.6x. Memory figures depend on the
machine (page size, allocator), so they are checked here, not in tests/.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import socket
import subprocess
import sys
import tempfile
from typing import Any, Callable

TARGET = 0.6
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _status() -> dict[str, int]:
  """This process's VmRSS, VmHWM, RssAnon and RssFile, in bytes."""
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      name, value = line.split(":", 1)
      if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
        out[name] = int(value.split()[0]) * 1024
  return out


def _reset_peak() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0); False where refused."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _measure(load: Callable[[], Any]) -> dict:
  """Runs `load()`; its return value and this process's memory around it."""
  before = _status()
  reset = _reset_peak()
  result = load()
  after = _status()
  peak = after["VmHWM"] if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {"result": result, "peak_growth": peak - before["VmRSS"], "hwm_reset": reset,
          "rss_growth": after["VmRSS"] - before["VmRSS"],
          "anon_growth": after["RssAnon"] - before["RssAnon"],
          "file_growth": after["RssFile"] - before["RssFile"]}


def _warm_up(load: Callable[[], Any]) -> int:
  """Runs `load()` of the tiny checkpoint: lazy imports and one-time setup happen
  there, not in the measured load. The RSS it added."""
  before = _status()["VmRSS"]
  load()
  return _status()["VmRSS"] - before


def _jax_worker(folder: str, tiny: str, dtype: str, coordinator: str, nproc: int,
                pid: int) -> dict:
  """One jaxft process: joins the others, loads `folder` onto the fsdp mesh, params in `dtype`."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxft import config as config_lib
  from jaxft import sharding
  from jaxft.formats import hf
  from jaxft.runtime import distributed
  distributed.initialize(coordinator, nproc, pid)
  config = config_lib.base()
  config.mesh.update(data=1, fsdp=8, tensor=1)
  mesh, rules = sharding.make_mesh(config), sharding.logical_rules(config)
  load = lambda path: hf.load(path, "causal_lm", param_dtype=getattr(jnp, dtype),
                              shardings=lambda s: sharding.tree_shardings(s, mesh, rules))
  warm_up = _warm_up(lambda: load(tiny))
  holder = {}

  def measured():
    holder["loaded"] = load(folder)
    # Absent before jaxft counted the bytes it reads.
    return getattr(holder["loaded"].report, "bytes_read", None)
  out = _measure(measured)
  out.update(bytes_read=out.pop("result"), warm_up=warm_up)
  return out


def _torch_worker(folder: str, tiny: str) -> dict:
  """transformers' load of `folder`, in this process; then every param touched."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  load = transformers.LlamaForCausalLM.from_pretrained
  warm_up = _warm_up(lambda: load(tiny))
  holder = {}

  def measured():
    holder["model"] = load(folder)
    return str(next(holder["model"].parameters()).dtype)
  out = _measure(measured)
  out.update(dtype=out.pop("result"), warm_up=warm_up, torch=torch.__version__)
  # from_pretrained may leave params in the checkpoint's mmap, paged in when
  # first used: touch them all, as the first forward pass would.
  out["touched"] = _measure(lambda: [float(p.sum()) for p in holder["model"].parameters()])
  return out


def _sizes(size_mb: int, itemsize: int, hidden: int = 1024, vocab: int = 16384) -> dict:
  """A LlamaConfig's sizes with about `size_mb` MB of weights; every dim splits by 8."""
  intermediate = hidden * 11 // 4
  per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
  layers = max(1, round((size_mb * 1e6 / itemsize - 2 * vocab * hidden) / per_layer))
  return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
              num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
              max_position_embeddings=256, tie_word_embeddings=False)


def _write_checkpoint(folder: str, sizes: dict, dtype: str) -> int:
  """A random-weight Llama of `sizes` in `folder`; the bytes of its tensors."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
  model.to(getattr(torch, dtype)).save_pretrained(folder, max_shard_size="100MB")
  return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_jax(folder: str, tiny: str, dtype: str) -> list[dict]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  coordinator = f"localhost:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, "-m", "bench.host_memory_load", "--jax_worker",
                             folder, tiny, dtype, coordinator, "2", str(pid)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for pid in range(2)]
  outs = [p.communicate(timeout=1200) for p in procs]
  for p, (_, err) in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(err[-3000:])
  return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outs]


def _run_torch(folder: str, tiny: str) -> dict:
  proc = subprocess.run([sys.executable, "-m", "bench.host_memory_load", "--torch_worker",
                         folder, tiny], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                        check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(name: str, r: dict, total: int) -> str:
  read = "-" if r.get("bytes_read") is None else f"{r['bytes_read'] / total:.3f}x"
  mb = lambda n: f"{n / 1e6:,.0f}"
  warm_up = mb(r["warm_up"]) if "warm_up" in r else "-"
  return (f"| {name} | {read} | {r['peak_growth'] / total:.3f}x ({mb(r['peak_growth'])} MB) | "
          f"{mb(r['rss_growth'])} | {mb(r['anon_growth'])} | {mb(r['file_growth'])} | "
          f"{warm_up} |")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size_mb", type=int, default=400)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--jax_worker", nargs=6,
                      metavar=("FOLDER", "TINY", "DTYPE", "COORD", "NPROC", "PID"))
  parser.add_argument("--torch_worker", nargs=2, metavar=("FOLDER", "TINY"))
  args = parser.parse_args()
  if args.jax_worker:
    folder, tiny, dtype, coordinator, nproc, pid = args.jax_worker
    print(json.dumps(_jax_worker(folder, tiny, dtype, coordinator, int(nproc), int(pid))))
    return 0
  if args.torch_worker:
    print(json.dumps(_torch_worker(*args.torch_worker)))
    return 0
  with tempfile.TemporaryDirectory() as root:
    folder, tiny = os.path.join(root, "model"), os.path.join(root, "tiny")
    itemsize = 4 if args.dtype == "float32" else 2
    total = _write_checkpoint(folder, _sizes(args.size_mb, itemsize), args.dtype)
    _write_checkpoint(tiny, _sizes(1, itemsize, hidden=64, vocab=512), args.dtype)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    print(f"checkpoint: {total / 1e6:,.0f} MB of {args.dtype} tensors in {len(files)} "
          "safetensors files")
    jax_rows = _run_jax(folder, tiny, args.dtype)
    torch_row = _run_torch(folder, tiny)
  print("| process | bytes read | peak resident growth | RSS growth after, MB | "
        "anon, MB | file-backed, MB | warm-up load (one-time), MB |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for pid, r in enumerate(jax_rows):
    print(_row(f"jaxft, process {pid} of 2 (fsdp=8)", r, total))
  print(_row(f"transformers from_pretrained ({torch_row['dtype']}, torch "
             f"{torch_row['torch']})", torch_row, total))
  print(_row("transformers, then every param touched", torch_row["touched"], total))
  if not all(r["hwm_reset"] for r in [*jax_rows, torch_row]):
    print("note: /proc/self/clear_refs refused; peaks are ru_maxrss-based")
  ok = all(r["bytes_read"] is not None and r["bytes_read"] <= TARGET * total
           and r["peak_growth"] <= TARGET * total for r in jax_rows)
  print(f"target: each jaxft process reads and grows by <= {TARGET}x: "
        f"{'met' if ok else 'NOT met'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
