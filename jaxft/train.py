"""The training loop and the commands built on it: train, eval and export.

Side effects (files, logs, printing) live here; the math is in `steps.py`
and `lm_steps.py`, and what differs between tasks in `tasks.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from jaxft import checkpoint
from jaxft import config as config_lib
from jaxft import hf
from jaxft import host_memory
from jaxft import lora
from jaxft import metrics as metrics_lib
from jaxft import mfu
from jaxft import optim
from jaxft import preemption
from jaxft import profiling
from jaxft import rules
from jaxft import sharding
from jaxft import steps
from jaxft import tasks
from jaxft import trainable
from jaxft.data import batches as batches_lib
from jaxft.data import prefetch
from jaxft.errors import UserError
from jaxft.models import layers

EXPORT_FORMATS = ("hf", "peft")


log = metrics_lib.log


@dataclasses.dataclass
class Run:
  """A model with its train state, restored from DIR/checkpoints or freshly loaded."""
  split: trainable.Split
  state: steps.State
  tx: optax.GradientTransformation
  hf_config: Any
  checkpointer: checkpoint.Checkpointer
  placement: Placement
  task: tasks.Classify | tasks.CausalLM | tasks.ImageClassify

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
        self.task.eval_step, graphdef=self.split.graphdef, rest=self.split.rest))
    # Per-example outputs stay split like the batch; sums are replicated.
    out = p.batch if self.task.per_example_eval else p.replicated
    return jax.jit(fn, in_shardings=(p.state["params"], p.state["frozen"], p.batch),
                   out_shardings=out)


@dataclasses.dataclass
class Placement:
  """Where a run's arrays live: the mesh, the logical rules and the shardings.

  Attributes:
    mesh: the device mesh of config.mesh.
    rules: logical axis name -> mesh axes.
    state: shardings of the train state (same structure).
    batch: sharding of every batch array (rows split over data x fsdp).
    attention: config.model.attention (see layers.attention_implementation).
  """
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  state: Any
  batch: jax.sharding.NamedSharding
  attention: str = "jaxft"

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def traced_under_rules(self, fn):
    """`fn` with activation constraints and the attention choice active while jit traces it."""
    def wrapped(*args, **kwargs):
      with sharding.activation_rules(self.mesh, self.rules), \
          layers.attention_implementation(self.attention):
        return fn(*args, **kwargs)
    return wrapped


def placement(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
              abstract_state: Any) -> Placement:
  rules_ = sharding.logical_rules(config)
  return Placement(mesh, rules_, sharding.tree_shardings(abstract_state, mesh, rules_),
                   sharding.batch_sharding(mesh, rules_), config.model.get("attention", "jaxft"))


def make_step_fn(config: ml_collections.ConfigDict, split: trainable.Split,
                 tx: optax.GradientTransformation, where: Placement,
                 objective: steps.Objective):
  """The jitted, sharded train step (state donated), as `train` runs and `inspect` compiles it."""
  t = config.train
  fn = where.traced_under_rules(functools.partial(
      steps.train_step, objective=objective, graphdef=split.graphdef,
      rest=split.rest, tx=tx, grad_accum=t.grad_accum, dropout_key=jax.random.key(t.seed)))
  return jax.jit(fn, in_shardings=(where.state, where.batch),
                 out_shardings=(where.state, where.replicated), donate_argnums=0)


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
             labels: list[str] | None, *, quiet: bool = False, task: Any = None) -> Run:
  """Restores the latest checkpoint in `workdir`, or loads the pretrained model.

  `labels` are the class names of a classifier (None for a language model).
  Prints the rules table (which parameters train, how fast) unless `quiet`.
  `task` is the config's task when the caller already has it.
  """
  task = task or tasks.of(config)
  mesh = sharding.make_mesh(config)
  rules_ = sharding.logical_rules(config)
  hf_config = task.hf_config(model_path, labels)
  sharding.check_fits(config, mesh, hf_config.num_attention_heads)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                 every=config.checkpoint.every)
  latest = ckpt.latest_step()
  if latest is None:
    loaded = task.load(config, model_path, labels,
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
  return Run(split, state, tx, hf_config, ckpt, where, task)


# Keys that decide the checkpoint's structure (what is trainable, its dtype).
_PARTITION_KEYS = ("optim.rules", "optim.layer_decay", "optim.optimizer", "lora",
                   "model.frozen_dtype", "model.scan_layers")


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

  defaults = json.loads(config_lib.to_json(config_lib.base()))
  for key in _PARTITION_KEYS:
    # A key newer than the workdir's config had its default then.
    was = get(saved, key) if get(saved, key) != {} else get(defaults, key)
    if was != get(now, key):
      raise UserError(f"{workdir} was trained with config.{key}={was!r}, not "
                      f"{get(now, key)!r}; its checkpoints cannot resume with other "
                      "trainable parameters. Use a new --workdir.")


def _report_load(report: hf.LoadReport) -> None:
  if report.missing:
    log(f"initialised (not in checkpoint): {', '.join(report.missing)}")
  if report.unexpected:
    log(f"unused checkpoint weights: {', '.join(report.unexpected)}")


def _prepare(config: ml_collections.ConfigDict, workdir: str, *,
             need_train: bool) -> tuple[str, Any, tasks.Data]:
  """(local model path, the task, its data); UserError on any bad config or input."""
  config_lib.validate(config)
  model_path = hf.resolve_model(config.model.path, allow_pickle=config.model.allow_pickle)
  task = tasks.of(config)
  tokenizer = hf.load_tokenizer(model_path) if task.uses_tokenizer else None
  data = task.prepare(config, tokenizer, read_labels(workdir), need_train=need_train)
  return model_path, task, data


def _write_atomic(path: str, text: str) -> None:
  """Other processes of a multi-host run may read `path` meanwhile: never half-written."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def train(config: ml_collections.ConfigDict, workdir: str,
          profile_steps: int = 0) -> dict[str, float] | None:
  """Trains (or resumes) to `train.num_steps`; returns the final eval metrics if any.

  `profile_steps` > 0 writes a JAX trace of that many steps to DIR/profile.
  """
  # Before anything starts JAX's backend: its threads must not have allocated yet.
  host_memory.apply(config.train.get("host_memory", "auto"))
  profiling.use_compilation_cache(config.train.get("compilation_cache", ""))
  model_path, task, data = _prepare(config, workdir, need_train=True)
  os.makedirs(workdir, exist_ok=True)
  run = open_run(config, workdir, model_path, data.labels, task=task)
  if metrics_lib.is_primary():
    _write_atomic(os.path.join(workdir, "config.json"), config_lib.to_json(config))
    if data.labels is not None:
      _write_atomic(_labels_file(workdir), json.dumps(data.labels))
  log(f"{data.describe()}; step {run.step} -> {config.train.num_steps}")
  try:
    return _loop(config, workdir, run, data, profile_steps)
  finally:
    run.checkpointer.close()  # Waits for a pending async save.


