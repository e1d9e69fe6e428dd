"""`jaxft eval`, `jaxft export` and `jaxft predict`: commands that reopen a run's workdir."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from jaxft import config as config_lib
from jaxft import metrics
from jaxft import run as run_lib
from jaxft import tasks
from jaxft.runtime import run_record
from jaxft.runtime import storage
from jaxft.errors import UserError
from jaxft.formats import export_dir
from jaxft.formats import gguf_export
from jaxft.formats import hub
from jaxft.formats import peft
from jaxft.tuning import lora


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
                   base_model: str | None = None, quant: str | None = None) -> None:
  """Writes a checkpoint of `workdir` (the latest, "best" or a step) as a Hugging Face folder
  or a llama.cpp GGUF file.

  `fmt` "hf": a full checkpoint (LoRA adapters merged into the kernels) that
  transformers loads as is (a language model with its tokenizer and chat
  template); "peft": only the LoRA adapters and the trained modules, as a
  PEFT adapter over the run's base model, recorded as `base_model` (default:
  its hub id where known, `hub.hub_id`); "gguf": a language model (LoRA
  merged) with its tokenizer and chat template as one file `out_dir` for
  llama.cpp and Ollama, its weights as `quant` says (`formats.gguf_export`;
  default f16). `config`: the run's own when None. A folder `out_dir` (may be
  a gs:// URL) loses the files of an earlier export and nothing else; a
  non-empty folder that is not one needs `overwrite` (`formats.export_dir`).
  """
  if fmt not in config_lib.EXPORT_FORMATS:
    raise UserError(f"--format must be one of {config_lib.EXPORT_FORMATS}, got {fmt!r}")
  if fmt == "gguf":
    _export_gguf(workdir, out_dir, config=config, step=step, overwrite=overwrite,
                 quant=quant or config_lib.GGUF_QUANTS[0])
    return
  if quant is not None:
    raise UserError(f"--quant is for --format=gguf; --format={fmt} writes float32 weights")
  if out_dir.endswith(".gguf"):
    raise UserError(f"--out={out_dir} names a GGUF file: add --format=gguf "
                    f"(--format={fmt} writes a folder)")
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


def _export_gguf(workdir: str, out: str, *, config: ml_collections.ConfigDict | None,
                 step: str | int | None, overwrite: bool, quant: str) -> None:
  """`export_command` for fmt "gguf": a language model's checkpoint as one GGUF file."""
  config = config if config is not None else run_record.saved_config(workdir)
  task = tasks.of(config)
  if task.model_kind != tasks.CausalLM.model_kind:
    lms = [name for name, kind in tasks.REGISTRY.items()
           if kind.model_kind == tasks.CausalLM.model_kind]
    raise UserError(f"--format=gguf exports language models (runs of task {', '.join(lms)}); "
                    f"{workdir} trained a {task.name} model: use --format=hf or peft")
  # Before minutes of loading.
  gguf_export.check_target(out, overwrite, base_model=config.model.path)
  config, run, model_path = run_lib.restore(workdir, config=config, step=step)
  info = {"format": "gguf", "quant": quant, "step": run.step,
          "workdir": storage.resolve(workdir)}
  gguf_export.export(lora.merge(run.model()), run.hf_config, out, tokenizer_path=model_path,
                     quant=quant, name=os.path.basename(storage.resolve(workdir)), info=info,
                     primary=jax.process_index() == 0)
  metrics.log(f"exported step {run.step} to {out} (gguf, {quant})")


def predict_command(config: ml_collections.ConfigDict | None, workdir: str | None,
                    input_spec: str, *, out: str | None = None, batch_size: int | None = None,
                    model: str | None = None, **generation: Any) -> dict[str, Any]:
  """`jaxft predict`: JSON lines of predictions for `input_spec` (tasks/predict.py).

  The latest checkpoint of `workdir` with `config` (the run's own when None),
  or the exported HF folder `model`; to stdout, or to the file `out` written
  whole. `generation` (language models): `predict.Generation`'s fields.
  Returns the summary (rows, seconds, counts of each label).
  """
  from jaxft.tasks import predict  # pylint: disable=g-import-not-at-top
  return predict.predict(config, workdir, input_spec, out=out, batch_size=batch_size,
                         model=model, generation=predict.Generation(**generation))
