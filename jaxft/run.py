"""A run: its workdir, its model and train state, and how it is opened or resumed.

`open_run` restores the latest checkpoint of a workdir, or loads the
pretrained model for a new one; `restore` reopens a finished run for `eval`,
`export` and `generate --workdir`. A workdir keeps the resolved config
(`config.json`, plus one file per resume that changed it: `run_record`), a
classifier's class names (`labels.json`), `metrics.jsonl`
and `checkpoints/`, locally or at a gs:// URL (`storage`); a resumed run must
split its parameters as the saved one did. A run with frozen parameters
checkpoints only what trains and its optimizer state: on resume the frozen
ones are read again from the base checkpoint, whose fingerprint the
checkpoint keeps (`formats.fingerprint`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from jaxft import checkpoint
from jaxft import config as config_lib
from jaxft import metrics
from jaxft import sharding
from jaxft import steps
from jaxft.runtime import run_record
from jaxft.runtime import storage
from jaxft import tasks
from jaxft.errors import UserError
from jaxft.formats import fingerprint
from jaxft.formats import hf
from jaxft.formats import hub
from jaxft.models import attention as attention_lib
from jaxft.tuning import lora
from jaxft.tuning import optimizer
from jaxft.tuning import rules
from jaxft.tuning import trainable

log = metrics.log


@dataclasses.dataclass
class Run:
  """A model with its train state, restored from DIR/checkpoints or freshly loaded."""
  split: trainable.Split
  state: steps.State
  tx: optax.GradientTransformation
  hf_config: Any
  checkpointer: checkpoint.Checkpointer
  placement: sharding.Placement
  task: tasks.Task
  # The base checkpoint's fingerprint when frozen weights are re-read from it on
  # resume (checkpoints then skip them), else None.
  base: dict | None = None
  meta: dict = dataclasses.field(default_factory=dict)  # The restored checkpoint's metadata.
  # Params initialised at random: neither in the base checkpoint nor trained (no checkpoint).
  untrained: tuple[str, ...] = ()

  @property
  def step(self) -> int:
    return int(self.state["step"])

  def save(self, step: int, metrics: dict[str, float] | None = None,
           meta: dict | None = None) -> None:
    """Starts saving the state at `step`: what trains and its optimizer state, plus the
    frozen weights only when they cannot be re-read from the base checkpoint.

    `metrics`: the eval results at `step` (for the best checkpoint); `meta`: more
    JSON metadata to keep with it.
    """
    state, meta = self.state, {**(meta or {}), "step": step}
    if self.base is not None:
      state = {k: v for k, v in state.items() if k != "frozen"}
      meta["base"] = self.base
    meta["state_keys"] = sorted(state)  # What `open_run` may restore (older ones lack "skip").
    self.checkpointer.save(step, state, meta, metrics)

  def model(self) -> nnx.Module:
    """The current model: frozen and trained parameters and BatchNorm statistics together."""
    return self.split.merge(self.state["params"], self.state["frozen"], self.state["stats"])

  def eval_fn(self, params: nnx.State, frozen: nnx.State, batch: dict) -> Any:
    """The task's eval step (jitted once per run) on `batch`, with these parameters and the
    run's current BatchNorm statistics."""
    return self._eval_jit(params, frozen, self.state["stats"], batch)

  @functools.cached_property
  def _eval_jit(self):
    p = self.placement
    step = functools.partial(self.task.eval_step, graphdef=self.split.graphdef)
    rest = self.split.rest

    def fn(params, frozen, stats, batch):
      # The statistics are an argument, not a constant: they move as the run trains.
      return step(params, frozen, batch, rest=nnx.merge_state(rest, stats))
    fn = traced(fn, p, self.task.config.model.get("attention", "auto"))
    # Per-example outputs stay split like the batch; sums are replicated.
    out = p.batch if self.task.per_example_eval else p.replicated
    return jax.jit(fn, in_shardings=(p.state["params"], p.state["frozen"], p.state["stats"],
                                     p.batch), out_shardings=out)


