"""Kill anywhere: SIGKILL `jaxft train` at random moments, rerun until done, compare bitwise.

For each model, one uninterrupted run gives the reference final state. Then
each trial starts the same command in a fresh workdir and kills it with
SIGKILL, `--kills` times (each kill in a rerun of the killed command): every
`--save-every`-th kill the instant a checkpoint save is under way (the
driver watches DIR/checkpoints for Orbax's temporary folder); the others at a
random moment (uniform over 80% of the reference run's wall time: start-up,
compile, steps, evals, saves) or just after a random step is logged. It then reruns
the command without a kill until it exits 0 and compares the final
checkpoint's parameters and optimizer state with the reference, leaf by
leaf, bitwise (CPU). Each kill's landing is classified from what the killed
process had printed and left on disk.

  .venv/bin/python -m bench.chaos --trials 8 --kills 2      # up to 32 kills, two models

Models: the real MiniLM (all-MiniLM-L6-v2) as a review classifier on
data/rotten-tomatoes, and a tiny random Llama SFT on data/chitchat with
SmolLM2's tokenizer ($JAXFT_SMOLLM2 or the GGUF `make` fetches).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import orbax.checkpoint as ocp

ROOT = pathlib.Path(__file__).resolve().parents[1]
TMP_MARK = "orbax-checkpoint-tmp"


@dataclasses.dataclass
class Setup:
  """A short fine-tune to kill: `jaxft train` flags without --workdir, and its shape."""
  name: str
  flags: list[str]
  num_steps: int
  eval_every: int


def _subset(src: pathlib.Path, dst: pathlib.Path, n: int) -> str:
  dst.write_text("\n".join(src.read_text().splitlines()[:n]) + "\n")
  return str(dst)


def _common(num_steps: int, every: int) -> list[str]:
  # log_every=1: a progress line per step tells where a kill landed.
  return [f"--config.train.num_steps={num_steps}", f"--config.checkpoint.every={every}",
          f"--config.train.eval_every={2 * every}", "--config.train.log_every=1",
          "--config.checkpoint.keep=2"]


def minilm_setup(root: pathlib.Path, num_steps: int = 12, every: int = 3) -> Setup:
  """The real MiniLM checkpoint, fine-tuned as a review classifier."""
  from jaxft import defaults  # pylint: disable=g-import-not-at-top
  data = ROOT / "data" / "rotten-tomatoes"
  flags = ["--config=" + str(ROOT / "configs" / "classify.py"),
           f"--config.model.path={defaults.minilm()}",
           f"--config.data.train={_subset(data / 'train.jsonl', root / 'train.jsonl', 96)}",
           f"--config.data.eval={_subset(data / 'test.jsonl', root / 'test.jsonl', 32)}",
           "--config.data.max_length=32", "--config.train.batch_size=8",
           "--config.train.eval_batch_size=32", *_common(num_steps, every)]
  return Setup("minilm-classify", flags, num_steps, 2 * every)


def tiny_lm_setup(root: pathlib.Path, num_steps: int = 12, every: int = 3) -> Setup:
  """A tiny random Llama with SmolLM2's tokenizer, SFT on real chats."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from jaxft import defaults  # pylint: disable=g-import-not-at-top
  from jaxft.formats import hub  # pylint: disable=g-import-not-at-top
  tokenizer = hub.load_tokenizer(defaults.smollm2())
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(root / "model")
  tokenizer.save_pretrained(root / "model")
  data = ROOT / "data" / "chitchat"
  flags = ["--config=" + str(ROOT / "configs" / "sft.py"), f"--config.model.path={root / 'model'}",
           f"--config.data.train={_subset(data / 'train.jsonl', root / 'train.jsonl', 48)}",
           f"--config.data.eval={_subset(data / 'test.jsonl', root / 'test.jsonl', 8)}",
           "--config.data.max_length=128", "--config.train.batch_size=4",
           "--config.train.eval_batch_size=8", "--config.lora.rank=0", *_common(num_steps, every)]
  return Setup("tiny-llama-sft", flags, num_steps, 2 * every)


def _command(setup: Setup, workdir: pathlib.Path) -> list[str]:
  return [sys.executable, "-m", "jaxft.cli", "train", *setup.flags, f"--workdir={workdir}"]


def _save_folders(workdir: pathlib.Path) -> set[tuple[str, int]]:
  """Orbax's temporary folders of saves under way (or killed), by name and inode."""
  ckpts = workdir / "checkpoints"
  try:
    with os.scandir(ckpts) as entries:
      return {(e.name, e.inode()) for e in entries if TMP_MARK in e.name}
  except FileNotFoundError:
    return set()


def _landing(log: str, saving: bool, setup: Setup, workdir: pathlib.Path) -> str:
  """Where a kill landed, from the killed run's log and what it left on disk."""
  if saving:
    return "save"
  if " -> " not in log:  # The "... ; step S -> N" line comes once the model is loaded.
    return "start-up"
  steps = [l for l in log.splitlines() if l.startswith("step ") and "/" in l.split()[1]]
  if not steps:
    return "compile"
  last = int(steps[-1].split()[1].split("/")[0])
  if last % setup.eval_every == 0 or last == setup.num_steps:
    return "eval" if (workdir / "checkpoints" / str(last)).is_dir() else "save"
  return "step"


@dataclasses.dataclass
class Attempt:
  code: int
  seconds: float
  landing: str | None  # None: not killed (it ran to its end).


