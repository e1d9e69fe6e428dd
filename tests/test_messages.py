"""One line for each user mistake: exit code 2 and `jaxft: error: ...`, no traceback.

Each runs `cli.main` in this process and ends before anything compiles.
`jaxft config` and `COMMAND --help` (exit 0) are here too: they are how a
user finds the keys and flags that these messages name.
"""

import json
import shutil
import subprocess
import sys

import huggingface_hub
import pytest

from jaxft import config as config_lib
from tests.helpers import RECIPE, ROOT, jaxft_in_process, tiny_config, tiny_flags


def _fails_with(proc: subprocess.CompletedProcess, line: str) -> None:
  """Exit code 2, `line` first on stderr, and no traceback."""
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.splitlines()[0] == line, proc.stderr
  assert "Traceback" not in proc.stderr


def _train(root, tmp_path, *extra) -> subprocess.CompletedProcess:
  return jaxft_in_process("train", *tiny_flags(root, tmp_path / "w", *extra))


@pytest.mark.parametrize("flag, line", [
    ("--config.train.num_step=5",
     "unknown config key train.num_step (did you mean train.num_steps?)"),
    ("--config.train.bogus=5", "unknown config key train.bogus"),
    ("--config.optim.rules.x=5", "unknown config key optim.rules.x"),
])
def test_unknown_config_key_names_it_and_the_closest_key(tiny_setup, tmp_path, flag, line):
  _fails_with(_train(tiny_setup, tmp_path, flag), f"jaxft: error: {line}")


def test_empty_data_file_says_it_is_empty(tiny_setup, tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  _fails_with(_train(tiny_setup, tmp_path, f"--config.data.train={empty}"),
              f"jaxft: error: data file {empty} is empty")


def test_malformed_json_line_names_the_file_and_line(tiny_setup, tmp_path, capfd):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "good", "label": 1}\n\n{"text": "bad" "label": 0}\n')
  _fails_with(_train(tiny_setup, tmp_path, f"--config.data.train={bad}"),
              f"jaxft: error: {bad} line 3: Expecting ',' delimiter (column 16)")
  assert "Failed to load JSON" not in capfd.readouterr().err  # `datasets`' own log line.


@pytest.mark.parametrize("rules", [
    "[('.*embeddings.*' None)]",  # The flag parser fails on it (a space).
    "[('.*embeddings.*'None)]",  # The flag parser passes it on as one string.
])
def test_rules_that_are_not_a_python_literal_say_why(tiny_setup, tmp_path, rules):
  _fails_with(_train(tiny_setup, tmp_path, f"--config.optim.rules={rules}"),
              "jaxft: error: config.optim.rules is not a Python literal "
              "(invalid syntax. Perhaps you forgot a comma? at column 3)")


def test_unknown_model_type_lists_the_supported_ones(tiny_setup, tmp_path):
  model = tmp_path / "model"
  shutil.copytree(tiny_setup / "model", model)  # Weights and tokenizer: only the type is wrong.
  config = json.loads((model / "config.json").read_text())
  (model / "config.json").write_text(json.dumps({**config, "model_type": "mamba9"}))
  _fails_with(
      _train(tiny_setup, tmp_path, f"--config.model.path={model}"),
      f"jaxft: error: unknown model_type 'mamba9' in {model}/config.json; jaxft supports: "
      "bert, distilbert, roberta (classify); gpt2, llama, mistral, qwen2, qwen3 (causal_lm); "
      "resnet, vit (image_classify)")


def test_hub_id_offline_says_it_is_not_cached(tiny_setup, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  # huggingface_hub reads the variable once, at import: set what it read.
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  _fails_with(
      _train(tiny_setup, tmp_path, "--config.model.path=someorg/some-model"),
      "jaxft: error: someorg/some-model is not in the local Hugging Face cache and the hub "
      "cannot be reached (HF_HUB_OFFLINE is set): give the path of a local checkpoint "
      "folder, or go online to download it")


@pytest.mark.parametrize("args", [["frobnicate"], ["forecast", "--help"]])
def test_unknown_command_is_named_before_the_usage(args):
  proc = jaxft_in_process(*args)
  _fails_with(proc, f"jaxft: error: unknown command {args[0]}")
  assert proc.stderr.splitlines()[1] == "usage:"


def test_command_help_lists_that_commands_flags_without_importing_jax():
  code = ("import sys; from jaxft import cli; code = cli.run(['jaxft', 'train', '--help']); "
          "print('jax imported' if 'jax' in sys.modules else 'no jax'); sys.exit(code)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=ROOT, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  flags = lines[lines.index("jaxft train flags:") + 1:-1]
  assert [l.split()[0] for l in flags] == [
      "--config", "--workdir", "--profile", "--coordinator_address", "--num_processes",
      "--process_id", "--config.KEY=VALUE"]
  assert _flag_rows(flags)["--profile"] == (
      "train: write a JAX trace of this many steps to DIR/profile (TensorBoard / Perfetto).")
  assert lines[-1] == "no jax"
  generate = jaxft_in_process("generate", "--help")
  assert generate.returncode == 0
  lines = generate.stdout.splitlines()
  rows = _flag_rows(lines[lines.index("jaxft generate flags:") + 1:])
  assert rows["--prompt"] == "generate: prompt text (repeat for a batch)."
  assert rows["--[no]chat"] == "generate: wrap each prompt in the chat template."


def _flag_rows(lines: list[str]) -> dict[str, str]:
  """{flag: help} from the `  --flag  help` lines of `COMMAND --help`."""
  return {l.split()[0]: " ".join(l.split()[1:]) for l in lines}


def test_config_prints_every_key_with_its_value_and_doc():
  proc = jaxft_in_process("config", f"--config={RECIPE}", "--config.train.num_steps=7")
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr
  lines = proc.stdout.splitlines()
  assert "train.num_steps = 7  # Optimizer updates in the run." in lines
  assert ("lora.targets = '.*/(query|value|q_lin|v_lin|q_proj|v_proj)'  "
          "# Linear module paths (fullmatch).") in lines
  # A doc from the comment lines above the key; a recipe's own key has none.
  assert any(l.startswith("model.frozen_dtype = 'float32'  # Storage of frozen params") for l in lines)
  assert "data.text_key = 'text'" in lines
  # Every key of base() has its comment in jaxft/config.py.
  docs = config_lib.key_docs()
  assert not [k for k, _ in config_lib.flat_items(config_lib.base()) if not docs.get(k)]


def test_config_of_a_workdir_is_the_run_own(tiny_setup, tmp_path):
  (tmp_path / "config.json").write_text(config_lib.to_json(tiny_config(tiny_setup)))
  proc = jaxft_in_process("config", f"--workdir={tmp_path}", "--config.train.seed=3")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert (f"data.train = {str(tiny_setup / 'train.jsonl')!r}  "
          "# csv/json/jsonl/parquet file, or a hub dataset name.") in lines
  assert "train.seed = 3  # Seeds the head init, the data order and dropout." in lines
