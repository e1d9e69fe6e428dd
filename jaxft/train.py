"""The training loop and the commands built on it: train, eval and export.

Side effects (files, logs, printing) live here; the math is in `steps.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxft import checkpoint
from jaxft import config as config_lib
from jaxft import hf
from jaxft import lora
from jaxft import metrics as metrics_lib
from jaxft import optim
from jaxft import preemption
from jaxft import rules
from jaxft import sharding
from jaxft import steps
from jaxft import trainable
from jaxft.data import batches as batches_lib
from jaxft.data import text
from jaxft.errors import UserError

EXPORT_FORMATS = ("hf", "peft")


def log(msg: str) -> None:
  if metrics_lib.is_primary():
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Run:
  """A model with its train state, restored from DIR/checkpoints or freshly loaded."""
  split: trainable.Split
  state: steps.State
  tx: optax.GradientTransformation
  hf_config: Any
  checkpointer: checkpoint.Checkpointer
  placement: Placement

  @property
  def step(self) -> int:
    return int(self.state["step"])

  def model(self) -> nnx.Module:
    """The current model, frozen and trained parameters together."""
    return self.split.merge(self.state["params"], self.state["frozen"])

  @functools.cached_property
  def eval_fn(self):
    """The jitted eval step, compiled once per run."""
    p = self.placement
    fn = p.traced_under_rules(functools.partial(
        steps.eval_step, graphdef=self.split.graphdef, rest=self.split.rest))
    return jax.jit(fn, in_shardings=(p.state["params"], p.state["frozen"], p.batch),
                   out_shardings=p.batch)


@dataclasses.dataclass
class Placement:
  """Where a run's arrays live: the mesh, the logical rules and the shardings.

  Attributes:
    mesh: the device mesh of config.mesh.
    rules: logical axis name -> mesh axes.
    state: shardings of the train state (same structure).
    batch: sharding of every batch array (rows split over data x fsdp).
  """
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  state: Any
  batch: jax.sharding.NamedSharding

  def traced_under_rules(self, fn):
    """`fn` with activation constraints active while jit traces it."""
    def wrapped(*args, **kwargs):
      with sharding.activation_rules(self.mesh, self.rules):
        return fn(*args, **kwargs)
    return wrapped


def placement(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
              abstract_state: Any) -> Placement:
  rules_ = sharding.logical_rules(config)
  return Placement(mesh, rules_, sharding.tree_shardings(abstract_state, mesh, rules_),
                   sharding.batch_sharding(mesh, rules_))


def make_step_fn(config: ml_collections.ConfigDict, split: trainable.Split,
                 tx: optax.GradientTransformation, where: Placement):
  """The jitted, sharded train step (state donated), as `train` runs and `inspect` compiles it."""
  t = config.train
  fn = where.traced_under_rules(functools.partial(
      steps.train_step, graphdef=split.graphdef, rest=split.rest, tx=tx,
      grad_accum=t.grad_accum, dropout_key=jax.random.key(t.seed)))
  replicated = jax.sharding.NamedSharding(where.mesh, jax.sharding.PartitionSpec())
  return jax.jit(fn, in_shardings=(where.state, where.batch),
                 out_shardings=(where.state, replicated), donate_argnums=0)


def _labels_file(workdir: str) -> str:
  return os.path.join(workdir, "labels.json")


def read_labels(workdir: str) -> list[str] | None:
  """The label names a run in `workdir` trained with, or None for a new workdir."""
  path = _labels_file(workdir)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def open_run(config: ml_collections.ConfigDict, workdir: str, model_path: str,
             labels: list[str], *, quiet: bool = False) -> Run:
  """Restores the latest checkpoint in `workdir`, or loads the pretrained model.

  Prints the rules table (which parameters train, how fast) unless `quiet`.
  """
  mesh = sharding.make_mesh(config)
  rules_ = sharding.logical_rules(config)
  id2label = dict(enumerate(labels))
  hf_config = hf.load_hf_config(model_path, num_labels=len(labels), id2label=id2label)
  sharding.check_fits(config, mesh, hf_config.num_attention_heads)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                 every=config.checkpoint.every)
  latest = ckpt.latest_step()
  if latest is None:
    loaded = hf.load_classifier(model_path, num_labels=len(labels), id2label=id2label,
                                dtype=trainable.compute_dtype(config), seed=config.train.seed,
                                allow_pickle=config.model.allow_pickle,
                                shardings=lambda s: sharding.tree_shardings(s, mesh, rules_))
    _report_load(loaded.report)
    model = trainable.with_adapters(loaded.model, config)
  else:
    _check_same_partition(config, workdir)
    # The checkpoint holds every parameter: build the model's shapes only.
    model = trainable.abstract_model(hf_config, config)
  split = trainable.split(model, config, hf_config.model_type)
  if not quiet:
    log(rules.table(split.assignment, split.sizes, config.optim.weight_decay))
  tx = optim.build(config, split.params, split.assignment)
  abstract = jax.eval_shape(functools.partial(steps.init_state, tx=tx), split.params, split.frozen)
  where = placement(config, mesh, abstract)
  if latest is None:
    state = jax.device_put(steps.init_state(split.params, split.frozen, tx), where.state)
  else:
    state, _ = ckpt.restore(sharding.with_shardings(abstract, where.state), latest)
    log(f"restored checkpoint at step {latest} from {ckpt.directory}")
  return Run(split, state, tx, hf_config, ckpt, where)


# Keys that decide the checkpoint's structure (what is trainable, its dtype).
_PARTITION_KEYS = ("optim.rules", "optim.layer_decay", "optim.optimizer", "lora",
                   "model.frozen_dtype")


def _check_same_partition(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises UserError if the run in `workdir` split its parameters differently."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  now = json.loads(config_lib.to_json(config))

  def get(tree: dict, key: str) -> Any:
    for part in key.split("."):
      tree = tree.get(part, {})
    return tree

  for key in _PARTITION_KEYS:
    if get(saved, key) != get(now, key):
      raise UserError(f"{workdir} was trained with config.{key}={get(saved, key)!r}, not "
                      f"{get(now, key)!r}; its checkpoints cannot resume with other "
                      "trainable parameters. Use a new --workdir.")


def _report_load(report: hf.LoadReport) -> None:
  if report.missing:
    log(f"initialised (not in checkpoint): {', '.join(report.missing)}")
  if report.unexpected:
    log(f"unused checkpoint weights: {', '.join(report.unexpected)}")


def evaluate(run: Run, examples: dict[str, np.ndarray], batch_size: int,
             num_labels: int) -> dict[str, float]:
  """Loss, accuracy and macro-F1 over every eval example (no example dropped)."""
  losses, preds, weights = [], [], []
  for batch in batches_lib.eval_batches(examples, batch_size):
    weight = batch.pop("weight")
    batch = sharding.global_batch(batch, run.placement.batch)
    loss, pred = run.eval_fn(run.state["params"], run.state["frozen"], batch)
    losses.append(sharding.to_host(loss))
    preds.append(sharding.to_host(pred))
    weights.append(weight)
  keep = np.concatenate(weights) > 0
  loss = np.concatenate(losses)[keep]
  scores = metrics_lib.classification(examples["label"], np.concatenate(preds)[keep], num_labels)
  return {"loss": float(loss.mean()), **scores}


def _prepare(config: ml_collections.ConfigDict, workdir: str, *, need_train: bool):
  config_lib.validate(config)
  model_path = hf.resolve_path(config.model.path, allow_pickle=config.model.allow_pickle)
  tokenizer = hf.load_tokenizer(model_path)
  train_ex, eval_ex, labels = text.prepare(config, tokenizer, read_labels(workdir),
                                           need_train=need_train)
  return model_path, train_ex, eval_ex, labels


def _write_atomic(path: str, text: str) -> None:
  """Other processes of a multi-host run may read `path` meanwhile: never half-written."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float] | None:
  """Trains (or resumes) to `train.num_steps`; returns the final eval metrics if any."""
  model_path, train_ex, eval_ex, labels = _prepare(config, workdir, need_train=True)
  os.makedirs(workdir, exist_ok=True)
  run = open_run(config, workdir, model_path, labels)
  if metrics_lib.is_primary():
    _write_atomic(os.path.join(workdir, "config.json"), config_lib.to_json(config))
    _write_atomic(_labels_file(workdir), json.dumps(labels))
  log(f"{batches_lib.num_examples(train_ex)} train examples, {len(labels)} classes; "
      f"step {run.step} -> {config.train.num_steps}")
  try:
    return _loop(config, workdir, run, train_ex, eval_ex, len(labels))
  finally:
    run.checkpointer.close()  # Waits for a pending async save.


