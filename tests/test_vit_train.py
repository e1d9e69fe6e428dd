"""ViT fine-tuning end to end: real digits, metrics, confusion PNG, export, probe, bad files."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from flax import nnx
from safetensors.numpy import load_file

from jaxft import train
from jaxft.errors import UserError
from jaxft import run as run_lib
from jaxft import commands
from jaxft import defaults
from jaxft.tuning import param_paths
from tests.helpers import ROOT


def _config(model_path, arm="full", **train):
  c = defaults.recipe("vit", arm)
  c.model.path = str(model_path)
  c.data.image_size = 16
  c.train.update(batch_size=32, num_steps=6, log_every=3, eval_batch_size=128)
  c.train.update(train)
  return c


def test_vit_training_reports_metrics_writes_the_confusion_png_and_exports(tiny_image_vit, tmp_path):
  config = _config(tiny_image_vit)
  result = train.train(config, str(tmp_path / "run"))
  assert {"loss", "accuracy", "f1", "recall"} <= set(result)
  assert list(result["recall"]) == [str(i) for i in range(10)]
  png = Image.open(tmp_path / "run" / "confusion" / "step_6.png")
  assert png.format == "PNG" and png.size[0] > 400
  commands.export_command(str(tmp_path / "run"), str(tmp_path / "hf"))
  theirs = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
  assert theirs.config.id2label[3] == "3"
  _, run, _ = run_lib.restore(str(tmp_path / "run"))
  x = np.random.default_rng(0).normal(size=(4, 16, 16, 1)).astype(np.float32)
  ours = np.asarray(run.model()(x))
  with torch.no_grad():
    ref = theirs(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
  assert np.abs(ours - ref).max() <= 1e-4


def test_linear_probe_changes_only_the_classifier(tiny_image_vit, tmp_path):
  config = _config(tiny_image_vit, "probe")
  train.train(config, str(tmp_path / "run"))
  commands.export_command(str(tmp_path / "run"), str(tmp_path / "hf"))
  before = load_file(str(tiny_image_vit / "model.safetensors"))
  after = load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert before.keys() == after.keys()
  changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
  assert changed == ["classifier.bias", "classifier.weight"]


def test_from_scratch_needs_only_a_config_and_trains_at_a_new_resolution(tiny_image_vit, tmp_path):
  folder = tmp_path / "config_only"
  folder.mkdir()
  shutil.copy(tiny_image_vit / "config.json", folder / "config.json")
  # Enough steps (~10 s) at a higher rate, without crops, to learn from nothing.
  config = _config(folder, "scratch", num_steps=120, log_every=40)
  config.optim.lr = 3e-3
  config.data.random_resized_crop = False
  config.data.image_size = 24  # Not the config's 16: the model is built for 24.
  result = train.train(config, str(tmp_path / "run"))
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["model"]["from_scratch"] is True
  # A (24 / 4)^2 patch grid plus the CLS token: built at the new size, nothing interpolated.
  _, run, _ = run_lib.restore(str(tmp_path / "run"))
  params = dict(param_paths.named_variables(nnx.state(run.model(), nnx.Param)))
  assert params["embeddings/position_embeddings"].get_value().shape == (1, (24 // 4) ** 2 + 1, 32)
  # It learnt: chance on the 10 digits is 0.1 and a loss of ln 10 = 2.30
  # (measured: 0.38 and 1.65).
  assert result["accuracy"] >= 0.25 and result["loss"] < 2.0


def test_fine_tuning_at_another_resolution_interpolates_the_positions(tiny_image_vit, tmp_path):
  config = _config(tiny_image_vit, num_steps=2)
  config.data.image_size = 24
  result = train.train(config, str(tmp_path / "run"))
  # The model keeps the checkpoint's 4 x 4 grid (+ CLS) and resizes it for
  # 6 x 6 patches as transformers does with interpolate_pos_encoding=True: the
  # exported model, run that way on the run's eval images, scores its eval.
  commands.export_command(str(tmp_path / "run"), str(tmp_path / "hf"))
  theirs = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
  assert theirs.config.image_size == 16
  assert tuple(theirs.vit.embeddings.position_embeddings.shape) == (1, 4 * 4 + 1, 32)
  _, _, data = run_lib.prepare(config, str(tmp_path / "run"), need_train=False)
  assert data.eval["pixels"].shape[1:] == (24, 24, 1)
  # No preprocessor_config.json in the checkpoint: mean = std = 0.5.
  x = (data.eval["pixels"].astype(np.float32) / 255.0 - 0.5) / 0.5
  labels = torch.from_numpy(data.eval["label"].astype(np.int64))
  with torch.no_grad():
    out = theirs(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)), labels=labels,
                 interpolate_pos_encoding=True)
  assert float(out.loss) == pytest.approx(result["loss"], abs=1e-4)
  assert float((out.logits.argmax(-1) == labels).float().mean()) == pytest.approx(
      result["accuracy"])


def _folder(root, corrupt=False):
  digits = np.load(ROOT / "data" / "digits" / "train.npz")
  for i in range(24):
    label = int(digits["labels"][i])
    d = root / f"class_{label}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(digits["images"][i]).save(d / f"{i}.png")
  if corrupt:
    (root / "class_0" / "broken.png").write_bytes(b"not an image")
  return root


def test_a_corrupt_image_is_named_or_skipped_with_skip_bad(tiny_image_vit, tmp_path):
  data = _folder(tmp_path / "images", corrupt=True)
  config = _config(tiny_image_vit, num_steps=1, batch_size=8)
  config.data.train = str(data)
  config.data.eval = ""
  with pytest.raises(UserError, match="broken.png"):
    train.train(config, str(tmp_path / "a"))
  config.data.skip_bad = True
  assert train.train(config, str(tmp_path / "b")) == {"step": 1}
  labels = json.loads((tmp_path / "b" / "labels.json").read_text())
  assert labels == sorted(p.name for p in data.iterdir())


def test_inspect_compiles_the_image_step_and_counts_the_probe(tiny_image_vit):
  from jaxft import inspect
  out = inspect.inspect(_config(tiny_image_vit, "probe"))
  assert out["params_trainable"] == 32 * 10 + 10  # The classifier alone.
  assert out["params_total"] > 20 * out["params_trainable"]
  assert out["step_flops"] > 0 and out["optimizer_state_bytes"] < 4 * 4 * 400


def test_a_dicom_folder_trains_and_evals_with_clinical_scores_and_a_roc_png(tmp_path):
  """Real chest X-rays (PneumoniaMNIST val) written as DICOM by scripts/pneumonia_to_dicom.py,
  in per-class subfolders, train and eval where an image folder would."""
  from tests.test_dicom import _script  # pylint: disable=g-import-not-at-top
  tiny_image_vit = tmp_path / "vit"
  torch.manual_seed(0)
  transformers.ViTForImageClassification(transformers.ViTConfig(
      image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=37, num_labels=2)).save_pretrained(tiny_image_vit)
  folder = tmp_path / "dicom"
  npz = ROOT / "data" / "pneumoniamnist" / "val.npz"
  assert _script().main(["--npz", str(npz), "--out", str(folder), "--limit", "64"]) == 0
  config = _config(tiny_image_vit, num_steps=2, log_every=1)
  config.data.train = config.data.eval = str(folder)
  result = train.train(config, str(tmp_path / "run"))
  assert list(result["recall"]) == ["normal", "pneumonia"]
  for key in ("auc", "sensitivity", "specificity", "balanced_accuracy"):
    assert result[key] is None or 0.0 <= result[key] <= 1.0, (key, result)
  assert result["auc"] is not None and result["threshold"] == 0.5
  for figure in ("roc", "calibration"):
    png = Image.open(tmp_path / "run" / figure / "step_2.png")
    assert png.format == "PNG" and png.size == (360, 360)
  assert 0.0 <= result["ece"] <= 1.0