def traced(fn, where: sharding.Placement, attention: str):
  """`fn` with the activation constraints and the attention choice active while jit traces it.

  `attention` (config.ATTENTION) `auto` resolves while tracing, by the platform
  of the mesh's devices (attention.current_implementation), not the default
  backend: a TPU topology compiled on a CPU is TPU.
  """
  fn = where.traced_under_rules(fn)

  def wrapped(*args, **kwargs):
    with attention_lib.attention_implementation(attention):
      return fn(*args, **kwargs)
  return wrapped


def make_step_fn(config: ml_collections.ConfigDict, split: trainable.Split,
                 tx: optax.GradientTransformation, where: sharding.Placement,
                 objective: steps.Objective):
  """The jitted, sharded train step (state donated), as `train` runs and `inspect` compiles it."""
  t = config.train
  fn = traced(functools.partial(
      steps.train_step, objective=objective, graphdef=split.graphdef,
      rest=split.rest, tx=tx, grad_accum=t.grad_accum, dropout_key=jax.random.key(t.seed),
      max_skipped_steps=t.get("max_skipped_steps", 10), skip_spikes=t.get("skip_spikes", 0.0)),
      where, config.model.get("attention", "auto"))
  return jax.jit(fn, in_shardings=(where.state, where.batch),
                 out_shardings=(where.state, where.replicated), donate_argnums=0)


def labels_file(workdir: str) -> str:
  return storage.join(workdir, "labels.json")


def read_labels(workdir: str) -> list[str] | None:
  """The label names a run in `workdir` trained with, or None for a new workdir."""
  path = labels_file(workdir)
  if not storage.exists(path):
    return None
  return json.loads(storage.read_text(path))


def open_run(config: ml_collections.ConfigDict, workdir: str, model_path: str,
             labels: list[str] | None, *, quiet: bool = False,
             task: tasks.Task | None = None, step: int | None = None,
             move_damaged: bool = False) -> Run:
  """Restores the latest checkpoint in `workdir`, or loads the pretrained model.

  `labels` are the class names of a classifier (None for a language model).
  Prints the rules table (which parameters train, how fast) unless `quiet`.
  `task` is the config's task when the caller already has it; `step` a kept
  checkpoint to restore instead of the latest (else the newest intact one, see
  config.checkpoint.on_corrupt); `move_damaged`: move damaged newer checkpoints
  aside (training, whose next saves reuse their steps).
  """
  task = task or tasks.of(config)
  mesh = sharding.make_mesh(config)
  rules_ = sharding.logical_rules(config)
  hf_config = task.hf_config(model_path, labels)
  t = config.train
  sharding.check_fits(mesh, batch_size=t.batch_size, grad_accum=t.grad_accum,
                      eval_batch_size=t.eval_batch_size,
                      num_heads=getattr(hf_config, "num_attention_heads", None))
  ckpt = checkpoint.Checkpointer.of(workdir, config)
  latest = step
  if step is None:
    latest, skipped = ckpt.newest_intact(move_aside=move_damaged)
    for line in skipped:
      log(f"skipping {line}")
  meta = {} if latest is None else ckpt.meta(latest)
  saved_base = meta.get("base")
  untrained = ()
  if latest is not None:
    _check_same_partition(config, workdir)
  if latest is None or saved_base is not None:
    if saved_base is not None:
      _check_same_base(saved_base, model_path, ckpt.directory, latest)
    # A QLoRA base is quantized tensor by tensor as it is read: never whole and dense.
    quantized = trainable.quantized_linears(
        trainable.abstract_model(hf_config, config, task.model_kind), config,
        task.fresh_heads(hf_config))
    loaded = task.load(model_path, hf_config,
                       shardings=lambda s: sharding.tree_shardings(s, mesh, rules_),
                       quantized=quantized)
    if latest is None:
      _report_load(loaded.report)
      untrained = tuple(loaded.report.missing)
    model = trainable.with_adapters(loaded.model, config)
  else:
    # The checkpoint holds every parameter: build the model's shapes only.
    model = trainable.abstract_model(hf_config, config, task.model_kind)
  split = trainable.split(model, config, task.fresh_heads(hf_config))
  if not quiet:
    log(rules.table(split.assignment, split.sizes, config.optim.weight_decay))
  tx = optimizer.build(config, split.params, split.assignment)
  abstract = abstract_state(split, tx)
  where = sharding.placement(mesh, rules_, abstract)
  if latest is None:
    state = jax.device_put(steps.init_state(split.params, split.frozen, tx, split.stats),
                           where.state)
  else:
    targets = sharding.with_shardings(abstract, where.state)
    # Not in the checkpoint: frozen weights re-read from the base; what a checkpoint
    # saved before the key existed lacks (the skipped-step counters of a new run; no
    # BatchNorm statistics, as no model then had any).
    saved_keys = meta.get("state_keys", ())
    absent = {"frozen"} if saved_base is not None else set()
    absent |= {k for k in ("skip", "stats") if k not in saved_keys}
    state, _ = ckpt.restore({k: v for k, v in targets.items() if k not in absent}, latest)
    if saved_base is not None:
      state["frozen"] = jax.device_put(split.frozen, where.state["frozen"])
    if "skip" in absent:
      state["skip"] = jax.device_put(steps.init_skip(), where.state["skip"])
    if "stats" in absent:
      state["stats"] = jax.device_put(split.stats, where.state["stats"])
    log(f"restored checkpoint at step {latest} from {ckpt.directory}")
  base = _base_fingerprint(config, model_path, split)
  return Run(split, state, tx, hf_config, ckpt, where, task, base, meta, untrained)


