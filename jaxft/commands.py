"""`jaxft eval` and `jaxft export`: commands that reopen a run's workdir."""

from __future__ import annotations

import jax
import ml_collections

from jaxft import config as config_lib
from jaxft import metrics
from jaxft import run as run_lib
from jaxft.runtime import run_record
from jaxft.runtime import storage
from jaxft.errors import UserError
from jaxft.formats import export_dir
from jaxft.formats import hub
from jaxft.formats import peft


def eval_command(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Evaluates the latest checkpoint in `workdir`, or the pretrained model if none.

  Raises:
    UserError: `workdir` does not exist, or it holds no checkpoint and the
      pretrained model lacks weights the task needs (a classifier's head).
  """
  run_record.require_workdir(workdir)
  storage.check_shared(workdir)
  model_path, task, data = run_lib.prepare(config, workdir, need_train=False)
  if data.eval is None:
    raise UserError("config.data.eval is empty: nothing to evaluate")
  run = run_lib.open_run(config, workdir, model_path, data.labels, task=task)
  try:
    if run.untrained:
      what = ("the classification head" if task.has_labels
              else ", ".join(run.untrained[:3]) + ("..." if len(run.untrained) > 3 else ""))
      raise UserError(f"nothing trained in {workdir}: {what} would be random")
    if run.checkpointer.latest_step() is None:
      metrics.log(f"no checkpoint in {workdir}: evaluating the pretrained model "
                  f"{config.model.path}")
    task.before_run(run, data, model_path)
    result = task.evaluate(run, data)
  finally:
    run.checkpointer.close()
  return {"step": run.step, **result}


def export_command(workdir: str, out_dir: str, fmt: str = "hf", *,
                   config: ml_collections.ConfigDict | None = None,
                   step: str | int | None = None, overwrite: bool = False,
                   base_model: str | None = None) -> None:
  """Writes a checkpoint of `workdir` (the latest, "best" or a step) as a Hugging Face folder.

  `fmt` "hf": a full checkpoint (LoRA adapters merged into the kernels) that
  transformers loads as is (a language model with its tokenizer and chat
  template); "peft": only the LoRA adapters and the trained modules, as a
  PEFT adapter over the run's base model, recorded as `base_model` (default:
  its hub id where known, `hub.hub_id`). `config`: the run's own when None.
  `out_dir` (may be a gs:// URL) loses the files of an earlier export and
  nothing else; a non-empty folder that is not one needs `overwrite`
  (`formats.export_dir`).
  """
  if fmt not in config_lib.EXPORT_FORMATS:
    raise UserError(f"--format must be one of {config_lib.EXPORT_FORMATS}, got {fmt!r}")
  export_dir.check_target(out_dir, workdir, overwrite)  # Before minutes of loading.
  config, run, model_path = run_lib.restore(workdir, config=config, step=step)
  if fmt == "peft" and not config_lib.lora_enabled(config):
    raise UserError(f"--format=peft needs a LoRA run; {workdir} trained without "
                    "config.lora.rank (use --format=hf)")
  info = {"format": fmt, "step": run.step, "workdir": storage.resolve(workdir)}
  with export_dir.staged(out_dir, workdir, overwrite=overwrite, info=info,
                         primary=jax.process_index() == 0) as local:
    if fmt == "peft":
      task = run.task
      peft.export_peft(run.model(), run.hf_config, task.model_kind, local, lora_config=config.lora,
                       trainable=run.split.assignment.trainable(),
                       heads=task.fresh_heads(run.hf_config), task_type=task.peft_task_type,
                       base_model=base_model or hub.hub_id(config.model.path, model_path))
      if jax.process_index() == 0:
        hub.load_tokenizer(model_path).save_pretrained(local)
    else:
      run.task.export(run, model_path, local)
  metrics.log(f"exported step {run.step} to {out_dir} ({fmt})")
