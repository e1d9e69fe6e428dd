"""Prediction speed: `jaxft predict` vs transformers' text-classification pipeline, same CPU.

  .venv/bin/python bench/predict_speed.py [--steps 20] [--batch_size 64] [--rounds 2]

Trains the demo recipe (configs/classify.py: MiniLM on the bundled Rotten
Tomatoes snippets) for `--steps` steps in a temporary folder and exports it,
then classifies the bundled held-out split (data/rotten-tomatoes/test.jsonl,
1,331 snippets) with both, in batches of `--batch_size`, `--rounds` times
alternating (never at the same time: they share the cores):

  jaxft: `jaxft predict --workdir=RUN --input=TEXTS --out=FILE` as a process;
    `predict s` is the command's own timing of its loop (read, tokenize, run,
    write; the first batch's compile, or loading it from the persistent
    compilation cache, included), `wall s` the whole process (start-up,
    restoring the checkpoint).
  transformers: `pipeline("text-classification", model=EXPORTED, device=-1)`
    in this process, truncating at the recipe's max_length as jaxft does;
    `predict s` one call over every text after a one-batch warm-up, `wall s`
    building the pipeline, the warm-up and that call.

The table reports the median round of each; texts/s is texts / predict s.
jaxft pads every batch to max_length (one compiled shape), the pipeline only
to the longest text of each batch. A last line checks that both sides agree:
the share of equal labels and the largest difference of a class probability.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "data" / "rotten-tomatoes" / "test.jsonl"
RECIPE = ROOT / "configs" / "classify.py"


def _jaxft(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "jaxft.cli", *args], check=True,
                        capture_output=True, text=True, cwd=ROOT)


def train_and_export(folder: Path, steps: int) -> tuple[Path, Path]:
  """(workdir, exported folder) of the demo recipe trained `steps` steps, no eval."""
  workdir, exported = folder / "run", folder / "hf"
  _jaxft("train", f"--config={RECIPE}", f"--workdir={workdir}",
         f"--config.train.num_steps={steps}", "--config.data.eval=",
         "--config.checkpoint.every=0", f"--config.train.log_every={steps}")
  _jaxft("export", f"--workdir={workdir}", f"--out={exported}")
  return workdir, exported


def run_jaxft(workdir: Path, batch_size: int, out: Path) -> dict:
  """One `jaxft predict` process: its summary, plus the wall time of the whole process."""
  t0 = time.perf_counter()
  proc = _jaxft("predict", f"--workdir={workdir}", f"--input={TEXTS}", f"--out={out}",
                f"--batch_size={batch_size}")
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  return {"wall_s": time.perf_counter() - t0, "predict_s": summary["seconds"]}


def run_pipeline(exported: Path, texts: list[str], batch_size: int, max_length: int
                 ) -> tuple[dict, list]:
  """One pipeline built and run over `texts`: timings and its per-text class scores."""
  import transformers  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  classifier = transformers.pipeline("text-classification", model=str(exported), device=-1)
  kw = dict(batch_size=batch_size, truncation=True, max_length=max_length, top_k=None)
  classifier(texts[:batch_size], **kw)  # Warm-up: first-call allocations.
  t1 = time.perf_counter()
  scores = classifier(texts, **kw)
  t2 = time.perf_counter()
  return {"wall_s": t2 - t0, "predict_s": t2 - t1}, scores


def agreement(out: Path, scores: list) -> tuple[float, float]:
  """(share of equal labels, largest |probability difference|) of jaxft's and the pipeline's."""
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  same, diff = 0, 0.0
  for row, theirs in zip(rows, scores):
    probs = {s["label"]: s["score"] for s in theirs}
    same += row["label"] == max(probs, key=probs.get)
    diff = max(diff, max(abs(row["probs"][k] - v) for k, v in probs.items()))
  return same / len(rows), diff


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=20, help="training steps of the demo run")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  from jaxft import defaults  # pylint: disable=g-import-not-at-top
  max_length = defaults.recipe("classify").data.max_length
  texts = [json.loads(line)["text"] for line in TEXTS.read_text().splitlines()]
  with tempfile.TemporaryDirectory(prefix="predict-speed-") as tmp:
    folder = Path(tmp)
    t0 = time.perf_counter()
    workdir, exported = train_and_export(folder, args.steps)
    print(f"trained {args.steps} steps and exported in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    results = {"jaxft predict": [], "transformers pipeline": []}
    for r in range(args.rounds):
      out = folder / f"preds-{r}.jsonl"
      results["jaxft predict"].append(run_jaxft(workdir, args.batch_size, out))
      timing, scores = run_pipeline(exported, texts, args.batch_size, max_length)
      results["transformers pipeline"].append(timing)
    same, diff = agreement(out, scores)
  print(f"{len(texts)} texts (data/rotten-tomatoes/test.jsonl), batch {args.batch_size}, "
        f"max_length {max_length}, median of {args.rounds} rounds, {os.cpu_count()} CPU cores")
  print()
  print("| side | predict s | texts/s | wall s (load + predict) |")
  print("|---|---|---|---|")
  rates = {}
  for side, rounds in results.items():
    predict_s = statistics.median(r["predict_s"] for r in rounds)
    wall_s = statistics.median(r["wall_s"] for r in rounds)
    rates[side] = len(texts) / predict_s
    print(f"| {side} | {predict_s:.2f} | {rates[side]:.0f} | {wall_s:.1f} |")
  print()
  print(f"jaxft / transformers texts/s: "
        f"{rates['jaxft predict'] / rates['transformers pipeline']:.2f}; labels equal: "
        f"{same:.4f}; largest probability difference: {diff:.2e}")


if __name__ == "__main__":
  main()