def abstract_state(split: trainable.Split, tx: optax.GradientTransformation) -> steps.State:
  """The train state of `split` under `tx` as shapes only: what `open_run` places and
  `jaxft inspect` compiles."""
  return jax.eval_shape(functools.partial(steps.init_state, tx=tx), split.params, split.frozen,
                        stats=split.stats)


def _base_fingerprint(config: ml_collections.ConfigDict, model_path: str,
                      split: trainable.Split) -> dict | None:
  """The base checkpoint's fingerprint when the run's frozen weights can be re-read from it.

  None (checkpoints then hold the frozen weights too) when nothing is frozen
  or the model was initialised from scratch rather than read.
  """
  if config.model.get("from_scratch") or not jax.tree.leaves(split.frozen):
    return None
  return {"path": config.model.path, **fingerprint.of(model_path)}


def _check_same_base(saved: dict, model_path: str, directory: str, step: int) -> None:
  """Raises UserError unless `model_path` is the base checkpoint step `step` was trained on."""
  changed = fingerprint.differences(saved, fingerprint.of(model_path))
  if changed:
    raise UserError(
        f"checkpoint {step} in {directory} keeps only the trained weights and re-reads the "
        f"frozen ones from its base checkpoint {saved.get('path')!r}, but {model_path} is not "
        f"that checkpoint ({'; '.join(changed[:3])}); set config.model.path to the original "
        "base model")


# Keys that decide the checkpoint's structure (what is trainable, its dtype).
_PARTITION_KEYS = ("optim.rules", "optim.layer_decay", "optim.optimizer", "lora",
                   "model.frozen_dtype", "model.scan_layers")