def _loop(config: ml_collections.ConfigDict, workdir: str, run: Run, data: tasks.Data,
          profile_steps: int = 0) -> dict[str, float] | None:
  t = config.train
  step_fn = make_step_fn(config, run.split, run.tx, run.placement, run.task.objective)
  batches = batches_lib.TrainBatches(data.train, t.batch_size, t.seed)
  writer = metrics_lib.JsonlWriter(workdir)
  lr = optim.schedule(config)
  progress = metrics_lib.Progress(run.step, t.num_steps, t.batch_size, t.log_every)
  trace = profiling.StepTrace(workdir, run.step, profile_steps)
  tokens = run.task.tokens_per_example(config, run.hf_config)
  flops_per_example = tokens * _flops_per_token(run, tokens)
  peak = _total_peak() if t.log_every else 0.0  # Measured on CPU: only when it is logged.

  def run_eval() -> dict[str, float]:
    result = run.task.evaluate(run, data, config, workdir)
    writer.write(run.step, "eval", result)
    return result

  make_batch = lambda step: sharding.global_batch(batches.lazy(step - 1), run.placement.batch)
  with preemption.StopRequest() as stop, prefetch.Prefetch(
      make_batch, run.step + 1, t.num_steps, t.get("prefetch", 0)) as upcoming:
    for step in range(run.step + 1, t.num_steps + 1):
      batch = upcoming.get(step)
      # Between log steps nothing waits for the device: dispatch runs ahead of it.
      with jax.transfer_guard_device_to_host("disallow"):
        trace.before(step)
        run.state, m = step_fn(run.state, batch)
        trace.after(step, run.state)
      loss = None
      if t.log_every and step % t.log_every == 0:
        m = {k: float(v) for k, v in m.items()}
        rate = progress.examples_per_sec(step)
        # Row tokens, padding included: a packed LM batch is nearly all real tokens.
        writer.write(step, "train", {**m, "lr": float(lr(step - 1)), "examples_per_sec": rate,
                                     "tokens_per_sec": rate * tokens,
                                     "mfu": rate * flops_per_example / peak})
        loss = m["loss"]
      progress.update(step, loss)
      if step == t.num_steps:
        break
      if data.eval is not None and t.eval_every and step % t.eval_every == 0:
        run_eval()
      if run.checkpointer.should_save(step) or stop.signum is not None:
        run.checkpointer.save(step, run.state, {"step": step})
      if stop.signum is not None:
        progress.close()
        raise preemption.Interrupted(stop.signum, step)
  progress.close()
  trace.stop(run.state)  # A run shorter than the trace still gets one.
  if run.checkpointer.latest_step() != run.step:
    run.checkpointer.save(run.step, run.state, {"step": run.step})
  if data.eval is None:
    return None
  result = run_eval()
  log(f"held-out eval at step {run.step}: " + ", ".join(
      f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, (int, float))))
  return result


