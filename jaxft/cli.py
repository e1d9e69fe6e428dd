"""`jaxft train | eval | export | ...`: absl flags + ml_collections config files.

  jaxft train  --config=configs/classify.py --workdir=DIR [--profile=N] [--config.KEY=VALUE ...]
  jaxft eval   [--config=configs/classify.py] --workdir=DIR [--config.KEY=VALUE ...]
  jaxft export --workdir=DIR --out=HF_DIR [--format=hf|peft] [--step=best|latest|N]
               [--overwrite] [--base_model=HUB_ID]
  jaxft export --workdir=DIR --out=FILE.gguf --format=gguf [--quant=f16|q8_0|q4_0]
               [--step=best|latest|N] [--overwrite]
  jaxft predict --workdir=DIR|--model=HF_DIR --input=FILE_OR_FOLDER [--out=FILE] [--batch_size=N]
                (a JSON line per input: label, score, probs; a language model: its completion)
  (eval, export, predict, inspect, plan: without --config, the config the run in DIR
   last trained with; --config.KEY=VALUE overrides apply on top)
  jaxft inspect --config=configs/classify.py|--workdir=DIR [--params]
                [--topology=v5p-128 [--num_slices=N]] [--config.KEY=VALUE ...]
  jaxft plan --config=configs/sft.py --topology=v5p-128 [--num_slices=N] [--max_compiles=6]
  jaxft generate --model=HF_DIR|HUB_ID|FILE.gguf|--workdir=DIR --prompt=TEXT [--prompt ...] [--chat]
  jaxft chat --model=HF_DIR|HUB_ID|FILE.gguf|--workdir=DIR   (one user turn per stdin line)
  jaxft config --config=configs/classify.py|--workdir=DIR [--config.KEY=VALUE ...]
               (prints every config key, its value and what it does)
  jaxft report --workdir=DIR   (curves as PNGs in DIR/plots/, and a summary of the run)
  jaxft COMMAND --help   (that command's flags)
  (--workdir, --out and model / data paths may be gs://BUCKET/PATH URLs.
   many hosts: add --coordinator_address=HOST:PORT --num_processes=N --process_id=I
   where JAX does not find them itself, as it does on TPU VMs and under SLURM)

User mistakes (unknown config key, wrong type, missing file, empty data) exit
with code 2 and one line naming the problem, before anything compiles.

Many hosts: when a process dies, the others exit with code 75 within
$JAXFT_PEER_TIMEOUT seconds (default 60) plus a third of that (10 s at most),
naming the lost process; rerunning every process resumes (jaxft/runtime/distributed.py).

`inspect` builds the model from shapes alone (config.json is all it reads;
--workdir alone inspects the config that run trained with),
compiles one train step and prints the rules table, then (last line) a JSON
object: params_total, params_trainable, param_bytes, optimizer_state_bytes,
step_flops, peak_memory_bytes, temp_memory_bytes (activations), devices. With
--topology (a Cloud TPU accelerator type; needs the libtpu wheel) it compiles
for that slice's chips on this machine: figures per chip, plus topology,
hbm_bytes_per_device, fits, collectives and a roofline estimate. `plan`
searches mesh shape, remat and grad_accum for a slice; its last line is JSON
whose `overrides` are the chosen config keys.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from typing import Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

from jaxft import config as config_lib
from jaxft import errors
from jaxft.errors import UserError
from jaxft.runtime import preemption

COMMANDS = ("train", "eval", "export", "predict", "inspect", "plan", "generate", "chat",
            "config", "report")
USAGE = __doc__.split("\n\n")[1]

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/classify.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics.jsonl, config.json.")
_OUT = flags.DEFINE_string("out", None, "export: the Hugging Face folder (--format=gguf: the "
                           ".gguf file) to write; predict: the JSON-lines file (default: "
                           "stdout).")
_FORMAT = flags.DEFINE_enum("format", "hf", list(config_lib.EXPORT_FORMATS),
                            "export: hf (full checkpoint, LoRA merged), peft (LoRA adapter) or "
                            "gguf (one llama.cpp / Ollama file, LoRA merged).")
_QUANT = flags.DEFINE_enum("quant", None, list(config_lib.GGUF_QUANTS),
                           "export --format=gguf: weight type: f16 (default), q8_0 or q4_0.")
_STEP = flags.DEFINE_string("step", None, "export: the checkpoint: latest (default), best "
                            "(config.checkpoint.best_metric) or a kept step number.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "export: empty a non-empty --out that holds "
                               "no earlier export first (an earlier export is always replaced; "
                               "never a folder holding or inside the workdir, a root or home; "
                               "--format=gguf: replace a file that is no earlier export).")
_BASE_MODEL = flags.DEFINE_string("base_model", None, "export --format=peft: the base model id "
                                  "adapter_config.json records (default: its hub id if known).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process: HOST:PORT of process 0 (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this one's index.")
_MODEL = flags.DEFINE_string("model", None, "generate/chat: HF folder, hub id or .gguf file "
                             "(or --workdir: a run's latest checkpoint); predict: an exported "
                             "folder (with --workdir: that run's config and labels).")
_INPUT = flags.DEFINE_string("input", None, "predict: a csv / jsonl / json / parquet file, an "
                             "image folder or file (DICOM too), .npz or IDX; language models: "
                             "prompts (jsonl with prompt or messages, .txt a line each).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "predict: inputs per forward batch "
                                   "(default: config.train.eval_batch_size).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "generate: prompt text (repeat for a batch).")
_CHAT = flags.DEFINE_bool("chat", False, "generate: wrap each prompt in the chat template.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "generate/chat: tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "generate/chat: 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "generate/chat: sample from the k likeliest (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "generate/chat: nucleus sampling mass.")
_STOP = flags.DEFINE_multi_string("stop", [], "generate/chat: cut the text at this string.")
_SEED = flags.DEFINE_integer("seed", 0, "generate/chat: sampling seed.")
_PARAMS = flags.DEFINE_bool("params", False, "inspect: also list every parameter and its rule.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "inspect/plan: compile for this TPU slice (v5p-128, v5litepod-8, "
    "v6e-64, v4-32, or GEN:AxBxC) with the libtpu wheel, on this machine.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "inspect/plan: multislice: this many "
                                   "copies of --topology joined by the data-center network.")
_MAX_COMPILES = flags.DEFINE_integer("max_compiles", 6, "plan: compile at most this many "
                                     "candidates.")
_PROFILE = flags.DEFINE_integer("profile", 0, "train: write a JAX trace of this many steps "
                                "to DIR/profile (TensorBoard / Perfetto).")


def _flag_error(e: Exception, argv: Sequence[str]) -> str:
  """A one-line explanation of why flag parsing failed."""
  # A wrong key fails as an AttributeError or KeyError, or a TypeError below a tuple.
  unknown = _unknown_key(argv) if isinstance(e, (AttributeError, KeyError, TypeError)) else None
  if unknown:
    return unknown
  if isinstance(e, (AttributeError, KeyError)):  # The config did not load again: its bare name.
    innermost = e  # KeyError('num_step'), whose str is the quoted name.
    while innermost.__cause__ or innermost.__context__:
      innermost = innermost.__cause__ or innermost.__context__
    name = str(innermost).splitlines()[0].strip("'\"")
    return f"unknown config key {name}"
  syntax = _cause(e, SyntaxError)
  flag = re.match(r"flag --(config\.[\w.]+)=", str(e))
  if syntax is not None and syntax.text is not None and flag:
    # ml_collections' tuple parser would advise quoting, which only hides the typo.
    problem = config_lib.literal_error(syntax.text) or syntax.msg
    return f"{flag.group(1)} is not a Python literal ({problem})"
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  if isinstance(e, OSError):  # A config file that failed to load: the cause is last.
    return f"cannot load --config: {lines[-1]}"
  return lines[0]


def _cause(e: BaseException | None, kind: type[BaseException]) -> BaseException | None:
  """The first exception of type `kind` in `e`'s chain of causes, or None."""
  while e is not None and not isinstance(e, kind):
    e = e.__cause__ or e.__context__
  return e


