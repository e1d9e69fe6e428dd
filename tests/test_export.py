"""`jaxft export` into a folder: replaces an earlier export exactly, refuses others, --step."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

from jaxft import defaults
from jaxft.formats import export_dir
from jaxft.formats import hub
from tests.helpers import jaxft_in_process, tiny_flags


@pytest.fixture(scope="module")
def lora_run(tiny_setup, tmp_path_factory):
  """A tiny LoRA classifier trained 4 steps, checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp("export") / "w"
  run = jaxft_in_process("train", *tiny_flags(
      tiny_setup, workdir, "--config.lora.rank=4", "--config.train.num_steps=4",
      "--config.checkpoint.every=2", "--config.checkpoint.keep=5"))
  assert run.returncode == 0, run.stderr
  return workdir


def _export(workdir, out, *extra):
  proc = jaxft_in_process("export", f"--workdir={workdir}", f"--out={out}", *extra)
  return proc


def _logits(folder, tiny_setup):
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_setup / "model")
  batch = tokenizer(["a gripping, funny film", "dull"], padding=True, return_tensors="pt")
  model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
  with torch.no_grad():
    return model(**batch).logits.numpy(), model


def test_an_hf_export_over_a_peft_export_equals_a_clean_one(lora_run, tiny_setup, tmp_path):
  out, clean = tmp_path / "out", tmp_path / "clean"
  assert _export(lora_run, out, "--format=peft").returncode == 0
  assert (out / "adapter_config.json").exists()
  (out / "NOTES.md").write_text("mine")  # A user's file: not the export's to remove.
  assert _export(lora_run, out).returncode == 0
  assert _export(lora_run, clean).returncode == 0
  assert sorted(os.listdir(out)) == sorted(os.listdir(clean) + ["NOTES.md"])
  ours, model = _logits(out, tiny_setup)
  theirs, _ = _logits(clean, tiny_setup)
  assert np.abs(ours - theirs).max() == 0
  assert not getattr(model, "_hf_peft_config_loaded", False)


def test_a_folder_that_is_not_an_export_needs_overwrite(lora_run, tmp_path):
  out = tmp_path / "stuff"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  refused = _export(lora_run, out)
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines()[-1] == (
      f"jaxft: error: {out} is not empty and holds no earlier jaxft export "
      f"({export_dir.MANIFEST}): pass --overwrite to replace its contents, or choose "
      "another --out")
  assert os.listdir(out) == ["keep.txt"]
  assert _export(lora_run, out, "--overwrite").returncode == 0
  assert "keep.txt" not in os.listdir(out) and (out / "model.safetensors").exists()
  home = _export(lora_run, lora_run.parent, "--overwrite")  # Would delete the workdir.
  assert home.returncode == 2 and "holds the workdir" in home.stderr


def test_exported_files_get_the_normal_mode(lora_run, tmp_path):
  old = os.umask(0o022)
  try:
    for fmt in ("hf", "peft"):
      assert _export(lora_run, tmp_path / fmt, f"--format={fmt}").returncode == 0
      modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / fmt).iterdir()}
      assert set(modes.values()) == {0o644}, modes
  finally:
    os.umask(old)


def test_peft_records_a_hub_id_for_the_base_model(lora_run, tmp_path):
  assert _export(lora_run, tmp_path / "p", "--format=peft",
                 "--base_model=org/base").returncode == 0
  saved = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
  assert saved["base_model_name_or_path"] == "org/base"
  assert hub.hub_id(defaults.minilm(), defaults.minilm()) == defaults.MINILM_HUB
  assert hub.hub_id("org/name", "/anywhere") == "org/name"
  folder = tmp_path / "ckpt"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"_name_or_path": "org/original"}))
  assert hub.hub_id(str(folder), str(folder)) == "org/original"
  (folder / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/model"}))
  assert hub.hub_id(str(folder), str(folder)) == str(folder)


def test_step_picks_a_kept_checkpoint(lora_run, tmp_path):
  assert _export(lora_run, tmp_path / "s2", "--step=2").returncode == 0
  assert _export(lora_run, tmp_path / "last", "--step=latest").returncode == 0
  steps = [json.loads((tmp_path / d / export_dir.MANIFEST).read_text())["step"]
           for d in ("s2", "last")]
  assert steps == [2, 4]
  a = (tmp_path / "s2" / "model.safetensors").read_bytes()
  assert a != (tmp_path / "last" / "model.safetensors").read_bytes()
  missing = _export(lora_run, tmp_path / "s3", "--step=3")
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1] == (
      f"jaxft: error: --step=3: {lora_run} keeps checkpoints at steps 2, 4 (or use best or "
      "latest)")
  best = _export(lora_run, tmp_path / "best", "--step=best")
  assert best.returncode == 2 and "no best checkpoint" in best.stderr
