"""README.md's `jaxft` commands: every one parses against the real CLI, the unmarked ones run.

A ```bash line that needs something first ends with `# needs: X[, Y]`, X from
NEEDS. Every command's flags are parsed by `cli._parse` (unknown flags and
config keys are UserErrors). The unmarked ones are run in README order, in
this process, at tiny sizes: `runs/...` paths moved into tmp_path, the
recipe's model and data swapped for the tiny fixtures, step counts shrunk.
The `# needs: make sft` ones run too, after the Makefile's own `make sft`
train line at tiny sizes (the tiny chat Llama in place of the SmolLM2 GGUF);
`make vit` needs Fashion-MNIST, which the tests do not fetch.

`eval`, `export`, `inspect`, `plan` and `config` with `--workdir` and no
`--config` load the config saved in that workdir while parsing. For the
parse check, such a workdir is replaced by a folder holding only the
config.json the README's recipe for it would have written (runs/sft:
configs/sft.py, runs/vit-fmnist: configs/vit.py:pretrain, else
configs/classify.py): the flags and override keys are checked against a real
saved config, nothing else is read.
"""

from __future__ import annotations

import io
import json
import pathlib
import re
import shlex
import sys

import pytest

from jaxft import cli
from jaxft import config as config_lib
from jaxft import defaults
from jaxft.errors import UserError
from tests.helpers import ROOT, jaxft_in_process

README = ROOT / "README.md"
NEEDS = {"hub", "make sft", "make vit", "your own images", "2 devices", "minutes"}
_MARKER = re.compile(r"#\s*needs:\s*(.+?)\s*$")
# The recipe each README workdir was trained with, for the parse check's stand-in config.json.
_WORKDIR_RECIPES = {"runs/sft": ("sft", None), "runs/vit-fmnist": ("vit", "pretrain")}


def readme_commands(text: str) -> list[tuple[str, list[str], set[str], str]]:
  """(command, flags, needs, line) for each `jaxft ` line of the ```bash fences, in order."""
  out, in_bash, pending = [], False, ""
  for raw in text.splitlines():
    if raw.startswith("```"):
      in_bash = raw.strip() == "```bash"
      pending = ""
      continue
    if not in_bash:
      continue
    line = pending + raw.strip()
    if line.endswith("\\"):
      pending = line[:-1] + " "
      continue
    pending = ""
    if not line.startswith("jaxft "):
      continue
    comment = line[line.index(" #") + 1:] if " #" in line else ""
    marker = _MARKER.search(comment)
    needs = {n.strip() for n in marker.group(1).split(",")} if marker else set()
    words = shlex.split(line, comments=True)
    out.append((words[1], words[2:], needs, line))
  return out


COMMANDS = readme_commands(README.read_text())


def test_readme_has_commands_and_markers_from_the_vocabulary():
  assert len(COMMANDS) >= 20
  placeholder = re.compile(r"^\.\.\.$|^\[|=(DIR|HF_DIR|HUB_ID|RECIPE|TEXT|N|\.\.\.)\b")
  for _, flags, needs, line in COMMANDS:
    assert needs <= NEEDS, f"unknown marker in README line: {line}"
    assert not any(placeholder.search(f) for f in flags), (
        f"a placeholder in a ```bash line (use a ```text block): {line}")
  assert sum(not needs for _, _, needs, _ in COMMANDS) >= 8
  assert {n for _, _, needs, _ in COMMANDS for n in needs} == NEEDS  # Each marker is used.


def _stand_in_workdirs(command: str, flags: list[str], tmp: pathlib.Path) -> list[str]:
  """flags, with a --workdir whose config.json parsing would read replaced by a stand-in."""
  if command not in cli._WORKDIR_CONFIG or any(f.startswith("--config=") for f in flags):
    return flags
  out = []
  for f in flags:
    if f.startswith("--workdir="):
      workdir = f.split("=", 1)[1]
      name, arg = _WORKDIR_RECIPES.get(workdir, ("classify", None))
      stand_in = tmp / workdir.replace("/", "_")
      stand_in.mkdir(exist_ok=True)
      (stand_in / "config.json").write_text(config_lib.to_json(defaults.recipe(name, arg)))
      f = f"--workdir={stand_in}"
    out.append(f)
  return out


def _check_parses(command: str, flags: list[str], tmp: pathlib.Path) -> None:
  if "--help" in flags:
    assert cli.run(["jaxft", command, *flags]) == 0
    return
  cli._parse(command, ["jaxft", *_stand_in_workdirs(command, flags, tmp)])


@pytest.mark.parametrize("command,flags,needs,line", COMMANDS,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(COMMANDS)])
def test_readme_command_parses(command, flags, needs, line, monkeypatch, tmp_path):
  del needs, line
  monkeypatch.chdir(ROOT)
  _check_parses(command, flags, tmp_path)


def test_a_wrong_key_fails_the_parse_check(monkeypatch, tmp_path):
  monkeypatch.chdir(ROOT)
  (command, flags, _, _), = readme_commands(
      "```bash\njaxft train --config=configs/classify.py --workdir=runs/x \\\n"
      "  --config.train.num_step=3   # a typo\n```\n")
  with pytest.raises(UserError, match="num_step"):
    _check_parses(command, flags, tmp_path)


# Step counts and eval intervals the README writes, shrunk for the test (others: tiny defaults).
_SHRINK = {"--config.train.num_steps": {"500": "4"}, "--config.train.eval_every": {"50": "2"}}