def _loop(config: ml_collections.ConfigDict, workdir: str, run: Run, train_ex: dict,
          eval_ex: dict | None, num_labels: int) -> dict[str, float] | None:
  t = config.train
  step_fn = make_step_fn(config, run.split, run.tx, run.placement)
  data = batches_lib.TrainBatches(train_ex, t.batch_size, t.seed)
  writer = metrics_lib.JsonlWriter(workdir)
  lr = optim.schedule(config)
  progress = metrics_lib.Progress(run.step, t.num_steps, t.batch_size, t.log_every)

  def run_eval() -> dict[str, float]:
    result = evaluate(run, eval_ex, t.eval_batch_size, num_labels)
    writer.write(run.step, "eval", result)
    return result

  with preemption.StopRequest() as stop:
    for step in range(run.step + 1, t.num_steps + 1):
      batch = sharding.global_batch(data.lazy(step - 1), run.placement.batch)
      run.state, m = step_fn(run.state, batch)
      loss = None
      if t.log_every and step % t.log_every == 0:
        m = {k: float(v) for k, v in m.items()}
        writer.write(step, "train", {**m, "lr": float(lr(step - 1)),
                                     "examples_per_sec": progress.examples_per_sec(step)})
        loss = m["loss"]
      progress.update(step, loss)
      if step == t.num_steps:
        break
      if eval_ex is not None and t.eval_every and step % t.eval_every == 0:
        run_eval()
      if run.checkpointer.should_save(step) or stop.signum is not None:
        run.checkpointer.save(step, run.state, {"step": step})
      if stop.signum is not None:
        progress.close()
        raise preemption.Interrupted(stop.signum, step)
  progress.close()
  if run.checkpointer.latest_step() != run.step:
    run.checkpointer.save(run.step, run.state, {"step": run.step})
  if eval_ex is None:
    return None
  result = run_eval()
  log(f"held-out eval at step {run.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
  return result


def eval_command(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Evaluates the latest checkpoint in `workdir`, or the pretrained model if none."""
  model_path, _, eval_ex, labels = _prepare(config, workdir, need_train=False)
  if eval_ex is None:
    raise UserError("config.data.eval is empty: nothing to evaluate")
  run = open_run(config, workdir, model_path, labels)
  try:
    result = evaluate(run, eval_ex, config.train.eval_batch_size, len(labels))
  finally:
    run.checkpointer.close()
  return {"step": run.step, **result}


def export_command(workdir: str, out_dir: str, fmt: str = "hf") -> None:
  """Writes the latest checkpoint of `workdir` as a Hugging Face folder.

  `fmt` "hf": a full checkpoint (LoRA adapters merged into the kernels) that
  transformers loads as is; "peft": only the LoRA adapters and the trained
  modules, as a PEFT adapter over the run's base model.
  """
  if fmt not in EXPORT_FORMATS:
    raise UserError(f"--format must be one of {EXPORT_FORMATS}, got {fmt!r}")
  path = os.path.join(workdir, "config.json")
  labels = read_labels(workdir)
  if not os.path.exists(path) or labels is None:
    raise UserError(f"{workdir} is not a jaxft workdir (no config.json / labels.json)")
  with open(path, encoding="utf-8") as f:
    config = config_lib.from_json(f.read())
  if fmt == "peft" and not lora.enabled(config):
    raise UserError(f"--format=peft needs a LoRA run; {workdir} trained without "
                    "config.lora.rank (use --format=hf)")
  checkpointer = checkpoint.Checkpointer(workdir)
  if checkpointer.latest_step() is None:
    raise UserError(f"no checkpoint in {checkpointer.directory}: train first")
  checkpointer.close()
  model_path = hf.resolve_path(config.model.path, allow_pickle=config.model.allow_pickle)
  run = open_run(config, workdir, model_path, labels, quiet=True)
  run.checkpointer.close()  # Export only reads the restored state.
  model = run.model()
  if fmt == "peft":
    lora.export_peft(model, run.hf_config, config, run.split.assignment.trainable(), out_dir,
                     base_model=config.model.path)
    if jax.process_index() == 0:
      hf.load_tokenizer(model_path).save_pretrained(out_dir)
  else:
    hf.export_classifier(lora.merge(model), run.hf_config, out_dir, tokenizer_path=model_path)
  log(f"exported step {run.step} to {out_dir} ({fmt})")