def _flops_per_token(run: Run, seq_len: int) -> float:
  """Training FLOPs per token of the run's model (mfu.py's convention)."""
  sizes = run.split.sizes
  tied = run.task.name == tasks.CausalLM.name and not any(
      p.startswith("lm_head/") for p in sizes)
  layers, attn_dim = mfu.model_shape(run.hf_config)
  return mfu.train_flops_per_token(mfu.matmul_params(sizes, tied), layers, seq_len, attn_dim)


def _total_peak() -> float:
  """Peak FLOP/s of all devices; CPU "devices" share one host, measured once."""
  if jax.devices()[0].platform == "cpu":
    return mfu.peak_flops() * jax.process_count()
  return mfu.peak_flops() * jax.device_count()


def eval_command(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Evaluates the latest checkpoint in `workdir`, or the pretrained model if none."""
  model_path, task, data = _prepare(config, workdir, need_train=False)
  if data.eval is None:
    raise UserError("config.data.eval is empty: nothing to evaluate")
  run = open_run(config, workdir, model_path, data.labels, task=task)
  try:
    result = run.task.evaluate(run, data, config)
  finally:
    run.checkpointer.close()
  return {"step": run.step, **result}


def restore(workdir: str) -> tuple[ml_collections.ConfigDict, Run, str]:
  """(the run's config, its latest checkpoint opened, the local model path) for a workdir.

  Raises:
    UserError: not a jaxft workdir, or no checkpoint in it yet.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{workdir} is not a jaxft workdir (no config.json)")
  with open(path, encoding="utf-8") as f:
    config = config_lib.from_json(f.read())
  labels = read_labels(workdir)
  if labels is None and trainable.task(config) != tasks.CausalLM.name:
    raise UserError(f"{workdir} is not a jaxft workdir (no labels.json)")
  checkpointer = checkpoint.Checkpointer(workdir)
  if checkpointer.latest_step() is None:
    raise UserError(f"no checkpoint in {checkpointer.directory}: train first")
  checkpointer.close()
  model_path = hf.resolve_model(config.model.path, allow_pickle=config.model.allow_pickle)
  run = open_run(config, workdir, model_path, labels, quiet=True)
  run.checkpointer.close()  # Callers only read the restored state.
  return config, run, model_path


def export_command(workdir: str, out_dir: str, fmt: str = "hf") -> None:
  """Writes the latest checkpoint of `workdir` as a Hugging Face folder.

  `fmt` "hf": a full checkpoint (LoRA adapters merged into the kernels) that
  transformers loads as is (a language model with its tokenizer and chat
  template); "peft": only the LoRA adapters and the trained modules, as a
  PEFT adapter over the run's base model.
  """
  if fmt not in EXPORT_FORMATS:
    raise UserError(f"--format must be one of {EXPORT_FORMATS}, got {fmt!r}")
  config, run, model_path = restore(workdir)
  if fmt == "peft":
    if not lora.enabled(config):
      raise UserError(f"--format=peft needs a LoRA run; {workdir} trained without "
                      "config.lora.rank (use --format=hf)")
    lora.export_peft(run.model(), run.hf_config, config, run.split.assignment.trainable(),
                     out_dir, base_model=config.model.path, task=run.task.name)
    if jax.process_index() == 0:
      hf.load_tokenizer(model_path).save_pretrained(out_dir)
  else:
    run.task.export(run, config, model_path, out_dir)
  log(f"exported step {run.step} to {out_dir} ({fmt})")