def _check_same_partition(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises UserError if the run in `workdir` split its parameters differently."""
  last = run_record.latest_config(workdir)
  if last is None:
    return
  defaults = run_record.changes(ml_collections.ConfigDict(), config_lib.base())
  for key, (was, now) in run_record.changes(last, config).items():
    if not any(key == k or key.startswith(k + ".") for k in _PARTITION_KEYS):
      continue
    if was is None and key in defaults and defaults[key][1] == now:
      continue  # A key newer than the workdir's config: it had its default then.
    raise UserError(f"{workdir} was trained with config.{key}={was!r}, not {now!r}: its "
                    "checkpoints hold other trainable parameters. Leave out --config to use "
                    "the run's own config, repeat its overrides, or train in a new --workdir.")


def _report_load(report: hf.LoadReport) -> None:
  if report.replaced:
    log(f"new head for this label set (the checkpoint's has other shapes): "
        f"{', '.join(report.replaced)}")
  if report.missing:
    log(f"initialised (not in checkpoint): {', '.join(report.missing)}")
  if report.unexpected:
    log(f"unused checkpoint weights: {', '.join(report.unexpected)}")


def prepare(config: ml_collections.ConfigDict, workdir: str, *,
            need_train: bool) -> tuple[str, tasks.Task, tasks.Data]:
  """(local model path, the task, its data); UserError on any bad config or input."""
  config_lib.validate(config)
  model_path = hub.resolve_model(config.model.path, allow_pickle=config.model.allow_pickle)
  task = tasks.of(config)
  data = task.prepare(model_path, read_labels(workdir), need_train=need_train)
  return model_path, task, data


def restore(workdir: str, *, config: ml_collections.ConfigDict | None = None,
            step: str | int | None = None) -> tuple[ml_collections.ConfigDict, Run, str]:
  """(the run's config, a checkpoint of it opened, the local model path) for a workdir.

  `config`: the run's own (`run_record.saved_config`) when None. `step`: None
  or "latest", "best" (config.checkpoint.best_metric's best) or a kept step.

  Raises:
    UserError: not a jaxft workdir, no checkpoint in it yet, or no such step.
  """
  storage.check_shared(workdir)
  config = config if config is not None else run_record.saved_config(workdir)
  labels = read_labels(workdir)
  task = tasks.of(config)
  if labels is None and task.has_labels:
    raise UserError(f"{workdir} is not a jaxft workdir (no labels.json)")
  checkpointer = checkpoint.Checkpointer.of(workdir, config)
  try:
    chosen = _choose_step(checkpointer, step, workdir)
  finally:
    checkpointer.close()
  model_path = hub.resolve_model(config.model.path, allow_pickle=config.model.allow_pickle)
  run = open_run(config, workdir, model_path, labels, quiet=True, task=task, step=chosen)
  run.checkpointer.close()  # Callers only read the restored state.
  return config, run, model_path


def language_model(workdir: str | None, *, model_path: str | None = None,
                   config: ml_collections.ConfigDict | None = None) -> tuple[Any, Any]:
  """(model, tokenizer) to generate with: `model_path`'s if given, else `workdir`'s.

  `model_path`: an HF folder or hub id (an export, a base model), loaded as is.
  Otherwise the latest checkpoint of `workdir`, its LoRA adapters merged, read
  with `config` (the run's own when None).

  Raises:
    UserError: the workdir trained a classifier, or as `restore`.
  """
  if model_path is not None:
    return (hf.load(model_path, tasks.CausalLM.model_kind).model,
            hub.load_tokenizer(model_path))
  _, run, base_path = restore(workdir, config=config)
  if not run.task.generates_text:
    raise UserError(f"{workdir} trained a classifier, not a language model")
  return lora.merge(run.model()), hub.load_tokenizer(base_path)


def _choose_step(checkpointer: checkpoint.Checkpointer, step: str | int | None,
                 workdir: str) -> int:
  """The kept step that `step` (None, "latest", "best" or a number) names."""
  kept = checkpointer.all_steps()
  if not kept:
    raise UserError(f"no checkpoint in {checkpointer.directory}: train first")
  if step in (None, "latest"):
    latest, skipped = checkpointer.newest_intact()
    for line in skipped:
      log(f"skipping {line}")
    return latest
  if step == "best":
    best = checkpointer.best_step()
    if best is None:
      raise UserError(f"no best checkpoint in {workdir}: train with "
                      "config.checkpoint.best_metric (and evals: train.eval_every)")
    return best
  if not str(step).isdigit() or int(step) not in kept:
    raise UserError(f"--step={step}: {workdir} keeps checkpoints at steps "
                    f"{', '.join(map(str, kept))} (or use best or latest)")
  return int(step)
