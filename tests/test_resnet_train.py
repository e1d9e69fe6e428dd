"""ResNet training end to end: BatchNorm statistics in the train state (moved as torch's
train mode moves them, checkpointed, resumed exactly, kept by a frozen BatchNorm),
export to transformers, a fresh head for another label set, and configs/pneumonia.py."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxft import commands
from jaxft import defaults
from jaxft import run as run_lib
from jaxft import sharding
from jaxft import train
from jaxft.data import image_prep
from jaxft.errors import UserError
from jaxft.formats import hf
from jaxft.models import registry
from tests.helpers import ROOT
from tests.helpers import jaxft_in_process

NAMES = ["normal", "pneumonia"]
PNEUMONIA = ROOT / "data" / "pneumoniamnist"


def _tiny_resnet(path, num_labels=2, seed=0):
  """A tiny random 1-channel ResNet (basic layers) with perturbed running statistics."""
  config = transformers.ResNetConfig(
      num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
      layer_type="basic", num_labels=num_labels,
      id2label=dict(enumerate(NAMES if num_labels == 2 else map(str, range(num_labels)))))
  torch.manual_seed(seed)
  model = transformers.ResNetForImageClassification(config)
  with torch.no_grad():
    for name, buf in model.named_buffers():
      if name.endswith("running_mean"):
        buf.copy_(torch.randn(buf.shape) * 0.1)
      elif name.endswith("running_var"):
        buf.copy_(torch.rand(buf.shape) + 0.5)
  model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
  return _tiny_resnet(tmp_path_factory.mktemp("tiny_resnet"))


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
  """The first 48 (train) and 32 (val) PneumoniaMNIST images of each class, as npz files."""
  root = tmp_path_factory.mktemp("pneumonia")
  for split, n in (("train", 48), ("val", 32)):
    d = np.load(PNEUMONIA / f"{split}.npz")
    rows = np.concatenate([np.flatnonzero(d["labels"] == c)[:n] for c in (0, 1)])
    rows = rows[np.random.default_rng(0).permutation(len(rows))]
    np.savez(root / f"{split}.npz", images=d["images"][rows], labels=d["labels"][rows],
             label_names=d["label_names"])
  return root


def _config(model_path, data, arm="resnet", **train_kw):
  c = defaults.recipe("pneumonia", arm)
  c.model.path, c.model.from_scratch = str(model_path), False
  c.data.train, c.data.eval = str(data / "train.npz"), str(data / "val.npz")
  c.train.update(batch_size=32, num_steps=4, log_every=2, eval_every=0, eval_batch_size=64)
  c.train.update(train_kw)
  return c


def _stats(model):
  """Checkpoint key -> value of every BatchNorm statistic, as export writes them."""
  layout = registry.lookup("resnet", "image_classify").layout
  return {key: value for _, key, value in hf.export_tensors(model, layout)
          if key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_train_step_moves_the_statistics_as_torchs_train_mode(tiny_resnet, small_npz,
                                                               tmp_path, grad_accum):
  """With micro-batches, one torch forward per micro-batch, in order."""
  config = _config(tiny_resnet, small_npz, grad_accum=grad_accum)
  model_path, task, data = run_lib.prepare(config, str(tmp_path), need_train=True)
  run = run_lib.open_run(config, str(tmp_path), model_path, data.labels, task=task, quiet=True)
  assert jax.tree.leaves(run.state["stats"])  # The statistics travel in the state.
  batch = {k: v[:32] for k, v in data.train.items()}
  step = run_lib.make_step_fn(config, run.split, run.tx, run.placement, task.objective)
  state, _ = step(run.state, sharding.global_batch(batch, run.placement.batch))
  ours = _stats(run.split.merge(state["params"], state["frozen"], state["stats"]))

  theirs = transformers.ResNetForImageClassification.from_pretrained(tiny_resnet).train()
  pixels = np.asarray(image_prep.normalize(batch["pixels"], task.input.mean, task.input.std))
  with torch.no_grad():
    for micro in np.split(pixels.transpose(0, 3, 1, 2).copy(), grad_accum):
      theirs(pixel_values=torch.from_numpy(micro))
  buffers = dict(theirs.named_buffers())
  assert set(ours) == set(buffers)
  for key, value in ours.items():
    np.testing.assert_allclose(value, buffers[key].numpy(), atol=1e-5, err_msg=key)
  assert all(int(v) == grad_accum for k, v in ours.items()
             if k.endswith("num_batches_tracked"))


def test_statistics_are_checkpointed_and_a_resumed_run_repeats_the_straight_one(
    tiny_resnet, small_npz, tmp_path):
  straight = _config(tiny_resnet, small_npz, num_steps=4)
  straight.optim.schedule = "constant"
  straight.optim.warmup_frac = 0.0
  train.train(straight, str(tmp_path / "straight"))
  half = straight.copy_and_resolve_references()
  half.train.num_steps = 2
  train.train(half, str(tmp_path / "resumed"))
  train.train(straight, str(tmp_path / "resumed"))
  a, b = (run_lib.restore(str(tmp_path / d))[1] for d in ("straight", "resumed"))
  assert _stats(a.model()).keys() == _stats(b.model()).keys()
  for key, value in _stats(a.model()).items():
    np.testing.assert_array_equal(value, _stats(b.model())[key], err_msg=key)
  jax.tree.map(np.testing.assert_array_equal, a.state["params"], b.state["params"])
  assert int(_stats(a.model())["resnet.embedder.embedder.normalization.num_batches_tracked"]) == 4


def test_a_frozen_batchnorm_keeps_its_statistics_and_a_trained_one_moves(
    tiny_resnet, small_npz, tmp_path):
  config = _config(tiny_resnet, small_npz)
  # The last stage and the head train; the stem and the first stage are frozen.
  config.optim.rules = (("encoder/stages/1/.*", 1.0), ("classifier/.*", 1.0), (".*", None))
  train.train(config, str(tmp_path / "run"))
  before = {k: v.numpy() for k, v in transformers.ResNetForImageClassification.from_pretrained(
      tiny_resnet).named_buffers()}
  after = _stats(run_lib.restore(str(tmp_path / "run"))[1].model())
  for key, value in after.items():
    moved = not np.array_equal(value, before[key])
    assert moved == key.startswith("resnet.encoder.stages.1."), key


def test_a_trained_resnet_exports_and_predicts_the_same_in_transformers(
    tiny_resnet, small_npz, tmp_path):
  config = _config(tiny_resnet, small_npz)
  train.train(config, str(tmp_path / "run"))
  commands.export_command(str(tmp_path / "run"), str(tmp_path / "hf"))
  theirs, info = transformers.AutoModelForImageClassification.from_pretrained(
      tmp_path / "hf", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert theirs.config.id2label == {0: "normal", 1: "pneumonia"}
  model_path, task, data = run_lib.prepare(config, str(tmp_path / "run"), need_train=False)
  del model_path
  _, run, _ = run_lib.restore(str(tmp_path / "run"))
  _, probs = task.predict(run, data)
  pixels = np.asarray(image_prep.normalize(data.eval["pixels"], task.input.mean,
                                           task.input.std))
  with torch.no_grad():
    logits = theirs.eval()(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits
  np.testing.assert_allclose(probs, torch.softmax(logits, -1).numpy(), atol=1e-5)


def test_a_checkpoint_with_another_label_count_gets_a_fresh_head(small_npz, tmp_path):
  ten = _tiny_resnet(tmp_path / "ten_classes", num_labels=10)
  loaded = hf.load(str(ten), "image_classify", num_labels=2, heads=("classifier",))
  assert loaded.report.replaced == ["classifier/bias: (10,) -> (2,)",
                                    "classifier/kernel: (16, 10) -> (16, 2)"]
  assert loaded.report.missing == ["classifier/bias", "classifier/kernel"]
  assert not loaded.report.unexpected
  theirs = transformers.ResNetForImageClassification.from_pretrained(ten)
  np.testing.assert_array_equal(  # The backbone is the checkpoint's.
      np.asarray(loaded.model.embedder.embedder.convolution.kernel.get_value()),
      theirs.resnet.embedder.embedder.convolution.weight.detach().numpy().transpose(2, 3, 1, 0))
  with pytest.raises(UserError, match="expects"):  # Only a task's own heads are replaced.
    hf.load(str(ten), "image_classify", num_labels=2)

  result = train.train(_config(ten, small_npz, num_steps=2), str(tmp_path / "run"))
  assert list(result["recall"]) == NAMES
  commands.export_command(str(tmp_path / "run"), str(tmp_path / "hf"))
  exported = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf")
  assert tuple(exported.classifier[1].weight.shape) == (2, 16)


def test_pneumonia_recipe_cli_evaluates_a_dicom_folder_exactly_as_its_npz(
    tiny_resnet, small_npz, tmp_path):
  """`jaxft eval --config=configs/pneumonia.py --config.data.eval=...` on the val images as
  npz and as a DICOM folder written by scripts/pneumonia_to_dicom.py: the same scores."""
  from tests.test_dicom import _script  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "dicom"
  assert _script().main(["--npz", str(small_npz / "val.npz"), "--out", str(folder)]) == 0
  workdir = str(tmp_path / "run")
  flags = [f"--config={ROOT / 'configs' / 'pneumonia.py'}", f"--workdir={workdir}",
           f"--config.model.path={tiny_resnet}", "--config.model.from_scratch=False",
           f"--config.data.train={small_npz / 'train.npz'}", "--config.train.batch_size=32",
           "--config.train.num_steps=3", "--config.train.eval_every=0",
           "--config.train.eval_batch_size=64"]
  trained = jaxft_in_process("train", *flags, f"--config.data.eval={small_npz / 'val.npz'}")
  assert trained.returncode == 0, trained.stderr[-3000:]
  results = {}
  for name, source in (("npz", small_npz / "val.npz"), ("dicom", folder)):
    out = jaxft_in_process("eval", *flags, f"--config.data.eval={source}")
    assert out.returncode == 0, out.stderr[-3000:]
    results[name] = json.loads(out.stdout.strip().splitlines()[-1])
  for key in ("accuracy", "auc", "sensitivity", "specificity", "balanced_accuracy",
              "threshold"):
    assert key in results["npz"], key
  # Same images, another order (the folder lists by class): sums may differ in the last bit.
  flat = lambda r: {f"{k}.{sub}": v for k, d in r.items() if isinstance(d, dict)
                    for sub, v in d.items()} | {k: v for k, v in r.items()
                                                if not isinstance(v, dict)}
  dicom, npz = flat(results["dicom"]), flat(results["npz"])
  assert dicom.keys() == npz.keys()
  for key, value in npz.items():
    assert dicom[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float)
                          else value), key
  assert results["npz"]["sensitivity"] >= 0.95  # The threshold was chosen for it on val.


def test_a_skipped_step_leaves_the_statistics_as_they_were(tiny_resnet, small_npz, tmp_path,
                                                           monkeypatch):
  monkeypatch.setenv(train.NAN_STEPS_ENV, "2")
  config = _config(tiny_resnet, small_npz, num_steps=2, log_every=1)
  once = _config(tiny_resnet, small_npz, num_steps=1, log_every=1)
  train.train(config, str(tmp_path / "skipped"))
  monkeypatch.delenv(train.NAN_STEPS_ENV)
  train.train(once, str(tmp_path / "once"))
  skipped = _stats(run_lib.restore(str(tmp_path / "skipped"))[1].model())
  for key, value in _stats(run_lib.restore(str(tmp_path / "once"))[1].model()).items():
    np.testing.assert_array_equal(skipped[key], value, err_msg=key)


_MESH_WORKER = """
import pathlib, sys
from jaxft import train
from tests.test_resnet_train import _config
model, data, workdir = sys.argv[1:4]
config = _config(pathlib.Path(model), pathlib.Path(data), num_steps=2)
config.mesh.update(data=2, fsdp=2, tensor=1)
train.train(config, workdir)
"""


def test_on_a_2x2_mesh_the_statistics_are_the_global_batchs(tiny_resnet, small_npz, tmp_path):
  """Rows split over 4 devices: BatchNorm still normalises with (and keeps) the statistics
  of the whole batch, as on one device (synchronised BatchNorm by construction)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  done = subprocess.run([sys.executable, "-c", _MESH_WORKER, str(tiny_resnet), str(small_npz),
                         str(tmp_path / "mesh")], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  config = _config(tiny_resnet, small_npz, num_steps=2)
  train.train(config, str(tmp_path / "one"))
  one = _stats(run_lib.restore(str(tmp_path / "one"))[1].model())
  # The mesh run's checkpoint, restored on this process's one device.
  mesh = _stats(run_lib.restore(str(tmp_path / "mesh"), config=config)[1].model())
  assert one.keys() == mesh.keys()
  for key, value in one.items():
    np.testing.assert_allclose(mesh[key], value, atol=1e-5, rtol=1e-5, err_msg=key)
