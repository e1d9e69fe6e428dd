"""jaxft's DPO against a plain PyTorch + transformers + peft loop, same data and settings.

Runs `jaxft train` with a DPO recipe (configs/dpo.py) and `bench/torch_dpo.py`
one after the other (never at the same time: they share the CPU cores), with
the same --steps (= config.train.num_steps, so the same schedule),
--eval-every and --set overrides, then prints markdown tables: the held-out
loss, preference accuracy and reward margin of both at every eval; the train
loss, learning rate and gradient norm of both at every step; wall time,
median step time and their ratio. --steps and --eval-every default to the
recipe's (configs/dpo.py: 125 steps, one eval at the end, over 200 pairs).

  .venv/bin/python -m bench.compare_dpo                       # the recipe as it is
  .venv/bin/python -m bench.compare_dpo --steps 40 --eval-every 10 --max-eval-pairs 50
  .venv/bin/python -m bench.compare_dpo --steps 2 --eval-every 1 --max-eval-pairs 8 \\
      --set data.max_length=64 --set train.batch_size=2      # a smoke test (~4 min on 2 cores)

Both sides read the same token rows and batch order and start from the same
weights; only the LoRA A matrices differ (each side draws them with its own
RNG; B is zero on both), so step 1's loss is log 2 on both and later steps
agree in distribution, not to the digit. (Checked once with jaxft's A copied
into the torch side, from `jaxft export --step=1 --format=peft` of a run that
kept step 1, where A is still its init since B = 0 gives it no gradient: the
step-2 train loss agreed to 3e-7 and the gradient norms to 1e-5.)
`--steps 0` evaluates the untrained model on both sides (`jaxft eval` on an
empty workdir): loss log 2, accuracy 0.5, margin 0.

jaxft's per-step time is the difference of consecutive train lines'
cumulative time (log_every is set to 1); the first step (compilation) and a
step right after an eval (marked "+eval" in the step table: its time holds
the eval) are left out of its median. The jaxft run saves a checkpoint only
at its end (checkpoint.every=0). --keep keeps the workdir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
  """Progress to stderr, keeping stdout for the tables."""
  print(msg, file=sys.stderr, flush=True)


def _json_lines(text: str) -> list[dict[str, Any]]:
  """The JSON objects among a child's output lines, in order."""
  out = []
  for line in text.splitlines():
    line = line.strip()
    if line.startswith("{"):
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # Not one of ours (a library printing braces).
  return out


def _run(cmd: Sequence[str], what: str) -> tuple[str, float]:
  """(stdout, wall seconds) of a child; its stderr streams through to ours."""
  log(f"--- {what}: {' '.join(cmd)}")
  start = time.perf_counter()
  out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
  wall = time.perf_counter() - start
  if out.returncode != 0:
    raise SystemExit(f"{what} failed (exit {out.returncode})")
  return out.stdout, wall


def _eval_file(recipe: str, sets: Sequence[str]) -> str:
  """data.eval after the overrides: the last --set data.eval=..., else the recipe's."""
  for item in reversed(sets):
    key, _, value = item.partition("=")
    if key.strip() == "data.eval":
      return value
  from jaxft import defaults  # pylint: disable=g-import-not-at-top  (imports neither JAX nor torch)
  return defaults.recipe(recipe).data.eval