def run_once(setup: Setup, workdir: pathlib.Path, kill: float | str | None = None,
             timeout: float = 900.0) -> Attempt:
  """One `jaxft train`; `kill`: seconds after start, "save" (when one is under way),
  "step K" (once step K is logged: the kill lands in the steps after it), or None."""
  log_path = workdir.with_suffix(".log")
  with open(log_path, "a") as log:
    start = time.monotonic()
    proc = subprocess.Popen(_command(setup, workdir), cwd=ROOT, stdout=log, stderr=log)
    landing = None
    # A killed save leaves its folder until the rerun saves that step again: not this save.
    stale = _save_folders(workdir)
    saving = lambda: bool(_save_folders(workdir) - stale)
    while proc.poll() is None:
      now = time.monotonic() - start
      if now > timeout:
        proc.kill()
        raise RuntimeError(f"{setup.name}: {workdir} ran past {timeout} s")
      in_save = kill == "save" and saving()
      after_step = (isinstance(kill, str) and kill.startswith("step ") and
                    f"\n{kill}/" in log_path.read_text().split("\n$ killed")[-1])
      if in_save or after_step or (isinstance(kill, float) and now >= kill):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        tail = log_path.read_text().split("\n$ killed")[-1]
        landing = _landing(tail, in_save or saving(), setup, workdir)
        log.write(f"\n$ killed ({landing})\n")
        break
      time.sleep(0.002 if kill == "save" else 0.02)
    return Attempt(proc.wait(), time.monotonic() - start, landing)


def final_state(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
  """The saved train state at `step`, leaves by path, as NumPy arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():  # "Sharding info not provided": one CPU device, as saved.
    warnings.simplefilter("ignore", UserWarning)
    restored = ocp.PyTreeCheckpointer().restore(
        str(workdir / "checkpoints" / str(step) / "state"))
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(restored)}


def differing(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
  """The leaves that are not bitwise equal (or are only on one side)."""
  out = sorted(set(a) ^ set(b))
  for k in sorted(set(a) & set(b)):
    x, y = a[k], b[k]
    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
      out.append(k)
  return out


@dataclasses.dataclass
class Trial:
  landings: list[str]
  reruns: int
  equal: bool
  differing: list[str]


def trial(setup: Setup, workdir: pathlib.Path, reference: dict[str, np.ndarray],
          kills: list[float | str], max_reruns: int = 10) -> Trial:
  """Kills a run at each of `kills` (each a rerun of the last), then reruns it to the end."""
  landings = []
  for kill in kills:
    attempt = run_once(setup, workdir, kill)
    if attempt.landing is None:  # It finished before the kill: nothing left to kill.
      break
    landings.append(attempt.landing)
  for reruns in range(1, max_reruns + 1):
    attempt = run_once(setup, workdir)
    if attempt.code == 0:
      break
  else:
    raise RuntimeError(f"{workdir} did not finish in {max_reruns} reruns; see its .log")
  diff = differing(final_state(workdir, setup.num_steps), reference)
  return Trial(landings, reruns, not diff, diff)


def chaos(setup: Setup, root: pathlib.Path, trials: int, kills: int, save_every: int,
          seed: int) -> dict:
  """The reference run, then `trials` trials of `kills` kills; a summary dict."""
  rng = random.Random(seed)
  ref_dir = root / f"{setup.name}-reference"
  ref = run_once(setup, ref_dir)
  if ref.code != 0:
    raise RuntimeError(f"the uninterrupted run failed; see {ref_dir}.log")
  reference = final_state(ref_dir, setup.num_steps)
  results, n = [], 0
  for i in range(trials):
    plan = []
    for _ in range(kills):
      n += 1
      # Every save_every-th kill waits for a save; the rest alternate between a random
      # moment (start-up and compile dominate a short run's wall time) and a random step.
      if save_every and n % save_every == 0:
        plan.append("save")
      elif n % 2:
        plan.append(rng.uniform(0.0, 0.8 * ref.seconds))
      else:
        plan.append(f"step {rng.randrange(1, setup.num_steps)}")
    results.append(trial(setup, root / f"{setup.name}-{i}", reference, plan))
  landed = collections.Counter(l for r in results for l in r.landings)
  return {"model": setup.name, "reference_s": round(ref.seconds, 1), "trials": trials,
          "kills": sum(landed.values()), "landed": dict(landed),
          "reruns": sum(r.reruns for r in results),
          "bitwise_equal": sum(r.equal for r in results),
          "differing": [r.differing for r in results if not r.equal]}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--trials", type=int, default=8, help="trials per model")
  p.add_argument("--kills", type=int, default=2, help="kills per trial")
  p.add_argument("--save-every", type=int, default=3, help="every Nth kill waits for a save")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--models", default="minilm,tiny-lm")
  p.add_argument("--keep", action="store_true", help="keep the workdirs (printed)")
  args = p.parse_args()
  root = pathlib.Path(tempfile.mkdtemp(prefix="jaxft-chaos-"))
  makers = {"minilm": minilm_setup, "tiny-lm": tiny_lm_setup}
  summaries = []
  start = time.monotonic()
  for name in args.models.split(","):
    folder = root / name
    folder.mkdir()
    summary = chaos(makers[name](folder), folder, args.trials, args.kills, args.save_every,
                    args.seed)
    print(json.dumps(summary), flush=True)
    summaries.append(summary)
  print(f"\n| model | kills | landed | reruns | final state bitwise equal |\n|---|---:|---|---:|---|")
  for s in summaries:
    landed = ", ".join(f"{k} {v}" for k, v in sorted(s["landed"].items()))
    print(f"| {s['model']} | {s['kills']} | {landed} | {s['reruns']} | "
          f"{s['bitwise_equal']} of {s['trials']} |")
  print(f"\nwall {time.monotonic() - start:.0f} s; workdirs: {root}")
  if not args.keep:
    shutil.rmtree(root, ignore_errors=True)
  if any(s["bitwise_equal"] != s["trials"] for s in summaries):
    sys.exit(1)


if __name__ == "__main__":
  main()