def _unknown_key(argv: Sequence[str]) -> str | None:
  """`unknown config key KEY (did you mean KEY2?)` for the first --config.KEY the config lacks.

  ml_collections' own message is the KeyError's repr inside an AttributeError,
  with a suggestion of its own; the config itself is loaded again to name the
  whole key and to find the closest one.
  """
  keys = [a.lstrip("-").split("=", 1)[0][len("config."):] for a in argv[1:]
          if a.lstrip("-").startswith("config.")]
  config = _load_config_file(argv)
  for key in keys if config is not None else ():
    problem = config_lib.unknown_key(config, key)
    if problem:
      return problem
  return None


def _raw_flag(argv: Sequence[str], flag: str) -> str | None:
  """The value of `--flag=V` (or `--flag V`) in argv as typed, before absl parses it; the last
  one given wins, as in absl. None if absent."""
  found = None
  for i, a in enumerate(argv[1:], 1):
    name, eq, value = a.lstrip("-").partition("=")
    if name == flag:
      found = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
  return found


def _load_config_file(argv: Sequence[str]) -> ml_collections.ConfigDict | None:
  """The config that `--config=FILE[:ARG]` in argv names, without overrides; None if it fails."""
  value = _raw_flag(argv, "config")
  if value is None:
    return None
  try:
    return FLAGS["config"].parser.parse(value)
  except Exception:  # pylint: disable=broad-except  # The caller falls back to less detail.
    return None