def _recipe_overrides(recipe: str, setup: pathlib.Path) -> dict[str, object]:
  """The overrides that make a README recipe tiny: `setup`'s model and data, small sizes."""
  data = {"--config.model.path": setup / "model", "--config.data.train": setup / "train.jsonl",
          "--config.data.eval": setup / "test.jsonl"}
  if recipe.startswith("configs/classify.py"):  # setup: tiny_setup.
    tiny = {**data, "--config.data.max_length": 16, "--config.optim.lr": 1e-3,
            "--config.train.batch_size": 8, "--config.train.eval_batch_size": 16}
  elif recipe.startswith("configs/sft.py"):  # setup: tiny_chat_lm.
    tiny = {**data, "--config.data.max_length": 64, "--config.train.batch_size": 4,
            "--config.train.eval_batch_size": 4, "--config.eval.num_samples": 1,
            "--config.eval.max_new_tokens": 4}
  else:  # configs/vit.py:scratch: its own small ViT and the bundled digits.
    tiny = {"--config.train.batch_size": 8, "--config.train.eval_batch_size": 100}
  return {**tiny, "--config.train.num_steps": 2, "--config.train.log_every": 1}


def _tiny_flags(command, flags, tmp, setup):
  """flags with runs/ paths in tmp and, for a recipe, the tiny model, data and sizes.

  generate and chat get `setup`'s model in place of a .gguf file and make
  4 new tokens at most (a later flag wins).
  """
  out, given = [], set()
  for f in flags:
    name, eq, value = f.partition("=")
    value = _SHRINK.get(name, {}).get(value, value)
    if value.startswith("runs/"):
      value = str(tmp / value)
    if name == "--model" and value.endswith(".gguf"):
      value = str(setup / "model")
    given.add(name)
    out.append(name + eq + value)
  if command in ("generate", "chat"):
    return out + ["--max_new_tokens=4"]
  recipe = next((f.split("=", 1)[1] for f in flags if f.startswith("--config=")), None)
  if command in ("config", "inspect") or recipe is None or "--help" in flags:
    return out
  tiny = _recipe_overrides(recipe, setup)
  return out + [f"{k}={v}" for k, v in tiny.items() if k not in given]


def _run(command, flags, line, tmp, setup):
  """Runs one README command at tiny sizes in this process; asserts exit code 0."""
  args = _tiny_flags(command, flags, tmp, setup)
  result = jaxft_in_process(command, *args)
  assert result.returncode == 0, f"{line}\n{args}\n{result.stderr[-3000:]}"
  if command == "train" and "--help" not in flags:  # `jaxft train` ends with a JSON line.
    assert "step" in json.loads(result.stdout.strip().splitlines()[-1]), line


def test_unmarked_readme_commands_run(tiny_setup, tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  ran = []
  for command, flags, needs, line in COMMANDS:
    if needs:
      continue
    _run(command, flags, line, tmp_path, tiny_setup)
    ran.append(command)
  assert ran.count("train") >= 3 and {"eval", "export", "inspect", "config"} <= set(ran)
  # The rerun with a larger num_steps trained on and recorded the change.
  metrics = [json.loads(l) for l in (tmp_path / "runs" / "demo" / "metrics.jsonl").read_text()
             .splitlines()]
  assert any(m.get("split") == "resume" and m.get("changes") for m in metrics)
  assert (tmp_path / "runs" / "demo-hf" / "config.json").exists()


def make_target_commands(makefile: str, target: str) -> list[str]:
  """The `jaxft ...` command lines of a Makefile target's recipe, `$(BIN)/` and env dropped."""
  recipe = makefile.split(f"\n{target}:", 1)[1].split("\n\n", 1)[0]
  return [m.group(1) for m in re.finditer(r"\$\(BIN\)/(jaxft [^\n]+)", recipe)]


def test_make_sft_commands_run_after_a_tiny_make_sft(tiny_chat_lm, tmp_path, monkeypatch):
  """`make sft`'s own train line at tiny sizes, then README's `# needs: make sft` commands."""
  monkeypatch.chdir(ROOT)
  [make_sft] = make_target_commands((ROOT / "Makefile").read_text(), "sft")
  (command, flags, _, line), = readme_commands(f"```bash\n{make_sft}\n```\n")
  _run(command, flags, line, tmp_path, tiny_chat_lm)
  ran = []
  for command, flags, needs, line in COMMANDS:
    if needs != {"make sft"}:
      continue
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi! How are you?\n"))  # chat: one turn.
    _run(command, flags, line, tmp_path, tiny_chat_lm)
    ran.append(command)
  assert sorted(ran) == ["chat", "export", "export", "generate", "generate"]
  assert (tmp_path / "runs" / "sft-hf" / "config.json").exists()
  assert (tmp_path / "runs" / "sft.gguf").stat().st_size > 0


def test_cli_synopsis_names_only_real_flags():
  """Every --flag of the ```text synopsis under "## CLI" is one its command takes."""
  section = README.read_text().split("## CLI\n", 1)[1]
  block = section.split("```text\n", 1)[1].split("```", 1)[0]
  lines, seen = [], set()
  for raw in block.splitlines():
    if raw.startswith("jaxft "):
      lines.append(raw)
    elif raw.startswith(" ") and lines:
      lines[-1] += raw
  for line in lines:
    command = line.split()[1]
    if command == "COMMAND":
      continue
    seen.add(command)
    for name in re.findall(r"--([a-z_.]+)", line):
      assert name in cli._COMMAND_FLAGS[command] or name.startswith("config."), (
          f"{command} has no --{name}: {line}")
  assert seen == set(cli.COMMANDS)