def _eval_subset(source: str, pairs: int, folder: str) -> str:
  """The first `pairs` rows of the eval file `source`, written to `folder`; its path."""
  if not os.path.isfile(source) or not source.endswith(".jsonl"):
    raise SystemExit(f"--max-eval-pairs needs a local .jsonl data.eval, not {source!r}")
  path = os.path.join(folder, f"eval-{pairs}.jsonl")
  with open(source, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
    kept = 0
    for line in f:
      if line.strip() and kept < pairs:
        out.write(line if line.endswith("\n") else line + "\n")
        kept += 1
  return path


def _flags(args: argparse.Namespace, steps: str, eval_every: str) -> list[str]:
  """--steps / --eval-every as one side's flags; absent ones leave the config's value."""
  return [f"{flag}{value}" for flag, value in ((steps, args.steps), (eval_every, args.eval_every))
          if value is not None]


def run_jaxft(args: argparse.Namespace, sets: Sequence[str], workdir: str) -> dict[str, Any]:
  """jaxft's evals, per-step train lines and timings (train, or eval alone at --steps 0)."""
  recipe = str(ROOT / "configs" / f"{args.recipe}.py")
  overrides = [f"--config.{s}" for s in sets]
  jaxft = [sys.executable, "-m", "jaxft.cli"]
  if args.steps == 0:
    # Nothing to train: the pretrained model with its untrained adapters, as jaxft eval sees it.
    os.makedirs(workdir, exist_ok=True)
    stdout, wall = _run([*jaxft, "eval", f"--config={recipe}", f"--workdir={workdir}",
                         *overrides], "jaxft eval")
    result = _json_lines(stdout)[-1]
    return {"evals": [result], "train": [], "wall_seconds": wall, "median_step_seconds": None,
            "first_step_seconds": None}
  cmd = [*jaxft, "train", f"--config={recipe}", f"--workdir={workdir}", *overrides,
         *_flags(args, "--config.train.num_steps=", "--config.train.eval_every="),
         "--config.train.log_every=1", "--config.checkpoint.every=0"]
  _, wall = _run(cmd, "jaxft train")
  records = _json_lines(Path(workdir, "metrics.jsonl").read_text(encoding="utf-8"))
  evals = [r for r in records if r.get("split") == "eval"]
  train = [r for r in records if r.get("split") == "train"]
  # The batch size jaxft trained with: its resolved config.
  batch = json.loads(Path(workdir, "config.json").read_text(encoding="utf-8"))["train"][
      "batch_size"]
  # examples_per_sec is cumulative from the loop's start: elapsed = step x batch / rate.
  elapsed = [r["step"] * batch / r["examples_per_sec"] for r in train]
  eval_steps = {r["step"] for r in evals}
  seconds = []
  for i, r in enumerate(train):
    r["seconds"] = elapsed[i] - (elapsed[i - 1] if i else 0.0)
    r["after_eval"] = bool(i) and train[i - 1]["step"] in eval_steps
    if i and not r["after_eval"]:  # Not compile, not an eval's time.
      seconds.append(r["seconds"])
  return {"evals": evals, "train": train, "wall_seconds": wall,
          "median_step_seconds": statistics.median(seconds) if seconds else None,
          "first_step_seconds": train[0]["seconds"] if train else None}


def run_torch(args: argparse.Namespace, sets: Sequence[str]) -> dict[str, Any]:
  """bench/torch_dpo.py's evals, per-step train records and timings."""
  cmd = [sys.executable, "-m", "bench.torch_dpo", "--recipe", args.recipe,
         *_flags(args, "--steps=", "--eval-every="), "--threads", str(args.threads),
         *(f"--set={s}" for s in sets)]
  stdout, wall = _run(cmd, "torch")
  lines = _json_lines(stdout)
  summary = lines[-1]
  return {"evals": [r for r in lines if r.get("split") == "eval"], "train": summary["train"],
          "wall_seconds": wall, "median_step_seconds": summary["median_step_seconds"],
          "first_step_seconds": summary["train"][0]["seconds"] if summary["train"] else None,
          "summary": summary}


def _fmt(x: Any, digits: int = 4) -> str:
  """A table cell: "-" for missing, fixed digits, scientific below 1e-3."""
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:.{digits}f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"
  return str(x)


def _lr(x: float | None) -> str:
  return "-" if x is None else f"{x:.3g}"


def _ratio(a: float | None, b: float | None) -> str:
  return "-" if not a or not b else f"{a / b:.2f}"


def print_tables(jax: dict[str, Any], torch_: dict[str, Any]) -> None:
  """Markdown: evals side by side, train steps side by side, timings."""
  # The mean chosen log-prob shows the two models are the same: equal at step 0.
  print("\n| step | jaxft loss | torch loss | jaxft accuracy | torch accuracy | jaxft margin "
        "| torch margin | jaxft logp chosen | torch logp chosen | pairs |\n"
        "|---|---|---|---|---|---|---|---|---|---|")
  by_step = {r["step"]: r for r in torch_["evals"]}
  for j in jax["evals"]:
    t = by_step.get(j["step"], {})
    print(f"| {j['step']} | {_fmt(j['loss'])} | {_fmt(t.get('loss'))} | "
          f"{_fmt(j['preference_accuracy'])} | {_fmt(t.get('preference_accuracy'))} | "
          f"{_fmt(j['reward_margin'])} | {_fmt(t.get('reward_margin'))} | "
          f"{_fmt(j['logps/chosen'], 5)} | {_fmt(t.get('logps/chosen'), 5)} | {j['pairs']} |")
  if jax["train"]:
    print("\n| step | jaxft train loss | torch train loss | jaxft lr | torch lr | jaxft grad norm "
          "| torch grad norm | jaxft s | torch s |\n|---|---|---|---|---|---|---|---|---|")
    by_step = {r["step"]: r for r in torch_["train"]}
    for j in jax["train"]:
      t = by_step.get(j["step"], {})
      print(f"| {j['step']} | {_fmt(j['loss'], 6)} | {_fmt(t.get('loss'), 6)} | "
            f"{j['lr']:.3g} | {_lr(t.get('lr'))} | "
            f"{_fmt(j['grad_norm'])} | {_fmt(t.get('grad_norm'))} | {_fmt(j['seconds'], 3)}"
            f"{' (+eval)' if j['after_eval'] else ''} | "
            f"{_fmt(t.get('seconds'), 3)} |")
  print("\n| | jaxft | torch | torch / jaxft |\n|---|---|---|---|")
  for name, key in (("wall s (process: load, tokenize, compile, train, evals)", "wall_seconds"),
                    ("median step s", "median_step_seconds"),
                    ("first step s (jaxft: compilation)", "first_step_seconds")):
    a, b = jax[key], torch_[key]
    print(f"| {name} | {_fmt(a, 3)} | {_fmt(b, 3)} | {_ratio(b, a)} |")
  if jax["evals"] and torch_["evals"]:
    j, t = jax["evals"][-1], torch_["evals"][-1]
    print(f"\nfinal eval (step {j['step']}): accuracy gap (jaxft - torch) "
          f"{100 * (j['preference_accuracy'] - t['preference_accuracy']):+.2f} points, "
          f"loss gap {j['loss'] - t['loss']:+.4f}; log 2 = {math.log(2):.4f}")


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--recipe", default="dpo", help="configs/<recipe>.py (default: dpo)")
  p.add_argument("--steps", type=int, default=None,
                 help="train.num_steps of both (default: the recipe's); 0: eval only")
  p.add_argument("--eval-every", type=int, default=None,
                 help="train.eval_every of both; 0: only at the end (default: the recipe's)")
  p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for both sides (repeatable)")
  p.add_argument("--max-eval-pairs", type=int, default=0,
                 help="evaluate both on the first N rows of data.eval (a file written for both)")
  p.add_argument("--threads", type=int, default=2, help="torch threads")
  p.add_argument("--workdir", default="", help="jaxft workdir (default: a fresh temporary one)")
  p.add_argument("--keep", action="store_true", help="keep the temporary jaxft workdir")
  args = p.parse_args(argv)
  scratch = tempfile.mkdtemp(prefix="compare_dpo-")
  try:
    sets = list(args.sets)
    if args.max_eval_pairs:
      subset = _eval_subset(_eval_file(args.recipe, sets), args.max_eval_pairs, scratch)
      sets.append(f"data.eval={subset}")
    workdir = args.workdir or os.path.join(scratch, "jaxft")
    if os.path.exists(workdir) and os.listdir(workdir):
      raise SystemExit(f"--workdir {workdir} is not empty: the jaxft run must start fresh")
    jax = run_jaxft(args, sets, workdir)
    torch_ = run_torch(args, sets)
    print(json.dumps({"jaxft": jax, "torch": {k: v for k, v in torch_.items()
                                             if k != "summary"}}), file=sys.stderr)
    steps = "recipe's" if args.steps is None else args.steps
    every = "recipe's" if args.eval_every is None else args.eval_every
    print(f"recipe {args.recipe}, steps {steps}, eval every {every}"
          + "".join(f"; --set {s}" for s in sets) + f"; torch threads {args.threads}")
    print_tables(jax, torch_)
  finally:
    if args.keep:
      log(f"kept {scratch}")
    else:
      shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  main()