# Commands that, given --workdir and no --config, use the config that run trained with.
_WORKDIR_CONFIG = ("eval", "export", "predict", "inspect", "plan", "config")


def _with_workdir_config(command: str, argv: Sequence[str]) -> list[str]:
  """argv, plus `--config=run_record.py:DIR` where the run's own config stands in.

  Loaded as a config file, the saved config takes `--config.KEY=VALUE`
  overrides exactly as a recipe does.
  """
  argv = list(argv)
  workdir = _raw_flag(argv, "workdir")
  if command not in _WORKDIR_CONFIG or _raw_flag(argv, "config") is not None or not workdir:
    return argv
  from jaxft.runtime import run_record  # pylint: disable=g-import-not-at-top
  # First: parsing --config defines the --config.KEY override flags that follow.
  return [argv[0], f"--config={run_record.__file__}:{workdir}", *argv[1:]]


def _parse(command: str, argv: Sequence[str]) -> None:
  """Parses flags (argv without the command); every failure becomes a UserError."""
  argv = _with_workdir_config(command, argv)
  try:
    # A second run in one process must not inherit the first's flags, nor meet
    # the --config.KEY override flags that parsing the first recipe defined.
    FLAGS.unparse_flags()
    for name in [n for n in FLAGS if n.startswith("config.")]:
      delattr(FLAGS, name)
    # ml_collections finds the --config.KEY overrides in sys.argv, not in what FLAGS parses.
    saved, sys.argv = sys.argv, list(argv)
    try:
      FLAGS(list(argv))
    finally:
      sys.argv = saved
    config = _CONFIG.value
    if config is not None:
      config.to_dict()  # A config file that failed to load raises only when used.
  except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as e:
    raise UserError(_flag_error(e, argv)) from e
  if command in ("generate", "chat"):
    if bool(_MODEL.value) == bool(_WORKDIR.value):
      raise UserError(f"{command} needs --model=HF_DIR (a hub id or a .gguf file) "
                      "or --workdir=DIR (a run's latest checkpoint), not both")
    if command == "generate" and not _PROMPT.value:
      raise UserError("generate needs --prompt=TEXT")
    return
  if command == "predict":  # --model alone needs no config: the folder says what it is.
    if not _WORKDIR.value and not _MODEL.value:
      raise UserError("predict needs --workdir=DIR (a run's latest checkpoint) or "
                      "--model=HF_DIR (an exported model)")
    if not _INPUT.value:
      raise UserError("predict needs --input=FILE_OR_FOLDER")
    return
  if command not in ("inspect", "plan", "config") and not _WORKDIR.value:
    raise UserError("--workdir is required")
  if command == "report":  # The run's own files are all it reads.
    return
  if config is None:
    raise UserError("--config is required, e.g. --config=configs/classify.py" + (
        " (or --workdir=DIR alone: the config that run trained with)"
        if command in _WORKDIR_CONFIG else ""))
  if command == "plan" and not _TOPOLOGY.value:
    raise UserError("plan needs --topology, e.g. --topology=v5p-128")


