"""Preference accuracy of several DPO checkpoints on one held-out pair file.

  python -m bench.dpo_heldout --pairs unseen.jsonl [--limit N] \\
      WORKDIR:STEP [WORKDIR:STEP ...]

The pairs are tokenized once and the reference log-probs (the base model,
adapters off) computed once; each checkpoint then costs one policy forward
per pair, half of what `jaxft eval` spends on a fresh file. Every checkpoint
must share the first one's base model and token rows (the reference and the
rows are reused): a checkpoint that differs is an error. A saved --reference
R.npy keeps beside it, in R.npy.json, what it was computed from, and is
refused for any other base model, row lengths or pair file. Prints one JSON
line per checkpoint, with the standard error of its accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import tempfile

import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxft import metrics
from jaxft import run as run_lib
from jaxft import tasks
from jaxft.errors import UserError
from jaxft.runtime import run_record
from jaxft.tasks import dpo
from jaxft.tasks import preference_loss


def _limited(path: str, limit: int) -> str:
  """`path`, or a temporary copy of its first `limit` lines."""
  if not limit:
    return path
  with open(path, encoding="utf-8") as f:
    lines = [l for l in f.read().splitlines() if l.strip()][:limit]
  out = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8")
  out.write("\n".join(lines) + "\n")
  out.close()
  return out.name


def _provenance(config: ml_collections.ConfigDict, pairs_sha256: str) -> dict:
  """What a reference's log-probs depend on: the base model, the rows' lengths, the pairs."""
  return {"model": config.model.path, "frozen_dtype": config.model.get("frozen_dtype"),
          "max_length": config.data.max_length,
          "max_prompt_length": config.data.get("max_prompt_length", 0),
          "pairs_sha256": pairs_sha256}


def _load_reference(path: str, provenance: dict) -> np.ndarray:
  """The saved reference at `path`; UserError unless it was computed from `provenance`."""
  try:
    with open(path + ".json", encoding="utf-8") as f:
      saved = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path} has no {path}.json saying what it was computed from; delete "
                    "it to compute it again") from None
  if saved != provenance:
    differ = sorted(k for k in provenance if saved.get(k) != provenance[k])
    raise UserError(f"{path} was computed for other {', '.join(differ)} ({saved}); delete it "
                    "or name another --reference")
  return np.load(path)


def _save_reference(path: str, ref: np.ndarray, provenance: dict) -> None:
  np.save(path, ref)
  with open(path + ".json", "w", encoding="utf-8") as f:
    json.dump(provenance, f)


def _score(args: argparse.Namespace, pairs: str) -> None:
  """Prints one JSON line per checkpoint of args.checkpoints on the pair file `pairs`."""
  with open(pairs, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  data = provenance = None
  for spec in args.checkpoints:
    workdir, step = spec.rsplit(":", 1)
    config = run_record.saved_config(workdir)
    config.data.eval = pairs
    if data is None:
      provenance = _provenance(config, digest)
      model_path, _, data = run_lib.prepare(config, workdir, need_train=False)
      if args.reference and os.path.exists(args.reference):
        data.eval[dpo.REFERENCE_KEY] = _load_reference(args.reference, provenance)
    elif _provenance(config, digest) != provenance:
      raise UserError(f"{spec} has another base model or row lengths than "
                      f"{args.checkpoints[0]}: score it in a run of its own")
    task = tasks.of(config)  # Its loss decides how a reward is read (summed or averaged).
    run = run_lib.open_run(config, workdir, model_path, None, quiet=True, task=task,
                           step=int(step))
    run.checkpointer.close()
    logps, ref, counts = task._pair_outputs(run, data.eval)
    if dpo.REFERENCE_KEY not in data.eval:
      data.eval[dpo.REFERENCE_KEY] = ref  # Later checkpoints reuse it (adapters off).
      if args.reference:
        _save_reference(args.reference, ref, provenance)
    if args.dump:
      np.savez(os.path.join(args.dump, spec.replace("/", "_").strip("_") + ".npz"),
               logps=logps, ref=ref, counts=counts)
    losses, chosen, rejected = preference_loss.pair_losses(
        jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(counts), **task.settings)
    acc = float(np.mean(preference_loss.pair_metrics(
        jnp.asarray(logps), chosen, rejected)["rewards/accuracies"]))
    n = len(logps)
    line = {"checkpoint": spec, "pairs": n, "preference_accuracy": round(acc, 4),
            "stderr": round(math.sqrt(acc * (1 - acc) / n), 4),
            "reward_margin": round(float(np.mean(chosen - rejected)), 4),
            "loss": round(float(np.mean(losses)), 4),
            "beta": config.dpo.beta, "loss_type": config.dpo.loss}
    print(json.dumps(line), flush=True)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--pairs", required=True, help="jsonl of held-out pairs")
  p.add_argument("--limit", type=int, default=0, help="use only the first N pairs")
  p.add_argument("--reference", default="",
                 help=".npy of the pairs' reference log-probs: read if it exists (and was "
                      "computed for the same model, rows and pairs), else written")
  p.add_argument("--dump", default="", help="a folder for each checkpoint's per-pair arrays")
  p.add_argument("checkpoints", nargs="+", help="WORKDIR:STEP")
  args = p.parse_args(argv)
  pairs = _limited(args.pairs, args.limit)
  try:
    _score(args, pairs)
  finally:
    if pairs != args.pairs:
      os.unlink(pairs)
  return 0


if __name__ == "__main__":
  try:
    raise SystemExit(main())
  except UserError as e:  # A missing checkpoint or pair file: its message, not a traceback.
    raise SystemExit(f"error: {e}") from None
