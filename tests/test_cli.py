"""The `jaxft` command: exit code 2 for user mistakes, kill-and-resume, eval, export.

Commands that must be processes (signals, a forced device count, exit codes
as the shell sees them) run as subprocesses; the rest run `cli.main` in this
process, which spares each the interpreter and JAX start-up.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch
import transformers

from tests.helpers import ROOT, jaxft, jaxft_in_process, tiny_flags


@pytest.mark.parametrize("extra, message", [
    (["--config.train.bogus=1"], "unknown config key train.bogus"),
    (["--config.train.batch_size=abc"], "config.train.batch_size"),
    (["--config.model.path=/no/such/model"], "/no/such/model"),
    (["--config.data.train=/no/such/file.jsonl"], "not found: /no/such/file.jsonl"),
    (["--config.data.text_key=sentence"], "no column 'sentence'"),
    (["--config.optim.schedule=triangle"], "config.optim.schedule"),
    (["--config.optim.rules=(('embedings/.*', None), ('.*', 1.0))"],
     "config.optim.rules[0]='embedings/.*' matches no parameter"),
    (["--config.optim.rules=(('embeddings/.*', None),)"], "matches no rule"),
    (["--config.lora.rank=4", "--config.lora.targets=.*/qkv"], "matches no Linear layer"),
    (["--config.mesh.data=2"], "2 does not divide the device count (1)"),
    (["--num_processes=2", "--process_id=0"], "need all of --coordinator_address"),
])
def test_user_mistakes_exit_2_with_a_message_and_no_traceback(tiny_setup, tmp_path, extra, message):
  # In this process (cli.main, as the console script runs it); the empty-dataset
  # and generate tests below check the same exit in a real process.
  proc = jaxft_in_process("train", *tiny_flags(tiny_setup, tmp_path / "w", *extra))
  assert proc.returncode == 2, proc.stderr
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_empty_dataset_exits_2(tiny_setup, tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  proc = jaxft("train", *tiny_flags(tiny_setup, tmp_path / "w", f"--config.data.train={empty}"))
  assert proc.returncode == 2 and "empty" in proc.stderr and "Traceback" not in proc.stderr


def test_sigkill_mid_run_then_rerun_finishes_as_the_uninterrupted_run(tiny_setup, tmp_path):
  workdir = tmp_path / "w"
  flags = ["--config.train.num_steps=400", "--config.checkpoint.every=20",
           "--config.train.log_every=20"]
  args = [sys.executable, "-m", "jaxft.cli", "train", *tiny_flags(tiny_setup, workdir, *flags)]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not (ckpts.exists() and any(p.isdigit() for p in os.listdir(ckpts))):
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  saved = max(int(p) for p in os.listdir(ckpts) if p.isdigit())
  assert saved < 400
  rerun = jaxft_in_process(*args[3:])  # What was killed was a process; the rerun need not be.
  assert rerun.returncode == 0, rerun.stderr
  assert f"restored checkpoint at step {saved}" in rerun.stderr
  events = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert events[-1]["split"] == "eval" and events[-1]["step"] == 400
  # Resuming restores params, optimizer state, data order and dropout draws:
  # the final eval is that of the same command never interrupted (~20 s more).
  whole = jaxft_in_process("train", *tiny_flags(tiny_setup, tmp_path / "whole", *flags))
  assert whole.returncode == 0, whole.stderr
  resumed = json.loads(rerun.stdout.strip().splitlines()[-1])
  assert resumed == pytest.approx(json.loads(whole.stdout.strip().splitlines()[-1]), abs=1e-6)


def test_eval_and_export_agree_with_transformers(tiny_setup, tmp_path):
  workdir, out = tmp_path / "w", tmp_path / "hf"
  train = jaxft_in_process("train", *tiny_flags(tiny_setup, workdir, "--config.train.num_steps=4"))
  assert train.returncode == 0, train.stderr
  ev = jaxft_in_process("eval", *tiny_flags(tiny_setup, workdir))
  assert ev.returncode == 0, ev.stderr
  metrics = json.loads(ev.stdout.strip().splitlines()[-1])
  assert metrics["step"] == 4 and {"loss", "accuracy", "f1"} <= set(metrics)
  ex = jaxft_in_process("export", f"--workdir={workdir}", f"--out={out}")
  assert ex.returncode == 0, ex.stderr
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert model.config.id2label == {0: "negative", 1: "positive"}
  tok = transformers.AutoTokenizer.from_pretrained(out)
  rows = [json.loads(l) for l in (tiny_setup / "test.jsonl").read_text().splitlines()]
  enc = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=16,
            return_tensors="pt")
  labels = torch.tensor([model.config.label2id[r["label"]] for r in rows])
  with torch.no_grad():
    out_pt = model.eval()(**enc, labels=labels)
  assert abs(float(out_pt.loss) - metrics["loss"]) < 1e-4
  acc = float((out_pt.logits.argmax(-1) == labels).float().mean())
  assert acc == pytest.approx(metrics["accuracy"])
  # The clinical scores, from transformers' probabilities by scikit-learn directly.
  from sklearn import metrics as sk  # pylint: disable=g-import-not-at-top
  from jaxft.tasks import clinical_metrics  # pylint: disable=g-import-not-at-top
  positive = torch.softmax(out_pt.logits.double(), -1)[:, 1].numpy()
  assert metrics["auc"] == pytest.approx(sk.roc_auc_score(labels.numpy(), positive), abs=1e-6)
  predicted = (positive >= 0.5).astype(int)
  assert metrics["threshold"] == 0.5
  assert metrics["sensitivity"] == pytest.approx(sk.recall_score(labels.numpy(), predicted))
  assert metrics["balanced_accuracy"] == pytest.approx(
      sk.balanced_accuracy_score(labels.numpy(), predicted))
  probs = torch.softmax(out_pt.logits.double(), -1).numpy()
  assert metrics["ece"] == pytest.approx(
      clinical_metrics.expected_calibration_error(labels.numpy(), probs), abs=1e-6)


def test_sigterm_saves_a_checkpoint_and_exits_143(tiny_setup, tmp_path):
  workdir = tmp_path / "w"
  args = [sys.executable, "-m", "jaxft.cli", "train",
          *tiny_flags(tiny_setup, workdir, "--config.train.num_steps=100000",
                      "--config.checkpoint.every=0", "--config.train.log_every=1")]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, stderr
  assert "stopped by SIGTERM" in stderr
  saved = [int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()]
  assert len(saved) == 1 and 3 <= saved[0] < 100000


def test_inspect_prints_the_rules_and_params_then_a_json_line(tiny_setup):
  proc = jaxft_in_process("inspect", "--params", *tiny_flags(
      tiny_setup, None, "--config.optim.rules=(('embeddings/.*', None), ('.*', 1.0))"))
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  figures = json.loads(lines[-1])
  assert {"params_total", "params_trainable", "param_bytes", "optimizer_state_bytes",
          "step_flops", "peak_memory_bytes", "devices"} <= set(figures)
  assert 0 < figures["params_trainable"] < figures["params_total"]
  assert figures["step_flops"] > 0 and figures["peak_memory_bytes"] > 0
  listing = {l.split()[0]: l.split() for l in lines if l.startswith(("embeddings/", "encoder/"))}
  assert listing["embeddings/word_embeddings/embedding"][1:] == [
      "30522x32", "optim.rules[0]", "frozen", "-"]
  assert listing["encoder/layer/0/attention/self/query/bias"][1:] == [
      "32", "optim.rules[1]", "1", "0"]
  assert any(l.startswith("optim.rules[0]") for l in lines)


def test_inspect_reports_per_device_bytes_under_the_mesh(tiny_setup):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  proc = jaxft("inspect", *tiny_flags(tiny_setup, None, "--config.mesh.fsdp=8"), env=env)
  assert proc.returncode == 0, proc.stderr
  figures = json.loads(proc.stdout.strip().splitlines()[-1])
  assert figures["devices"] == 8 and figures["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert figures["param_bytes_per_device"] <= (1 / 8 + 0.05) * figures["param_bytes"]
  assert figures["optimizer_state_bytes_per_device"] <= (
      (1 / 8 + 0.05) * figures["optimizer_state_bytes"])


def test_generate_and_chat_answer_with_smollm2(smollm2_path):
  proc = jaxft_in_process("generate", f"--model={smollm2_path}", "--chat", "--max_new_tokens=16",
               "--prompt=What is the capital of France?", "--prompt=What is 2 + 2?")
  assert proc.returncode == 0, proc.stderr
  first, second = proc.stdout.strip().splitlines()
  assert "Paris" in first and "4" in second
  with mock.patch.object(sys, "stdin", io.StringIO("What is the capital of France?\nAnd of Italy?\n")):
    proc = jaxft_in_process("chat", f"--model={smollm2_path}", "--max_new_tokens=12")
  assert proc.returncode == 0, proc.stderr
  replies = proc.stdout.strip().splitlines()
  assert len(replies) == 2 and "Paris" in replies[0] and "Rome" in replies[1]


def test_generate_without_a_model_exits_2():
  proc = jaxft("generate", "--prompt=hi")
  assert proc.returncode == 2 and "needs --model" in proc.stderr