def run(argv: Sequence[str]) -> int:
  """Runs one command; returns the process exit code."""
  help_asked = bool({"-h", "--help"} & set(argv))
  unknown = len(argv) > 1 and not argv[1].startswith("-") and argv[1] not in COMMANDS
  if unknown:
    print(f"jaxft: error: unknown command {argv[1]}", file=sys.stderr)
  if len(argv) < 2 or argv[1] not in COMMANDS or help_asked:
    help_asked = help_asked and not unknown
    print(_help(argv[1] if help_asked and len(argv) > 1 else ""),
          file=sys.stdout if help_asked else sys.stderr)
    return 0 if help_asked else 2
  command = argv[1]
  _parse(command, [argv[0], *argv[2:]])
  if command == "config":  # Before JAX starts: printing a config needs none of it.
    _print_config(_CONFIG.value)
    return 0
  if command == "report":  # Nor does a report: files in, files and text out.
    from jaxft.runtime import report  # pylint: disable=g-import-not-at-top
    print(report.report(_WORKDIR.value))
    return 0
  # Deferred: JAX start-up is slow and --help should not pay it.
  from jaxft.runtime import distributed  # pylint: disable=g-import-not-at-top
  # train: a survivor of a lost process names the checkpoint a rerun resumes from.
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         workdir=_WORKDIR.value if command == "train" else None)
  from jaxft import commands, train  # pylint: disable=g-import-not-at-top
  # A signal that arrived while JAX was importing (the handler holds it there).
  preemption.check("during start-up: nothing was written; rerun the same command to go on")
  if command == "train":
    print(json.dumps(train.train(_CONFIG.value, _WORKDIR.value, profile_steps=_PROFILE.value)))
  elif command == "eval":
    print(json.dumps(commands.eval_command(_CONFIG.value, _WORKDIR.value)))
  elif command == "inspect":
    from jaxft import inspect  # pylint: disable=g-import-not-at-top
    print(json.dumps(inspect.inspect(_CONFIG.value, show_params=_PARAMS.value,
                                     topology=_topology())))
  elif command == "plan":
    from jaxft.aot import plan  # pylint: disable=g-import-not-at-top
    print(json.dumps(plan.plan(_CONFIG.value, _topology(), max_compiles=_MAX_COMPILES.value)))
  elif command in ("generate", "chat"):
    _generate(command)
  elif command == "predict":
    _predict()
  else:
    if not _OUT.value:
      raise UserError("export needs --out=HF_DIR (--format=gguf: --out=FILE.gguf)")
    commands.export_command(_WORKDIR.value, _OUT.value, _FORMAT.value, config=_CONFIG.value,
                            step=_STEP.value, overwrite=_OVERWRITE.value,
                            base_model=_BASE_MODEL.value, quant=_QUANT.value)
  return 0


# The flags each command reads (besides --config.KEY=VALUE overrides), for `COMMAND --help`.
_MULTI_PROCESS = ("coordinator_address", "num_processes", "process_id")
_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "stop", "seed")
_COMMAND_FLAGS = {
    "train": ("config", "workdir", "profile", *_MULTI_PROCESS),
    "eval": ("config", "workdir", *_MULTI_PROCESS),
    "export": ("config", "workdir", "out", "format", "quant", "step", "overwrite", "base_model",
               *_MULTI_PROCESS),
    "inspect": ("config", "workdir", "params", "topology", "num_slices"),
    "plan": ("config", "workdir", "topology", "num_slices", "max_compiles"),
    "generate": ("model", "workdir", "prompt", "chat", *_SAMPLING),
    "chat": ("model", "workdir", *_SAMPLING),
    "config": ("config", "workdir"),
    "report": ("workdir",),
    "predict": ("config", "workdir", "model", "input", "out", "batch_size", "chat", *_SAMPLING,
                *_MULTI_PROCESS),
}


def _help(command: str = "") -> str:
  """The usage text; for a command, followed by its flags and their help."""
  text = f"usage:\n{USAGE}\n\nConfig keys: `jaxft config --config=FILE` lists them all."
  if command not in _COMMAND_FLAGS:
    return text
  # absl adds ";\n    repeat this option ..." to a multi flag's help: one line each here.
  rows = [(f"--[no]{n}" if FLAGS[n].boolean else f"--{n}", FLAGS[n].help.split(";\n")[0])
          for n in _COMMAND_FLAGS[command]]
  if "config" in _COMMAND_FLAGS[command]:
    rows.append(("--config.KEY=VALUE", "Override one config key (repeatable)."))
  width = max(len(name) for name, _ in rows)
  return "\n".join([text, "", f"jaxft {command} flags:",
                    *(f"  {name:<{width}}  {doc}" for name, doc in rows)])


