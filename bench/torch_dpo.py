"""Plain PyTorch + transformers + peft DPO loop: the reference for jaxft's DPO task.

The same job as `jaxft train` with a DPO config (`configs/dpo.py` plus
overrides), written the textbook way so that jaxft's numbers can be held
against it:

- the same token rows: `jaxft.data.preference.prepare` tokenizes the pairs
  with the tokenizer jaxft loads, so both sides see identical
  [pairs, 2, max_length] rows (chosen, rejected; right padded);
- the same batch order: step `s` trains on
  `jaxft.data.batches.TrainBatches(train, batch_size, seed)[s - 1]`;
- the same weights: a GGUF is dequantized by jaxft's own reader
  (`jaxft.formats.gguf.checkpoint`, numpy) into a transformers Llama, an HF
  folder is read by `from_pretrained`;
- peft LoRA with config.lora's rank, alpha, dropout and targets (jaxft's
  `/`-separated module-path regex with `.` for `/`, as bench/torch_side.py);
- the reference is the same model with its adapters off
  (`model.disable_adapter()` under `torch.no_grad()`);
- the sigmoid DPO loss from the paper (Rafailov et al. 2023) with label
  smoothing (cDPO), on summed response log-probs, chosen and rejected rows in
  one forward batch;
- AdamW (config.optim lr, b1, b2, eps, weight_decay; no decay on biases and
  norms), the learning rate of `jaxft/tuning/optimizer.py`'s schedule (linear
  warmup from 0, then linear / cosine decay to 0 or constant), global-norm
  clipping at config.optim.clip_norm; float32; `--threads` torch threads.

Held-out metrics as `jaxft eval` reports them for DPO: mean loss,
preference accuracy (a tie counts half) and mean reward margin over every
pair of config.data.eval, with the reference log-probs computed once.

  .venv/bin/python -m bench.torch_dpo --steps 40 --eval-every 10 \\
      [--recipe dpo] [--set data.max_length=128 --set train.batch_size=4 ...]

Progress goes to stderr. stdout: one JSON line per eval
({"split": "eval", "step": ..., "loss": ..., "preference_accuracy": ...,
"reward_margin": ..., ...}), then one summary line ({"split": "summary",
"steps", "wall_seconds", "median_step_seconds", "accuracy", "margin", "loss",
"train": per-step loss / lr / grad norm / seconds, ...}). `--steps 0`
evaluates the untrained model (adapters at B = 0: loss log 2, accuracy 0.5).

Only the sigmoid loss is implemented: it is the one the recipe trains and the
one this loop exists to check. JAX is imported (grain, which
`TrainBatches` uses, imports it) but never runs anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from typing import Any, Callable, Sequence

# Before transformers: nothing may come from a hub, and the tokenizers thread
# pool would otherwise compete with --threads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from jaxft import config as config_lib  # noqa: E402
from jaxft import defaults  # noqa: E402
from jaxft.data import batches as batches_lib  # noqa: E402
from jaxft.data import preference  # noqa: E402
from jaxft.formats import gguf  # noqa: E402
from jaxft.formats import hub  # noqa: E402
from bench import rows as bench_rows  # noqa: E402

ROW_KEYS = ("input_ids", "positions", "segment_ids", "loss_mask")


def log(msg: str) -> None:
  """Progress to stderr, keeping stdout for the JSON lines."""
  print(msg, file=sys.stderr, flush=True)


def emit(record: dict[str, Any]) -> None:
  print(json.dumps(record), flush=True)


# --- config ------------------------------------------------------------------


def make_config(recipe: str, sets: Sequence[str], steps: int | None
                ) -> ml_collections.ConfigDict:
  """The recipe, the --set overrides, then --steps as train.num_steps (the schedule's total)."""
  config = defaults.recipe(recipe)
  for item in sets:
    bench_rows.assign(config, *bench_rows.parse_set(item))
  if steps is not None and steps > 0:
    config.train.num_steps = steps
  config_lib.validate(config)
  if "dpo" not in config:
    raise SystemExit("the config has no dpo section; this loop runs DPO")
  d = config.dpo
  if d.loss != "sigmoid":
    raise SystemExit(f"dpo.loss={d.loss!r}: only the sigmoid (DPO) loss is implemented here")
  if config.lora.rank <= 0 or d.precompute_reference:
    raise SystemExit("this loop mirrors jaxft's LoRA DPO with the reference inline (adapters "
                     "off): set lora.rank > 0 and dpo.precompute_reference=False")
  if config.optim.optimizer != "adamw" or config.optim.rules or config.optim.layer_decay:
    raise SystemExit("only plain AdamW (no optim.rules, no layer_decay) is mirrored")
  if config.train.grad_accum != 1:
    raise SystemExit("train.grad_accum > 1 is not mirrored")
  if config.model.dtype != "float32" or config.model.frozen_dtype != "float32":
    raise SystemExit("only float32 compute and storage are mirrored")
  return config


# --- the schedule --------------------------------------------------------------


def lr_schedule(config: ml_collections.ConfigDict) -> Callable[[int], float]:
  """The learning rate after `count` updates, as jaxft/tuning/optimizer.py's `schedule`.

  optax evaluates a schedule at the number of updates already applied, so
  update `s` (1-based) uses lr(s - 1): with warmup the first update has
  rate 0. Warmup is optim.warmup_steps, else int(warmup_frac x num_steps);
  the decay (optax.linear_schedule / cosine_decay_schedule to 0) runs over
  max(num_steps - warmup, 1) steps and stays at 0 after.
  """
  o, total = config.optim, config.train.num_steps
  peak = o.lr
  warmup = o.warmup_steps or int(o.warmup_frac * total)
  decay_steps = max(total - warmup, 1)

  def after(count: int) -> float:
    c = min(max(count, 0), decay_steps)
    if o.schedule == "linear":
      return peak * (1.0 - c / decay_steps)
    if o.schedule == "cosine":
      return peak * 0.5 * (1.0 + math.cos(math.pi * c / decay_steps))
    return peak  # constant

  def lr(count: int) -> float:
    if warmup and count < warmup:
      return peak * count / warmup
    # optax.join_schedules hands the decay the count since its boundary.
    return after(count - warmup) if warmup else after(count)

  return lr


# --- model -------------------------------------------------------------------


def load_model(path: str) -> torch.nn.Module:
  """A float32 transformers causal LM with the weights jaxft trains from.

  A GGUF goes through jaxft's own reader (dequantized to float32, llama.cpp's
  Q/K row permutation undone), so both sides start from bit-identical weights;
  an HF folder or hub id is read by `from_pretrained`.
  """
  if not gguf.is_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(hub.resolve_path(path),
                                                             dtype=torch.float32)
  hf_config = gguf.read_config(path)
  model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
  # A copy: the dequantized arrays may be read-only views, which torch will not wrap.
  state = {k: torch.tensor(read()) for k, read in gguf.checkpoint(path).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  # A tied output layer is the embedding: the GGUF has no tensor for it.
  tied = {"lm_head.weight"} if hf_config.tie_word_embeddings else set()
  if set(missing) - tied or unexpected:
    raise SystemExit(f"{path}: GGUF tensors do not fit the model: missing "
                     f"{sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
  if tied:
    model.tie_weights()
  return model


def with_lora(model: torch.nn.Module, config: ml_collections.ConfigDict) -> torch.nn.Module:
  """peft LoRA as config.lora: rank, alpha (scale alpha / rank), dropout, targets, last_layers.

  jaxft's targets regex full-matches `/`-separated module paths
  (`model/layers/0/self_attn/q_proj`); with `.` for `/` it full-matches
  peft's dotted names. The modules it selects (in the last `last_layers`
  layers of `model.layers`, when set) go to peft by their full names. peft
  initialises A Kaiming-uniform (bound 1 / sqrt(in), as jaxft) from torch's RNG
  and B at zero.
  """
  import peft  # pylint: disable=g-import-not-at-top
  lora = config.lora
  pattern = re.compile(lora.targets.replace("/", r"\."))
  first = model.config.num_hidden_layers - lora.last_layers if lora.last_layers else 0
  def kept(name: str) -> bool:
    index = re.match(r"model\.layers\.(\d+)\.", name)
    return index is None or int(index.group(1)) >= first
  targets = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name) and kept(name)]
  peft_config = peft.LoraConfig(
      task_type=peft.TaskType.CAUSAL_LM, r=lora.rank, lora_alpha=lora.alpha,
      lora_dropout=lora.dropout, target_modules=targets)
  return peft.get_peft_model(model, peft_config)


def decays(name: str) -> bool:
  """jaxft's rule (tuning/rules.py `decays`): decay all but biases and norm parameters."""
  *modules, leaf = name.split(".")
  return leaf != "bias" and not any("norm" in m.lower() for m in modules)


def make_optimizer(model: torch.nn.Module, config: ml_collections.ConfigDict
                   ) -> tuple[torch.optim.AdamW, list[torch.nn.Parameter]]:
  """AdamW over the trainable (adapter) parameters, and those parameters."""
  o = config.optim
  named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  groups = [{"params": [p for n, p in named if decays(n)], "weight_decay": o.weight_decay},
            {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]
  groups = [g for g in groups if g["params"]]
  # The rate is set before every step from lr_schedule; this one is never used.
  optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
  return optimizer, [p for _, p in named]


# --- the loss ----------------------------------------------------------------


def pair_logps(model: torch.nn.Module, rows: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
  """(summed response log-probs, response token counts), each [pairs, 2].

  `rows` are [pairs, 2, length]; they run as one [2 x pairs, length] batch,
  pair-major (chosen and rejected of a pair side by side). Position i scores
  token i + 1 where that token is in the response (loss_mask) and in the
  same, non-padding segment as token i: jaxft's `causal_lm.loss_targets`.
  """
  pairs, _, length = rows["input_ids"].shape
  flat = {k: v.reshape(2 * pairs, length) for k, v in rows.items()}
  segments = flat["segment_ids"]
  logits = model(input_ids=flat["input_ids"], attention_mask=(segments > 0).long(),
                 position_ids=flat["positions"]).logits[:, :-1].float()
  targets = flat["input_ids"][:, 1:]
  picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
  token_logps = picked - torch.logsumexp(logits, dim=-1)
  valid = (flat["loss_mask"][:, 1:] & (segments[:, 1:] == segments[:, :-1])
           & (segments[:, 1:] != 0))
  summed = torch.where(valid, token_logps, torch.zeros_like(token_logps)).sum(-1)
  return summed.reshape(pairs, 2), valid.sum(-1).float().reshape(pairs, 2)


def reference_logps(model, rows: dict[str, torch.Tensor]) -> torch.Tensor:
  """The reference's summed response log-probs [pairs, 2]: the model with adapters off."""
  with torch.no_grad(), model.disable_adapter():
    return pair_logps(model, rows)[0]


def dpo_loss(logps: torch.Tensor, ref: torch.Tensor, beta: float, label_smoothing: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  """Per pair: (loss, chosen reward, rejected reward), from the DPO paper.

  h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x));
  loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h) (eps: label
  smoothing, conservative DPO); rewards beta (pi - ref) of each response.
  """
  chosen = beta * (logps[:, 0] - ref[:, 0])
  rejected = beta * (logps[:, 1] - ref[:, 1])
  z = chosen - rejected  # = beta h
  loss = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
  return loss, chosen, rejected


# --- train and evaluate ------------------------------------------------------


def to_torch(rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """int32 numpy rows -> int64 tensors (what embedding lookups take); loss_mask bool."""
  return {k: torch.from_numpy(np.asarray(rows[k]).astype(bool if k == "loss_mask" else np.int64))
          for k in ROW_KEYS}


class Evaluator:
  """Held-out DPO metrics over every eval pair, as jaxft's DPO.evaluate.

  The reference log-probs are computed at the first eval and kept (the
  reference does not train), as jaxft keeps them in the eval data.
  """

  def __init__(self, rows: dict[str, np.ndarray], batch_size: int, beta: float,
               label_smoothing: float):
    self.rows, self.batch_size = rows, batch_size
    self.beta, self.label_smoothing = beta, label_smoothing
    self.pairs = len(rows["input_ids"])
    self.ref: torch.Tensor | None = None

  def _batches(self):
    for start in range(0, self.pairs, self.batch_size):
      yield to_torch({k: v[start:start + self.batch_size] for k, v in self.rows.items()})

  @torch.no_grad()
  def __call__(self, model: torch.nn.Module) -> dict[str, float]:
    model.eval()
    if self.ref is None:
      self.ref = torch.cat([reference_logps(model, b) for b in self._batches()])
    logps = torch.cat([pair_logps(model, b)[0] for b in self._batches()])
    model.train()
    loss, chosen, rejected = dpo_loss(logps, self.ref, self.beta, self.label_smoothing)
    margin = chosen - rejected
    accuracy = torch.where(margin > 0, 1.0, torch.where(margin == 0, 0.5, 0.0))
    mean = lambda x: float(x.double().mean())
    return {"pairs": self.pairs, "loss": mean(loss), "preference_accuracy": mean(accuracy),
            "reward_margin": mean(margin), "rewards/chosen": mean(chosen),
            "rewards/rejected": mean(rejected), "logps/chosen": mean(logps[:, 0]),
            "logps/rejected": mean(logps[:, 1])}


def train_step(model, optimizer, params, rows: dict[str, torch.Tensor], lr: float,
               config: ml_collections.ConfigDict) -> tuple[float, float, dict[str, float]]:
  """One update on one batch of pairs: (mean loss, pre-clip gradient norm, metrics)."""
  d = config.dpo
  ref = reference_logps(model, rows)
  logps, _ = pair_logps(model, rows)
  losses, chosen, rejected = dpo_loss(logps, ref, d.beta, d.label_smoothing)
  loss = losses.mean()
  optimizer.zero_grad(set_to_none=True)
  loss.backward()
  # Returns the norm before clipping (jaxft logs the same as grad_norm).
  # torch divides by norm + 1e-6, optax by the norm: a relative 1e-6 apart.
  clip = config.optim.clip_norm
  norm = (torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0
          else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
  for group in optimizer.param_groups:
    group["lr"] = lr
  optimizer.step()
  margin = (chosen - rejected).detach()
  metrics = {"rewards/accuracies": float(torch.where(
      margin > 0, 1.0, torch.where(margin == 0, 0.5, 0.0)).mean()),
             "rewards/margins": float(margin.mean())}
  return float(loss.detach()), float(norm), metrics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--recipe", default="dpo", help="configs/<recipe>.py (default: dpo)")
  p.add_argument("--steps", type=int, default=None,
                 help="optimizer steps = config.train.num_steps (default: the recipe's); "
                      "0 evaluates the untrained model only")
  p.add_argument("--eval-every", type=int, default=None,
                 help="steps between evals; 0: only at the end (default: train.eval_every)")
  p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, as jaxft's --config.KEY=VALUE (repeatable)")
  p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  p.add_argument("--log-every", type=int, default=1, help="steps between stderr progress lines")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  process_start = time.perf_counter()
  args = parse_args(argv)
  torch.set_num_threads(args.threads)
  config = make_config(args.recipe, args.sets, args.steps)
  t, d = config.train, config.dpo
  steps = t.num_steps if args.steps is None else args.steps
  eval_every = t.eval_every if args.eval_every is None else args.eval_every
  # torch's RNG draws the LoRA A matrices (jaxft's come from its own JAX key).
  torch.manual_seed(t.seed)

  tokenizer = hub.load_tokenizer(config.model.path)
  train_split, eval_split = preference.prepare(config, tokenizer, need_train=steps > 0)
  if eval_split is None:
    raise SystemExit("config.data.eval is empty: nothing to evaluate")
  log(f"{train_split.pairs if train_split else 0} train pairs, {eval_split.pairs} eval pairs "
      f"of 2 x {config.data.max_length} tokens; {steps} steps of {t.batch_size} pairs")

  model = with_lora(load_model(config.model.path), config)
  model.train()
  optimizer, params = make_optimizer(model, config)
  trainable = sum(p.numel() for p in params)
  log(f"model {config.model.path}: {trainable:,} trainable (LoRA) parameters")
  evaluate = Evaluator(eval_split.rows, t.eval_batch_size, d.beta, d.label_smoothing)
  lr_of = lr_schedule(config)

  def eval_at(step: int) -> dict[str, Any]:
    start = time.perf_counter()
    result = evaluate(model)
    record = {"split": "eval", "step": step, **result,
              "eval_seconds": time.perf_counter() - start}
    emit(record)
    log(f"eval at step {step}: loss {result['loss']:.4f} accuracy "
        f"{result['preference_accuracy']:.4f} margin {result['reward_margin']:.4f}")
    return record

  loop_start = time.perf_counter()
  train_log: list[dict[str, float]] = []
  result = None
  if steps == 0:
    result = eval_at(0)
  else:
    order = batches_lib.TrainBatches(train_split.rows, t.batch_size, t.seed)
    for step in range(1, steps + 1):
      rows = to_torch(order[step - 1])
      lr = lr_of(step - 1)  # optax's count: updates already applied.
      start = time.perf_counter()
      loss, norm, metrics = train_step(model, optimizer, params, rows, lr, config)
      seconds = time.perf_counter() - start
      train_log.append({"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                        "seconds": seconds, **metrics})
      if step % args.log_every == 0 or step == steps:
        log(f"step {step}/{steps} loss {loss:.6f} lr {lr:.3g} grad_norm {norm:.4f} "
            f"{seconds:.3f} s")
      if step == steps or (eval_every and step % eval_every == 0):
        result = eval_at(step)
  wall = time.perf_counter() - loop_start
  step_seconds = [r["seconds"] for r in train_log]
  summary = {
      "split": "summary", "steps": steps, "wall_seconds": wall,
      "process_seconds": time.perf_counter() - process_start,
      "train_seconds": sum(step_seconds),
      "median_step_seconds": statistics.median(step_seconds) if step_seconds else None,
      "accuracy": result["preference_accuracy"], "margin": result["reward_margin"],
      "loss": result["loss"], "eval_pairs": result["pairs"], "trainable_params": trainable,
      "threads": args.threads, "train": train_log,
  }
  emit(summary)
  return summary


if __name__ == "__main__":
  main()
