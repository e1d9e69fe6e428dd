"""`jaxft predict`: a run's predictions on new inputs agree with `jaxft eval`, with the
exported model in transformers, across input forms (table, npz, DICOM folder), and a
language model's completions with `jaxft generate`."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from jaxft import commands
from jaxft import config as config_lib
from jaxft import defaults
from jaxft import train
from jaxft.data import image_prep
from tests.helpers import RECIPE, ROOT, jaxft_in_process, tiny_config

PNEUMONIA = ROOT / "data" / "pneumoniamnist" / "val.npz"


def _predict(*flags) -> list[dict]:
  """`jaxft predict FLAGS` in this process: its JSON lines (stdout holds nothing else)."""
  proc = jaxft_in_process("predict", *flags)
  assert proc.returncode == 0, proc.stderr
  return [json.loads(line) for line in proc.stdout.splitlines()]


def _probs(rows: list[dict], labels: list[str]) -> np.ndarray:
  return np.array([[r["probs"][name] for name in labels] for r in rows])


def _truth(path) -> list[str]:
  return [json.loads(line)["label"] for line in path.read_text().splitlines()]


def _softmax(logits: np.ndarray) -> np.ndarray:
  return torch.softmax(torch.from_numpy(logits).double(), -1).numpy()


# ------------------------------------------------------------------ text


@pytest.fixture(scope="module")
def text_run(tiny_setup, tmp_path_factory):
  """(workdir, its eval result, the exported folder) of a tiny trained text classifier."""
  root = tmp_path_factory.mktemp("predict_text")
  workdir, hf_dir = root / "run", root / "hf"
  config = tiny_config(tiny_setup)
  train.train(config, str(workdir))
  result = commands.eval_command(config, str(workdir))
  commands.export_command(str(workdir), str(hf_dir))
  return workdir, result, hf_dir


def test_text_predictions_score_as_eval_and_match_the_export_in_transformers(
    tiny_setup, text_run, tmp_path):
  workdir, result, hf_dir = text_run
  data = tiny_setup / "test.jsonl"
  rows = _predict(f"--workdir={workdir}", f"--input={data}")
  truth = _truth(data)
  assert [r["id"] for r in rows] == list(range(len(truth)))  # Input order, row ids.
  assert [r["true_label"] for r in rows] == truth  # The label column, passed through.
  accuracy = np.mean([r["label"] == t for r, t in zip(rows, truth)])
  assert accuracy == result["accuracy"]
  labels = json.loads((workdir / "labels.json").read_text())
  probs = _probs(rows, labels)
  assert all(r["score"] == r["probs"][r["label"]] for r in rows)
  assert [r["label"] for r in rows] == [labels[i] for i in probs.argmax(-1)]

  # The exported model, as transformers runs it on the same tokens.
  model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
  batch = tokenizer(texts, truncation=True, padding="max_length", max_length=16,
                    return_tensors="pt")
  with torch.no_grad():
    theirs = _softmax(model(**batch).logits.numpy())
  assert np.abs(probs - theirs).max() <= 1e-5

  # The exported weights with the run's config: the same probabilities, here from a .txt
  # of the texts (one a line), in batches of 5 (the last padded), written to --out.
  txt = tmp_path / "texts.txt"
  txt.write_text("\n".join(texts) + "\n")
  out = tmp_path / "preds" / "out.jsonl"
  proc = jaxft_in_process("predict", f"--workdir={workdir}", f"--model={hf_dir}",
                          f"--input={txt}", f"--out={out}", "--batch_size=5")
  assert proc.returncode == 0, proc.stderr
  summary = json.loads(proc.stdout)
  assert summary["rows"] == len(texts) and summary["out"] == str(out)
  assert sum(summary["counts"].values()) == len(texts)
  exported = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["id"] for r in exported] == list(range(len(texts)))
  assert np.abs(_probs(exported, labels) - probs).max() <= 1e-5

  # The exported folder alone: its manifest names the run, whose config it uses; or a
  # recipe given with it (the run's max_length repeated).
  alone = _predict(f"--model={hf_dir}", f"--input={data}")
  assert np.abs(_probs(alone, labels) - probs).max() <= 1e-5
  recipe = _predict(f"--model={hf_dir}", f"--input={data}", f"--config={RECIPE}",
                    "--config.data.max_length=16")
  assert np.abs(_probs(recipe, labels) - probs).max() <= 1e-5


def test_a_folder_without_a_run_predicts_with_its_architectures_defaults(text_run, tmp_path):
  _, _, hf_dir = text_run
  copy = tmp_path / "copy"
  shutil.copytree(hf_dir, copy)
  (copy / "jaxft_export.json").unlink()  # No run to take the config from.
  data = tmp_path / "pair.csv"
  data.write_text("id,text\na,a gripping film\nb,dull and far too long\n")
  rows = _predict(f"--model={copy}", f"--input={data}")
  assert [r["id"] for r in rows] == ["a", "b"] and "true_label" not in rows[0]
  labels = list(json.loads((copy / "config.json").read_text())["id2label"].values())
  assert all(sorted(r["probs"]) == sorted(labels) for r in rows)


def test_a_kept_decision_threshold_decides_the_label(tiny_setup, tmp_path):
  config = tiny_config(tiny_setup)
  config.decision.target, config.decision.value = "sensitivity", 0.9
  trained = train.train(config, str(tmp_path / "run"))
  threshold = trained["threshold"]
  assert threshold != 0.5
  rows = _predict(f"--workdir={tmp_path / 'run'}", f"--input={tiny_setup / 'test.jsonl'}")
  labels = json.loads((tmp_path / "run" / "labels.json").read_text())
  p1 = np.array([r["probs"][labels[1]] for r in rows])
  assert [r["label"] for r in rows] == [labels[int(p >= threshold)] for p in p1]
  assert all(r["score"] == r["probs"][r["label"]] for r in rows)
  # As `jaxft eval` decides on these data (they are the eval split), not as the argmax.
  accuracy = np.mean([r["label"] == r["true_label"] for r in rows])
  assert accuracy == pytest.approx(trained["accuracy"], abs=1e-12)
  assert any(r["label"] != max(r["probs"], key=r["probs"].get) for r in rows)
  # An export of that checkpoint, with the run: the threshold kept with the checkpoint.
  commands.export_command(str(tmp_path / "run"), str(tmp_path / "hf"))
  exported = _predict(f"--workdir={tmp_path / 'run'}", f"--model={tmp_path / 'hf'}",
                      f"--input={tiny_setup / 'test.jsonl'}")
  assert [r["label"] for r in exported] == [r["label"] for r in rows]


# ------------------------------------------------------------------ images


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
  """(workdir, eval result, exported folder) of a tiny ViT trained on PneumoniaMNIST val
  at its own 28 x 28 (no resize: DICOM files and the npz give the same pixels)."""
  root = tmp_path_factory.mktemp("predict_image")
  vit = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=37, num_labels=2)
  torch.manual_seed(0)
  transformers.ViTForImageClassification(vit).save_pretrained(root / "model")
  c = config_lib.image_classify()
  c.model.path = str(root / "model")
  c.data.train = c.data.eval = str(PNEUMONIA)
  c.data.random_resized_crop = c.data.flip = False
  c.train.update(batch_size=32, num_steps=4, log_every=2, eval_batch_size=128)
  c.optim.lr = 1e-3
  workdir = root / "run"
  train.train(c, str(workdir))
  result = commands.eval_command(c, str(workdir))
  commands.export_command(str(workdir), str(root / "hf"))
  return workdir, result, root / "hf"


def test_image_predictions_score_as_eval_and_match_the_export_in_transformers(image_run):
  workdir, result, hf_dir = image_run
  rows = _predict(f"--workdir={workdir}", f"--input={PNEUMONIA}")
  with np.load(PNEUMONIA) as z:
    images, names = z["images"], list(z["label_names"])
    truth = [names[i] for i in z["labels"]]
  assert [r["id"] for r in rows] == list(range(len(images)))
  assert [r["true_label"] for r in rows] == truth
  assert np.mean([r["label"] == t for r, t in zip(rows, truth)]) == result["accuracy"]
  labels = json.loads((workdir / "labels.json").read_text())
  probs = _probs(rows, labels)

  model = transformers.AutoModelForImageClassification.from_pretrained(hf_dir).eval()
  # No preprocessor_config.json: mean = std = 0.5, as the run normalised.
  pixels = image_prep.to_model_pixels(images, (28, 28), 1).astype(np.float32)
  x = torch.from_numpy(((pixels / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2))
  with torch.no_grad():
    theirs = _softmax(model(pixel_values=x).logits.numpy())
  assert np.abs(probs - theirs).max() <= 1e-5

  exported = _predict(f"--workdir={workdir}", f"--model={hf_dir}", f"--input={PNEUMONIA}")
  assert np.abs(_probs(exported, labels) - probs).max() <= 1e-5


def _dicom_script():
  spec = importlib.util.spec_from_file_location("pneumonia_to_dicom",
                                                ROOT / "scripts" / "pneumonia_to_dicom.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_a_dicom_folder_predicts_as_the_npz_it_came_from(image_run, tmp_path):
  workdir, _, _ = image_run
  folder = tmp_path / "dicom"
  assert _dicom_script().main(["--npz", str(PNEUMONIA), "--out", str(folder),
                               "--limit", "40"]) == 0
  from_npz = _predict(f"--workdir={workdir}", f"--input={PNEUMONIA}", "--batch_size=16")
  from_dicom = _predict(f"--workdir={workdir}", f"--input={folder}", "--batch_size=16")
  assert len(from_dicom) == 40
  # Class subfolders listed in sorted order, files sorted within each: DIR/<class>/<index>.dcm.
  paths = [r["id"] for r in from_dicom]
  assert paths == sorted(paths) and all(p.startswith(str(folder)) for p in paths)
  labels = json.loads((workdir / "labels.json").read_text())
  for row in from_dicom:
    index = int(row["id"].rsplit("/", 1)[1].removesuffix(".dcm"))
    assert row["true_label"] == from_npz[index]["true_label"] == row["id"].split("/")[-2]
    assert _probs([row], labels) == pytest.approx(_probs([from_npz[index]], labels), abs=1e-6)
  # One file alone: its path is its id.
  [single] = _predict(f"--workdir={workdir}", f"--input={paths[0]}")
  assert single["id"] == paths[0] and single["probs"] == pytest.approx(from_dicom[0]["probs"])
  # A csv of paths (relative to it) in the config's image column, with an id column.
  table = folder / "files.csv"
  table.write_text("id,image\n" + "".join(
      f"scan{i},{p.removeprefix(str(folder) + '/')}\n" for i, p in enumerate(paths[:5])))
  listed = _predict(f"--workdir={workdir}", f"--input={table}")
  assert [r["id"] for r in listed] == [f"scan{i}" for i in range(5)]
  assert _probs(listed, labels) == pytest.approx(_probs(from_dicom[:5], labels), abs=1e-6)

  # An unreadable file is named; with skip_bad, it gets an error line in its place.
  table.unlink()
  broken = folder / "normal" / "broken.dcm"
  broken.write_bytes(b"not a DICOM file")
  proc = jaxft_in_process("predict", f"--workdir={workdir}", f"--input={folder}")
  assert proc.returncode == 2 and str(broken) in proc.stderr
  rows = _predict(f"--workdir={workdir}", f"--input={folder}", "--config.data.skip_bad=True")
  [bad] = [r for r in rows if "error" in r]
  assert bad["id"] == str(broken) and "DICM" in bad["error"]
  assert [r["id"] for r in rows] == sorted(paths + [str(broken)])
  good = [r for r in rows if "error" not in r]
  assert _probs(good, labels) == pytest.approx(_probs(from_dicom, labels), abs=1e-6)


# ------------------------------------------------------------------ language models


def _tiny_sft_config(root):
  c = defaults.recipe("sft")
  c.model.path = str(root / "model")
  c.data.train = str(root / "train.jsonl")
  c.data.eval = str(root / "test.jsonl")
  c.data.max_length = 128
  c.train.update(batch_size=4, num_steps=2, log_every=2, eval_batch_size=4)
  c.optim.update(lr=1e-3, warmup_frac=0.0, schedule="constant")
  c.eval.update(num_samples=0, max_new_tokens=8)
  c.checkpoint.update(every=0)
  return c


def test_a_language_model_completes_prompts_as_jaxft_generate(tiny_chat_lm, tmp_path):
  workdir = tmp_path / "run"
  train.train(_tiny_sft_config(tiny_chat_lm), str(workdir))
  prompts = ["hey! what did you do this weekend? i", "the best thing about mornings is"]
  data = tmp_path / "prompts.jsonl"
  data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                          for i, p in enumerate(prompts)))
  rows = _predict(f"--workdir={workdir}", f"--input={data}", "--max_new_tokens=12")
  generated = jaxft_in_process("generate", f"--workdir={workdir}", "--max_new_tokens=12",
                               "--temperature=0", *(f"--prompt={p}" for p in prompts))
  assert generated.returncode == 0, generated.stderr
  assert [r["id"] for r in rows] == ["p0", "p1"]
  assert [r["prompt"] for r in rows] == prompts
  assert "\n".join(r["completion"] for r in rows) + "\n" == generated.stdout
  assert any(r["completion"].strip() for r in rows)


# ------------------------------------------------------------------ mistakes


def test_generate_on_a_classifier_run_exits_2(text_run):
  workdir, _, _ = text_run
  proc = jaxft_in_process("generate", f"--workdir={workdir}", "--prompt=hi")
  assert proc.returncode == 2
  assert "trained a classifier, not a language model" in proc.stderr


def test_bad_inputs_exit_2_and_write_nothing(tiny_setup, text_run, tmp_path):
  workdir, _, _ = text_run
  empty, no_text = tmp_path / "empty.jsonl", tmp_path / "no_text.jsonl"
  empty.write_text("")
  no_text.write_text(json.dumps({"review": "fine", "label": "positive"}) + "\n")
  (tmp_path / "untrained").mkdir()
  (tmp_path / "untrained" / "config.json").write_text((workdir / "config.json").read_text())
  (tmp_path / "untrained" / "labels.json").write_text((workdir / "labels.json").read_text())
  data = tiny_setup / "test.jsonl"
  out = tmp_path / "out.jsonl"
  cases = [
      ([f"--workdir={workdir}", f"--input={tmp_path / 'missing.jsonl'}"], "not found"),
      ([f"--workdir={workdir}", f"--input={tmp_path / 'missing_folder'}/"], "not found"),
      ([f"--workdir={workdir}", f"--input={tmp_path / 'untrained'}"], "is a folder"),
      ([f"--workdir={workdir}", f"--input={empty}"], "empty"),
      ([f"--workdir={workdir}", f"--input={no_text}"], "no column 'text'"),
      ([f"--workdir={tmp_path / 'untrained'}", f"--input={data}"], "no checkpoint"),
      ([f"--workdir={tmp_path / 'nowhere'}", f"--input={data}"], "does not exist"),
      ([f"--workdir={workdir}"], "predict needs --input"),
      ([f"--input={data}"], "predict needs --workdir=DIR"),
      ([f"--workdir={workdir}", f"--input={data}", "--batch_size=0"], "--batch_size"),
  ]
  for flags, message in cases:
    proc = jaxft_in_process("predict", *flags, f"--out={out}")
    assert proc.returncode == 2, (flags, proc.stderr)
    assert message in proc.stderr and "Traceback" not in proc.stderr, (flags, proc.stderr)
    assert not out.exists() and proc.stdout == ""
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "no_text.jsonl",
                                                        "untrained"]