def _print_config(config: ml_collections.ConfigDict) -> None:
  """`jaxft config`: each key = its value, then its doc from jaxft/config.py's comments."""
  docs = config_lib.key_docs()
  for key, value in config_lib.flat_items(config):
    doc = docs.get(key, "")
    print(f"{key} = {value!r}" + (f"  # {doc}" if doc else ""))


def _topology():
  """The --topology slice, or None to compile for this machine's devices."""
  from jaxft.aot import topology  # pylint: disable=g-import-not-at-top
  if not _TOPOLOGY.value:
    if _NUM_SLICES.value != 1:
      raise UserError("--num_slices needs --topology")
    return None
  return topology.parse(_TOPOLOGY.value, _NUM_SLICES.value)


def _generate(command: str) -> None:
  """`generate`: one completion per prompt on stdout; `chat`: a turn per stdin line."""
  from jaxft import generate  # pylint: disable=g-import-not-at-top
  from jaxft.runtime import profiling  # pylint: disable=g-import-not-at-top
  profiling.use_default_compilation_cache()
  from jaxft import run as run_lib  # pylint: disable=g-import-not-at-top
  model, tokenizer = run_lib.language_model(_WORKDIR.value, model_path=_MODEL.value or None)
  kw = dict(max_new_tokens=_MAX_NEW.value, stop=_STOP.value, seed=_SEED.value,
            sampling=generate.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value))
  if command == "generate":
    prompts = _PROMPT.value
    if _CHAT.value:
      prompts = [generate.chat_prompt(tokenizer, [{"role": "user", "content": p}])
                 for p in prompts]
    for text in generate.complete(model, tokenizer, prompts, **kw):
      print(text, flush=True)
    return
  messages = []
  for line in sys.stdin:
    messages.append({"role": "user", "content": line.rstrip("\n")})
    [reply] = generate.complete(model, tokenizer, [generate.chat_prompt(tokenizer, messages)],
                                **kw)
    messages.append({"role": "assistant", "content": reply})
    print(reply, flush=True)


def _predict() -> None:
  """`predict`: JSON lines on stdout; with --out, the file and a summary line here."""
  from jaxft import commands, generate  # pylint: disable=g-import-not-at-top
  from jaxft.runtime import profiling  # pylint: disable=g-import-not-at-top
  profiling.use_default_compilation_cache()
  summary = commands.predict_command(
      _CONFIG.value, _WORKDIR.value, _INPUT.value, out=_OUT.value, batch_size=_BATCH_SIZE.value,
      model=_MODEL.value, max_new_tokens=_MAX_NEW.value, stop=tuple(_STOP.value),
      seed=_SEED.value, chat=_CHAT.value,
      sampling=generate.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value))
  if _OUT.value:
    print(json.dumps(summary))


def main() -> None:
  """Console-script entry point."""
  # First: a Ctrl-C during start-up (imports, loading, compiling) must end the run too.
  previous = preemption.install()
  preemption.reset()
  try:
    code = run(sys.argv)
    preemption.check()  # A signal whose exception a gc callback swallowed.
    sys.exit(code)
  except UserError as e:
    print(f"jaxft: error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt as e:  # preemption.Interrupted, or a signal before install.
    signum = getattr(e, "signum", signal.SIGINT)
    print(f"jaxft: {e or 'stopped by SIGINT'}", file=sys.stderr)
    sys.exit(128 + signum)  # The shell's convention for "killed by signal N".
  except BrokenPipeError:  # `jaxft config ... | head`: the reader left; nothing to say.
    sys.stderr.close()
    sys.exit(1)
  except Exception as e:  # pylint: disable=broad-except
    signum = preemption.pending()
    if signum is None or not errors.caused_by(e, KeyboardInterrupt):
      raise
    # The signal's KeyboardInterrupt came out as another error: C code it passed
    # through wrapped it (during imports the handler holds the signal instead).
    print(f"jaxft: stopped by {signal.Signals(signum).name}", file=sys.stderr)
    sys.exit(128 + signum)
  finally:
    preemption.restore(previous)  # For callers in-process (tests); a no-op at exit.


if __name__ == "__main__":
  main()
